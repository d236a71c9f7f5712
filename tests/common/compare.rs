//! The tree comparator shared by the pull and mount conformance tests: what a user would see
//! of a root filesystem — paths, types, modes, owners, sizes, content hashes, link targets,
//! device numbers, xattrs, mtimes and hardlink groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::Digest as _;

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Record {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: Option<String>,
    pub link: Option<String>,
    pub rdev: u64,
    pub mtime: i64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Everything below `root` (not `root` itself), and its hardlink groups.
pub struct Snapshot {
    pub records: BTreeMap<String, Record>,
    pub hardlinks: BTreeSet<Vec<String>>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 64 << 10];
    let Ok(n) = rustix::fs::llistxattr(p, &mut names) else {
        return out;
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        let mut val = vec![0u8; 64 << 10];
        if let Ok(len) = rustix::fs::lgetxattr(p, name.as_str(), &mut val) {
            out.insert(name, val[..len].to_vec());
        }
    }
    out
}

pub fn snapshot(root: &Path) -> Snapshot {
    let mut records = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for ent in std::fs::read_dir(&dir).unwrap() {
            let p = ent.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "fifo"
            } else if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else {
                "other"
            };
            if kind != "dir" && md.nlink() > 1 {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            records.insert(
                rel,
                Record {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if kind == "file" { md.size() } else { 0 },
                    sha256: (kind == "file")
                        .then(|| hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()))),
                    link: (kind == "symlink").then(|| {
                        std::fs::read_link(&p)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned()
                    }),
                    rdev: md.rdev(),
                    mtime: md.mtime(),
                    xattrs: xattrs(&p),
                },
            );
        }
    }
    let hardlinks = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    Snapshot { records, hardlinks }
}

fn made_now(r: &Record) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    r.kind == "dir" && (now - r.mtime).abs() < 3600
}

/// Panic with a readable list of every difference between two trees.
pub fn assert_same_tree(ours: &Path, reference: &Path, what: &str) {
    let (a, b) = (snapshot(ours), snapshot(reference));
    let mut diffs = Vec::new();
    for (p, r) in &a.records {
        match b.records.get(p) {
            None => diffs.push(format!("only in ours: {p} ({})", r.kind)),
            // Directories no layer lists carry the time they were made, on both sides.
            Some(o)
                if o != r
                    && !(made_now(o)
                        && made_now(r)
                        && Record {
                            mtime: 0,
                            ..o.clone()
                        } == Record {
                            mtime: 0,
                            ..r.clone()
                        }) =>
            {
                diffs.push(format!("differs: {p}\n   ours: {r:?}\n   ref:  {o:?}"))
            }
            _ => {}
        }
    }
    for (p, r) in &b.records {
        if !a.records.contains_key(p) {
            diffs.push(format!("only in reference: {p} ({})", r.kind));
        }
    }
    if a.hardlinks != b.hardlinks {
        diffs.push(format!(
            "hardlink groups differ:\n   ours: {:?}\n   ref:  {:?}",
            a.hardlinks, b.hardlinks
        ));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert!(!a.records.is_empty(), "{what}: empty tree");
}
