//! `imgfs ls` and `imgfs cat`: answer from the image's index and tree, without mounting —
//! for machines and containers where FUSE is not allowed.

use std::io::Write;

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
    path: String,
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
    path: String,
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

fn resolve(tree: &Tree, path: &str) -> Result<DentryId> {
    let norm = crate::index::normalize(path)?;
    tree.lookup(&norm)
        .with_context(|| format!("{path}: no such file or directory in the image"))
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
    name: &str,
    long: bool,
) -> Result<()> {
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
        (Kind::Symlink, Some(l)) => format!(" -> {l}"),
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
        print_entry(&mut out, tree, start, &args.path, args.long)?;
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
                format!("/{}", tree.path(dir))
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
        only_path: Some(crate::index::normalize(&args.path)?),
        ..args.read.view_options(g)
    };
    let view = ImageView::open(&cache, std::sync::Arc::new(source), &image, &opts)
        .await
        .with_context(|| format!("indexing {}", image.reference))?;
    let tree = &view.tree;
    let mut d = resolve(tree, &args.path)?;
    // Follow symlinks as `cat` would, inside the image.
    for _ in 0..40 {
        let m = &tree.inode_of(d).meta;
        if m.kind != Kind::Symlink {
            break;
        }
        let target = m.link.clone().unwrap_or_default();
        let joined = if target.starts_with('/') {
            target
        } else {
            let parent = tree.path(tree.dentries[d as usize].parent);
            format!("{parent}/{target}")
        };
        d = resolve(tree, &joined)?;
    }
    let ino = tree.dentries[d as usize].inode;
    let m = &tree.inodes[ino as usize].meta;
    if m.kind != Kind::File {
        bail!("{}: not a regular file", args.path);
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
            .with_context(|| format!("reading {}", args.path))?;
            if chunk.is_empty() {
                bail!("{}: layer data ends early", args.path);
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
