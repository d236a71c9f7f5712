//! The merged tree as one tar stream (`imgfs pull --tar`): PAX xattrs, GNU long names,
//! hardlinks as link entries to the first path of their inode.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use crate::error::{IoContext, Result};
use bstr::BString;

use crate::index::{Kind, as_path};
use crate::tree::{Inode, Meta, Tree};

/// Write `tree` to `out` as one tar stream, regular files' bytes read from `staging`.
pub fn write(tree: &Tree, staging: &[PathBuf], out: Box<dyn Write + Send>) -> Result<()> {
    let mut b = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, out));
    let mut first: HashMap<u32, BString> = HashMap::new();
    for d in tree.walk() {
        let path = tree.path(d);
        let ino = tree.dentries[d as usize].inode;
        let inode = &tree.inodes[ino as usize];
        let m = &inode.meta;
        append_pax(&mut b, &path, m)?;
        let mut h = header(m);
        if m.kind != Kind::Dir
            && let Some(target) = first.get(&ino)
        {
            h.set_entry_type(tar::EntryType::Link);
            b.append_link(&mut h, as_path(&path), as_path(target))
                .ctx(|| err(&path))?;
            continue;
        }
        append_inode(&mut b, h, &path, inode, staging)?;
        if m.kind != Kind::Dir {
            first.insert(ino, path);
        }
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .ctx(|| "finishing the tar stream".into())
}

/// The context of an error writing `p`.
fn err(p: &BString) -> String {
    format!("writing {p:?} to the tar stream")
}

/// The PAX extensions `path` needs before its header, if any: its xattrs, and a time before
/// 1970 (which does not fit the header's field).
fn append_pax<W: Write>(b: &mut tar::Builder<W>, path: &BString, m: &Meta) -> Result<()> {
    if m.xattrs.is_empty() && m.mtime >= 0 {
        return Ok(());
    }
    let mtime = m.mtime.to_string();
    let mut pax: Vec<(String, &[u8])> = m
        .xattrs
        .iter()
        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
        .collect();
    if m.mtime < 0 {
        pax.push(("mtime".into(), mtime.as_bytes()));
    }
    b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
        .ctx(|| err(path))
}

/// A header with what every kind of entry carries: mode, owner and time; no size yet.
fn header(m: &Meta) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mode(m.mode);
    h.set_uid(m.uid.into());
    h.set_gid(m.gid.into());
    h.set_mtime(m.mtime.max(0) as u64);
    h.set_size(0);
    h
}

/// The entry for `inode`'s first path, `path`, completing header `h`; a regular file's bytes
/// come from its staging file.
fn append_inode<W: Write>(
    b: &mut tar::Builder<W>,
    mut h: tar::Header,
    path: &BString,
    inode: &Inode,
    staging: &[PathBuf],
) -> Result<()> {
    let m = &inode.meta;
    let os_path = as_path(path);
    match m.kind {
        Kind::Dir => {
            h.set_entry_type(tar::EntryType::Directory);
            let mut dir = path.clone();
            dir.push(b'/');
            b.append_data(&mut h, as_path(&dir), std::io::empty())
                .ctx(|| err(path))?;
        }
        Kind::File => {
            let data = inode.data.expect("regular files have data");
            let src = staging[data.layer as usize].join(data.entry.to_string());
            let f = std::fs::File::open(&src).ctx(|| format!("reading {}", src.display()))?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(m.size);
            b.append_data(&mut h, os_path, f).ctx(|| err(path))?;
        }
        Kind::Symlink => {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = m.link.as_deref().map_or(&b""[..], |l| l);
            b.append_link(&mut h, os_path, as_path(target))
                .ctx(|| err(path))?;
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            h.set_entry_type(match m.kind {
                Kind::Char => tar::EntryType::Char,
                Kind::Block => tar::EntryType::Block,
                _ => tar::EntryType::Fifo,
            });
            h.set_device_major(m.dev_major).ctx(|| err(path))?;
            h.set_device_minor(m.dev_minor).ctx(|| err(path))?;
            b.append_data(&mut h, os_path, std::io::empty())
                .ctx(|| err(path))?;
        }
        Kind::Hardlink | Kind::Whiteout | Kind::Opaque => unreachable!(),
    }
    Ok(())
}
