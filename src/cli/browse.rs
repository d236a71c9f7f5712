//! `imgfs ls` and `imgfs cat`: answer from the image's index and tree, without mounting —
//! for machines and containers where FUSE is not allowed.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::Global;
use crate::index::Kind;
use crate::tree::{DentryId, Tree};
use crate::view::{ImageView, ViewOptions};

#[derive(Args)]
pub struct LsArgs {
    /// The image (see `imgfs --help` for the forms it takes)
    image: String,
    /// Directories or files inside the image; a trailing / follows a symlink
    #[arg(default_value = "/")]
    paths: Vec<OsString>,
    /// Long listing, as `ls -l`: mode, links, owner and group (names from the image's own
    /// /etc/passwd and /etc/group), size, time, name, link target
    #[arg(short, long)]
    long: bool,
    /// Long listing with numeric user and group ids
    #[arg(short = 'n', long = "numeric-uid-gid")]
    numeric: bool,
    /// List subdirectories too
    #[arg(short = 'R', long)]
    recursive: bool,
    #[command(flatten)]
    read: super::ReadArgs,
}

#[derive(Args)]
pub struct CatArgs {
    /// The image (see `imgfs --help` for the forms it takes)
    image: String,
    /// File inside the image
    path: OsString,
    #[command(flatten)]
    read: super::ReadArgs,
}

async fn open_view(g: &Global, image: &str, read: &super::ReadArgs) -> Result<ImageView> {
    Ok(g.open_view(image, &read.view_options(g)).await?.2)
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

/// Names for ids, from the image's own /etc/passwd or /etc/group (`name:x:id:…`).
fn id_names(view: &ImageView, path: &[u8]) -> std::collections::HashMap<u32, String> {
    let tree = &view.tree;
    let Ok(d) = tree.lookup_following(path) else {
        return Default::default();
    };
    let ino = tree.dentries[d as usize].inode;
    let m = &tree.inodes[ino as usize].meta;
    if m.kind != Kind::File || m.size > 16 << 20 {
        return Default::default();
    }
    let Ok(bytes) = view.read_once(ino, 0, m.size as usize) else {
        return Default::default();
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}

/// A time as `ls -l` shows it: month, day and time within the last six months, month, day
/// and year otherwise (local time, C locale).
fn ls_time(t: i64, now: i64) -> String {
    const SIX_MONTHS: i64 = 31_556_952 / 2;
    let recent = t > now - SIX_MONTHS && t <= now;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r writes only into the tm we own.
    if unsafe { libc::localtime_r(&(t as libc::time_t), &mut tm) }.is_null() {
        return t.to_string();
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS[tm.tm_mon.clamp(0, 11) as usize];
    if recent {
        format!(
            "{month} {:>2} {:02}:{:02}",
            tm.tm_mday, tm.tm_hour, tm.tm_min
        )
    } else {
        format!("{month} {:>2}  {}", tm.tm_mday, tm.tm_year + 1900)
    }
}

/// How `ls` prints entries: names only, or long lines with columns aligned per listing.
struct Lister<'a> {
    tree: &'a Tree,
    long: bool,
    users: std::collections::HashMap<u32, String>,
    groups: std::collections::HashMap<u32, String>,
    now: i64,
}

impl Lister<'_> {
    /// Print entries `(dentry, name as shown)`; a directory listing gets its `total` line.
    fn print(
        &self,
        out: &mut impl Write,
        items: &[(DentryId, Vec<u8>)],
        total: bool,
    ) -> Result<()> {
        if !self.long {
            for (_, name) in items {
                writeln!(out, "{}", escaped(name))?;
            }
            return Ok(());
        }
        let rows: Vec<[String; 7]> = items
            .iter()
            .map(|(d, name)| {
                let inode = self.tree.inode_of(*d);
                let m = &inode.meta;
                let size = match m.kind {
                    Kind::Char | Kind::Block => format!("{}, {}", m.dev_major, m.dev_minor),
                    Kind::Dir => "0".into(),
                    _ => m.size.to_string(),
                };
                let mut shown = escaped(name);
                if let (Kind::Symlink, Some(l)) = (m.kind, &m.link) {
                    shown = format!("{shown} -> {}", escaped(l));
                }
                let who = |names: &std::collections::HashMap<u32, String>, id: u32| {
                    names.get(&id).cloned().unwrap_or_else(|| id.to_string())
                };
                [
                    mode_string(m.kind, m.mode),
                    inode.nlink.to_string(),
                    who(&self.users, m.uid),
                    who(&self.groups, m.gid),
                    size,
                    ls_time(m.mtime, self.now),
                    shown,
                ]
            })
            .collect();
        if total {
            let blocks: u64 = items
                .iter()
                .map(|(d, _)| {
                    let m = &self.tree.inode_of(*d).meta;
                    if m.kind == Kind::File {
                        m.size.div_ceil(1024)
                    } else {
                        0
                    }
                })
                .sum();
            writeln!(out, "total {blocks}")?;
        }
        let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
        let w: Vec<usize> = (0..5).map(width).collect();
        for r in &rows {
            writeln!(
                out,
                "{} {:>w1$} {:<w2$} {:<w3$} {:>w4$} {} {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4]
            )?;
        }
        Ok(())
    }
}

pub async fn ls(g: &Global, args: LsArgs) -> Result<()> {
    let view = std::sync::Arc::new(open_view(g, &args.image, &args.read).await?);
    // Reading the image's passwd may fetch by range, which waits on the runtime.
    tokio::task::spawn_blocking(move || list(&view, &args)).await?
}

fn list(view: &ImageView, args: &LsArgs) -> Result<()> {
    let tree = &view.tree;
    let long = args.long || args.numeric;
    let (users, groups) = if long && !args.numeric {
        (id_names(view, b"etc/passwd"), id_names(view, b"etc/group"))
    } else {
        Default::default()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let lister = Lister {
        tree,
        long,
        users,
        groups,
        now,
    };
    // As `ls`: the files named first, then each directory's contents.
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    for p in &args.paths {
        let raw = p.as_bytes();
        let norm = crate::index::normalize(raw)?;
        let shown = || escaped(raw);
        let d = if raw.ends_with(b"/") {
            tree.lookup_following(&norm)
                .map_err(|why| anyhow::anyhow!("{}: {why}", shown()))?
        } else {
            resolve(tree, p)?
        };
        if tree.inode_of(d).meta.kind == Kind::Dir {
            dirs.push((d, raw.to_vec()));
        } else {
            files.push((d, raw.to_vec()));
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    lister.print(&mut out, &files, false)?;
    let headers = args.recursive || args.paths.len() > 1;
    let mut first = files.is_empty();
    for (start, raw) in dirs {
        let mut stack = vec![(start, raw)];
        while let Some((dir, shown)) = stack.pop() {
            if headers {
                if !first {
                    writeln!(out)?;
                }
                writeln!(out, "{}:", escaped(&shown))?;
            }
            first = false;
            let children: Vec<(DentryId, Vec<u8>)> = tree
                .children(dir)
                .map(|c| (c, tree.dentries[c as usize].name.to_vec()))
                .collect();
            lister.print(&mut out, &children, true)?;
            if args.recursive {
                for (c, name) in children.iter().rev() {
                    if tree.inode_of(*c).meta.kind == Kind::Dir {
                        let mut p = shown.clone();
                        if !p.ends_with(b"/") {
                            p.push(b'/');
                        }
                        p.extend_from_slice(name);
                        stack.push((*c, p));
                    }
                }
            }
        }
    }
    Ok(out.flush()?)
}

pub async fn cat(g: &Global, args: CatArgs) -> Result<()> {
    let opts = ViewOptions {
        only_path: Some(crate::index::normalize(args.path.as_bytes())?),
        ..args.read.view_options(g)
    };
    let (_, _, view) = g.open_view(&args.image, &opts).await?;
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
