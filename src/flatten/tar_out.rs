//! The merged tree as one tar stream (`imgfs pull --tar`): PAX xattrs, GNU long names,
//! hardlinks as link entries to the first path of their inode.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use crate::error::{IoContext, Result};
use crate::index::Kind;
use crate::tree::Tree;

pub fn write(tree: &Tree, staging: &[PathBuf], out: Box<dyn Write + Send>) -> Result<()> {
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    let mut first: HashMap<u32, String> = HashMap::new();
    let err = |p: &str| format!("writing {p:?} to the tar stream");
    for d in tree.walk() {
        let path = tree.path(d);
        let ino = tree.dentries[d as usize].inode;
        let inode = &tree.inodes[ino as usize];
        let m = &inode.meta;
        if !m.xattrs.is_empty() {
            let pax: Vec<(String, &[u8])> = m
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                .ctx(|| err(&path))?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(m.mode);
        h.set_uid(m.uid.into());
        h.set_gid(m.gid.into());
        h.set_mtime(m.mtime.max(0) as u64);
        h.set_size(0);
        if m.kind != Kind::Dir
            && let Some(target) = first.get(&ino)
        {
            h.set_entry_type(tar::EntryType::Link);
            b.append_link(&mut h, &path, target).ctx(|| err(&path))?;
            continue;
        }
        match m.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
                    .ctx(|| err(&path))?;
            }
            Kind::File => {
                let data = inode.data.expect("regular files have data");
                let src = staging[data.layer as usize].join(data.entry.to_string());
                let f = std::fs::File::open(&src).ctx(|| format!("reading {}", src.display()))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(m.size);
                b.append_data(&mut h, &path, f).ctx(|| err(&path))?;
            }
            Kind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, &path, m.link.as_deref().unwrap_or(""))
                    .ctx(|| err(&path))?;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                h.set_entry_type(match m.kind {
                    Kind::Char => tar::EntryType::Char,
                    Kind::Block => tar::EntryType::Block,
                    _ => tar::EntryType::Fifo,
                });
                h.set_device_major(m.dev_major).ctx(|| err(&path))?;
                h.set_device_minor(m.dev_minor).ctx(|| err(&path))?;
                b.append_data(&mut h, &path, std::io::empty())
                    .ctx(|| err(&path))?;
            }
            Kind::Hardlink | Kind::Whiteout | Kind::Opaque => unreachable!(),
        }
        if m.kind != Kind::Dir {
            first.insert(ino, path);
        }
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .ctx(|| "finishing the tar stream".into())
}
