//! `imgfs ls` and `imgfs cat`: answer from the image's index and tree, without mounting —
//! for machines and containers where FUSE is not allowed.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{Global, Opened};
use crate::index::Kind;
use crate::tree::{DentryId, ROOT, Tree};
use crate::view::{ImageView, ViewOptions};

#[derive(Args)]
pub struct LsArgs {
    image: String,
    /// Directory (or file) inside the image
    #[arg(default_value = "/")]
    path: OsString,
    /// Long listing: mode, owner, size, mtime, link target
    #[arg(short, long)]
    long: bool,
    /// List subdirectories too
    #[arg(short = 'R', long)]
    recursive: bool,
    #[command(flatten)]
    read: super::ReadArgs,
}

#[derive(Args)]
pub struct CatArgs {
    image: String,
    /// File inside the image
    path: OsString,
    #[command(flatten)]
    read: super::ReadArgs,
}

async fn open_view(g: &Global, image: &str, read: &super::ReadArgs) -> Result<ImageView> {
    let Opened {
        cache,
        source,
        image,
    } = g.open(image).await?;
    ImageView::open(
        &cache,
        std::sync::Arc::new(source),
        &image,
        &read.view_options(g),
    )
    .await
    .with_context(|| format!("indexing {}", image.reference))
}

fn resolve(tree: &Tree, path: &OsString) -> Result<DentryId> {
    let norm = crate::index::normalize(path.as_bytes())?;
    tree.lookup(&norm).with_context(|| {
        format!(
            "{}: no such file or directory in the image",
            escaped(path.as_bytes())
        )
    })
}

/// A name as `ls --quoting-style=escape` shows it: printable text as it is, a backslash
/// doubled, control characters and bytes that are not UTF-8 as octal escapes (`\377`), so
/// names that differ in bytes never print alike.
pub(crate) fn escaped(name: &[u8]) -> String {
    use bstr::ByteSlice;
    let mut out = String::with_capacity(name.len());
    for (start, end, c) in name.char_indices() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\u{FFFD}' if &name[start..end] != "\u{FFFD}".as_bytes() => {
                for b in &name[start..end] {
                    out.push_str(&format!("\\{b:03o}"));
                }
            }
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\{b:03o}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

fn kind_char(k: Kind) -> char {
    match k {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::Char => 'c',
        Kind::Block => 'b',
        Kind::Fifo => 'p',
        _ => '-',
    }
}

fn mode_string(kind: Kind, mode: u32) -> String {
    let mut s = String::new();
    s.push(kind_char(kind));
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, c)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 if mode & 0o4000 != 0 => Some(if set { 's' } else { 'S' }),
            5 if mode & 0o2000 != 0 => Some(if set { 's' } else { 'S' }),
            8 if mode & 0o1000 != 0 => Some(if set { 't' } else { 'T' }),
            _ => None,
        };
        s.push(special.unwrap_or(if set { *c } else { '-' }));
    }
    s
}

fn print_entry(
    out: &mut impl Write,
    tree: &Tree,
    d: DentryId,
    name: &[u8],
    long: bool,
) -> Result<()> {
    let name = escaped(name);
    let m = &tree.inode_of(d).meta;
    if !long {
        writeln!(out, "{name}")?;
        return Ok(());
    }
    let size = match m.kind {
        Kind::Char | Kind::Block => format!("{},{}", m.dev_major, m.dev_minor),
        _ => m.size.to_string(),
    };
    let link = match (&m.kind, &m.link) {
        (Kind::Symlink, Some(l)) => format!(" -> {}", escaped(l)),
        _ => String::new(),
    };
    writeln!(
        out,
        "{} {:>3} {:>5} {:>5} {:>10} {:>10} {name}{link}",
        mode_string(m.kind, m.mode),
        tree.inode_of(d).nlink,
        m.uid,
        m.gid,
        size,
        m.mtime
    )?;
    Ok(())
}

pub async fn ls(g: &Global, args: LsArgs) -> Result<()> {
    let view = open_view(g, &args.image, &args.read).await?;
    let tree = &view.tree;
    let start = resolve(tree, &args.path)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if tree.inode_of(start).meta.kind != Kind::Dir {
        print_entry(&mut out, tree, start, args.path.as_bytes(), args.long)?;
        return Ok(out.flush()?);
    }
    let mut stack = vec![start];
    let mut first = true;
    while let Some(dir) = stack.pop() {
        if args.recursive {
            if !first {
                writeln!(out)?;
            }
            let p = if dir == ROOT {
                "/".to_string()
            } else {
                format!("/{}", escaped(&tree.path(dir)))
            };
            writeln!(out, "{p}:")?;
        }
        first = false;
        let children: Vec<DentryId> = tree.children(dir).collect();
        for &c in &children {
            print_entry(
                &mut out,
                tree,
                c,
                &tree.dentries[c as usize].name,
                args.long,
            )?;
        }
        if args.recursive {
            stack.extend(
                children
                    .iter()
                    .rev()
                    .filter(|&&c| tree.inode_of(c).meta.kind == Kind::Dir),
            );
        }
    }
    Ok(out.flush()?)
}

pub async fn cat(g: &Global, args: CatArgs) -> Result<()> {
    let Opened {
        cache,
        source,
        image,
    } = g.open(&args.image).await?;
    let opts = ViewOptions {
        only_path: Some(crate::index::normalize(args.path.as_bytes())?),
        ..args.read.view_options(g)
    };
    let view = ImageView::open(&cache, std::sync::Arc::new(source), &image, &opts)
        .await
        .with_context(|| format!("indexing {}", image.reference))?;
    let tree = &view.tree;
    let shown = escaped(args.path.as_bytes());
    // Symlinks are followed as `cat` would, inside the image.
    let norm = crate::index::normalize(args.path.as_bytes())?;
    let d = tree
        .lookup_following(&norm)
        .map_err(|why| anyhow::anyhow!("{shown}: {why}"))?;
    let ino = tree.dentries[d as usize].inode;
    let m = &tree.inodes[ino as usize].meta;
    if m.kind != Kind::File {
        bail!("{shown}: not a regular file");
    }
    let size = m.size;
    let view = std::sync::Arc::new(view);
    // Reads may fetch by range, which waits on the runtime: not from one of its own threads.
    tokio::task::spawn_blocking(move || {
        let mut out = std::io::stdout().lock();
        let mut off = 0u64;
        while off < size {
            // A file read in one go is read exactly; bigger ones a span piece at a time.
            let chunk = if size <= 1 << 20 {
                view.read_once(ino, off, 1 << 20)
            } else {
                view.read(ino, off, 1 << 20)
            }
            .with_context(|| format!("reading {shown}"))?;
            if chunk.is_empty() {
                bail!("{shown}: layer data ends early");
            }
            out.write_all(&chunk)?;
            off += chunk.len() as u64;
        }
        let s = view.stats();
        tracing::info!(
            "fetched {} ranges ({} bytes), {} spans from the chunk store",
            s.ranges.load(std::sync::atomic::Ordering::Relaxed),
            s.range_bytes.load(std::sync::atomic::Ordering::Relaxed),
            s.chunk_hits.load(std::sync::atomic::Ordering::Relaxed)
        );
        Ok(out.flush()?)
    })
    .await?
}
