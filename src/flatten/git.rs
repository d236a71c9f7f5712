//! `imgfs pull --git`: the root filesystem as a git repository with one commit per layer, each
//! on top of the previous one, so that `git diff` shows what every layer changed. Commits are
//! deterministic (fixed author and dates), so the same image gives the same commit ids (the
//! same ids as the `git add`/`git commit` per layer this replaced). git itself records no
//! owners, xattrs, empty directories or device nodes; the work tree has them.
//!
//! How it is fast: no work tree per layer and no `git` process per step (which cost ten times
//! a plain pull on a Debian-like image). The merged tree of each layer prefix is listed first
//! (`Plan`), each staging file and symlink target becoming one blob. `git fast-import`
//! writes the blobs, one process per core, stored rather than deflated (`write_blobs` says
//! why); one more fast-import writes the commits on top, each as the paths that changed since
//! the one before. The work tree is the last tree, materialised once exactly as a plain pull
//! writes it, and the index is written here from the blob ids and the files' stat data, so
//! that `git status` starts clean without reading the files again.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use bstr::BString;

use super::apply::{self, Warnings};
use crate::error::{Error, IoContext, Result};
use crate::index::{Kind, LayerIndex};
use crate::tree::{self, Tree};

/// Who made the commits, and when: fixed, so that an image always gives the same commit ids.
const IDENT: &str = "imgfs <imgfs@localhost> 946684800 +0000";

fn git_command(repo: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(repo)
        .env("GIT_AUTHOR_NAME", "imgfs")
        .env("GIT_AUTHOR_EMAIL", "imgfs@localhost")
        .env("GIT_COMMITTER_NAME", "imgfs")
        .env("GIT_COMMITTER_EMAIL", "imgfs@localhost")
        .env("GIT_AUTHOR_DATE", "2000-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2000-01-01T00:00:00Z");
    c
}

fn git(repo: &Path, args: &[&str]) -> Result<()> {
    let out = git_command(repo)
        .args(args)
        .output()
        .ctx(|| "running git (is it installed?)".into())?;
    if !out.status.success() {
        return Err(Error::Io {
            context: format!("git {}", args.join(" ")),
            cause: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

/// Give the owner write permission on every directory under `dir` (not following symlinks),
/// so that a non-root user can empty directories an image made read-only.
pub fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !md.is_dir() {
        return;
    }
    let mode = md.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                make_writable(&e.path());
            }
        }
    }
}

/// Write a path as fast-import reads it: always C-style quoted, so that no byte of a name (a
/// newline, a leading quote, a byte that is not UTF-8) can end the command or change its
/// meaning. Bytes outside printable ASCII go as octal escapes, which fast-import turns back
/// into the same bytes.
fn quote(path: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    for &b in path {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b' '..=b'~' => out.push(b),
            _ => {
                let _ = write!(out, "\\{b:03o}");
            }
        }
    }
    out.push(b'"');
}

/// Whether `seg` is a name NTFS would open as `base` (git's `is_ntfs_dotgit` rule): `base` or
/// `short` in any case, followed only by dots and spaces, or by a `:stream` suffix.
fn ntfs_alias(seg: &[u8], base: &[u8], short: &[&[u8]]) -> bool {
    let rest = [base].iter().chain(short).find_map(|p| {
        (seg.len() >= p.len() && seg[..p.len()].eq_ignore_ascii_case(p)).then(|| &seg[p.len()..])
    });
    let Some(rest) = rest else {
        return false;
    };
    let end = rest.iter().position(|&b| b == b':').unwrap_or(rest.len());
    rest[..end].iter().all(|&b| b == b'.' || b == b' ')
}

/// Whether git refuses `name` as a component of a path it checks out or reads into its index
/// (git's `verify_path`, with `core.protectNTFS` on as it is by default): `.git` in any case
/// and the names NTFS reads as it — also after a backslash, a separator on NTFS — and, for a
/// symlink, `.gitmodules` likewise. fast-import records such paths without a word, so they
/// are refused before a commit holds one. A NUL byte cannot be in a git path at all.
fn git_refuses(name: &[u8], symlink: bool) -> bool {
    name.contains(&0)
        || name.split(|&b| b == b'\\').any(|seg| {
            ntfs_alias(seg, b".git", &[b"git~1"])
                || (symlink
                    && ntfs_alias(
                        seg,
                        b".gitmodules",
                        &[b"gitmod~1", b"gitmod~2", b"gitmod~3", b"gitmod~4"],
                    ))
        })
}

/// The file mode git records for a regular file: executable if its owner may execute it
/// (git's own rule, so that `git status` agrees with the work tree).
fn blob_mode(mode: u32) -> &'static str {
    if mode & 0o100 != 0 {
        "100755"
    } else {
        "100644"
    }
}

/// One `git fast-import` process.
struct FastImport {
    child: Child,
    /// `None` once closed.
    stdin: Option<BufWriter<ChildStdin>>,
    /// Collects fast-import's stderr, so that a failure can say what git said.
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// A reused line buffer.
    line: Vec<u8>,
    /// A reused buffer for file contents.
    buf: Vec<u8>,
}

impl FastImport {
    /// Start `git [-c CONFIG]... fast-import --quiet --done ARGS`.
    fn start(repo: &Path, config: &[&str], args: &[&std::ffi::OsStr]) -> Result<FastImport> {
        let mut cmd = git_command(repo);
        // Keep every pack, however few objects it has: fast-import would otherwise explode a
        // small one into loose objects, deflating it again (a writer may get one big blob).
        cmd.args(["-c", "fastimport.unpackLimit=0"]);
        for c in config {
            cmd.args(["-c", c]);
        }
        let mut child = cmd
            .args(["fast-import", "--quiet", "--done"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ctx(|| "running git fast-import (is git installed?)".into())?;
        let stdin = child
            .stdin
            .take()
            .map(|s| BufWriter::with_capacity(1 << 20, s));
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = e.read_to_end(&mut v);
                v
            })
        });
        Ok(FastImport {
            child,
            stdin,
            stderr,
            line: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// Close the stream, wait for fast-import, and say how it ended.
    fn close(&mut self) -> Result<()> {
        let flushed = match self.stdin.take() {
            Some(mut s) => s.flush(),
            None => Ok(()),
        };
        let status = self
            .child
            .wait()
            .ctx(|| "waiting for git fast-import".into())?;
        let said = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if !status.success() {
            return Err(Error::Io {
                context: "git fast-import".into(),
                cause: std::io::Error::other(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&said).trim()
                )),
            });
        }
        flushed.ctx(|| "writing to git fast-import".into())
    }

    /// A write to fast-import failed: most likely it stopped, and its own words say why.
    fn broken(&mut self, e: std::io::Error) -> Error {
        match self.close() {
            Err(said) => said,
            Ok(()) => Error::Io {
                context: "writing to git fast-import".into(),
                cause: e,
            },
        }
    }

    /// Send `bytes`.
    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self
            .stdin
            .as_mut()
            .expect("the stream is open until closed");
        out.write_all(bytes).map_err(|e| self.broken(e))
    }

    /// Send `self.line` and empty it.
    fn send_line(&mut self) -> Result<()> {
        let line = std::mem::take(&mut self.line);
        let r = self.send(&line);
        self.line = line;
        self.line.clear();
        r
    }

    /// Send one blob under `mark`.
    fn blob(&mut self, mark: u32, blob: &Blob) -> Result<()> {
        match blob {
            Blob::Link(target) => {
                let _ = writeln!(self.line, "blob\nmark :{mark}\ndata {}", target.len());
                self.line.extend_from_slice(target);
                self.line.push(b'\n');
                self.send_line()
            }
            Blob::File { path, .. } => {
                let f = std::fs::File::open(path).ctx(|| format!("reading {}", path.display()))?;
                let len = f
                    .metadata()
                    .ctx(|| format!("reading {}", path.display()))?
                    .len();
                let _ = writeln!(self.line, "blob\nmark :{mark}\ndata {len}");
                self.send_line()?;
                if self.buf.is_empty() {
                    self.buf = vec![0; 256 << 10];
                }
                let mut f = f.take(len);
                let mut sent = 0u64;
                loop {
                    let n = match f.read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e).ctx(|| format!("reading {}", path.display())),
                    };
                    let buf = std::mem::take(&mut self.buf);
                    let r = self.send(&buf[..n]);
                    self.buf = buf;
                    r?;
                    sent += n as u64;
                }
                if sent != len {
                    return Err(Error::Io {
                        context: format!("reading {}", path.display()),
                        cause: std::io::Error::other(format!(
                            "it ended after {sent} of {len} bytes"
                        )),
                    });
                }
                self.send(b"\n")
            }
        }
    }

    /// End the stream: fast-import writes its pack, the refs and the marks.
    fn finish(mut self) -> Result<()> {
        self.send(b"done\n")?;
        self.close()
    }
}

impl Drop for FastImport {
    /// On an error, fast-import sees the stream end without `done`, updates nothing and exits.
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.wait();
        }
    }
}

/// The content of one blob.
enum Blob {
    /// A staging file, `size` bytes long by the tree.
    File { path: PathBuf, size: u64 },
    /// A symlink's target.
    Link(BString),
}

impl Blob {
    fn size(&self) -> u64 {
        match self {
            Blob::File { size, .. } => *size,
            Blob::Link(t) => t.len() as u64,
        }
    }
}

/// Blobs bigger than this are streamed by fast-import rather than held in its memory.
const BIG_BLOB: u64 = 1 << 20;

/// What the commit of one layer prefix lists: (git file mode, blob mark, path).
type Listing = Vec<(&'static str, u32, BString)>;

/// The blobs of every commit, each once, and each commit's listing.
#[derive(Default)]
struct Plan {
    /// Blob `i` gets mark `i + 1`.
    blobs: Vec<Blob>,
    files: HashMap<(u32, u32), u32>,
    links: HashMap<BString, u32>,
    commits: Vec<Listing>,
}

impl Plan {
    fn add(&mut self, blob: Blob) -> u32 {
        self.blobs.push(blob);
        self.blobs.len() as u32
    }

    /// Add the commit of tree `t`.
    fn commit(&mut self, t: &Tree, staging: &[PathBuf]) {
        let mut listing = Vec::new();
        for d in t.walk() {
            let inode = t.inode_of(d);
            let (mode, mark) = match inode.meta.kind {
                Kind::File => {
                    let data = inode.data.expect("regular files have data");
                    let key = (data.layer, data.entry);
                    let mark = match self.files.get(&key) {
                        Some(&m) => m,
                        None => {
                            let m = self.add(Blob::File {
                                path: staging[data.layer as usize].join(data.entry.to_string()),
                                size: inode.meta.size,
                            });
                            self.files.insert(key, m);
                            m
                        }
                    };
                    (blob_mode(inode.meta.mode), mark)
                }
                Kind::Symlink => {
                    let target = inode.meta.link.clone().unwrap_or_default();
                    let mark = match self.links.get(&target) {
                        Some(&m) => m,
                        None => {
                            let m = self.add(Blob::Link(target.clone()));
                            self.links.insert(target, m);
                            m
                        }
                    };
                    ("120000", mark)
                }
                // Directories are implied by their files; git has no devices or fifos.
                _ => continue,
            };
            listing.push((mode, mark, t.path(d)));
        }
        self.commits.push(listing);
    }
}

/// Refuse a tree holding a path git would not check out.
fn check_names(t: &Tree) -> Result<()> {
    for d in t.walk() {
        let symlink = t.inode_of(d).meta.kind == Kind::Symlink;
        if git_refuses(&t.dentries[d as usize].name, symlink) {
            return Err(Error::Unsupported {
                what: "image for --git (it holds a path git refuses to record: a .git of its \
                       own, or a name NTFS would read as one)"
                    .into(),
                value: t.path(d).to_string(),
            });
        }
    }
    Ok(())
}

/// Write every blob of `plan` into `repo`, in parallel: one fast-import per core (it is one
/// thread), each given about the same number of bytes. Blobs are stored, not deflated: even
/// zlib's fastest level costs more than hashing (BENCHMARKS.md, `pull --git`). The work tree
/// holds the same bytes uncompressed anyway, and `git gc` compresses the repository when
/// its size matters more than the pull's time. Each writer leaves its pack and a marks file;
/// returns the marks files.
fn write_blobs(repo: &Path, plan: &Plan) -> Result<Vec<PathBuf>> {
    let writers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    // Biggest first, each to the writer with the fewest bytes so far.
    let mut order: Vec<u32> = (1..=plan.blobs.len() as u32).collect();
    order.sort_by_key(|&m| std::cmp::Reverse(plan.blobs[m as usize - 1].size()));
    let mut jobs: Vec<Vec<u32>> = vec![Vec::new(); writers];
    let mut load = vec![0u64; writers];
    for m in order {
        let w = (0..writers).min_by_key(|&w| load[w]).expect("one writer");
        load[w] += plan.blobs[m as usize - 1].size();
        jobs[w].push(m);
    }
    // In mark order within a writer: staging files in the order they were written.
    for j in &mut jobs {
        j.sort_unstable();
    }
    let git_dir = std::path::absolute(repo.join(".git")).ctx(|| "finding the repository".into())?;
    std::thread::scope(|s| {
        let writers: Vec<_> = jobs
            .iter()
            .enumerate()
            .filter(|(_, marks)| !marks.is_empty())
            .map(|(w, marks)| {
                let out = git_dir.join(format!("imgfs-marks-{w}"));
                s.spawn(move || {
                    let mut export = std::ffi::OsString::from("--export-marks=");
                    export.push(&out);
                    // No deltas: blobs come in no order that would make them pay, and trying
                    // costs as much as the rest of the import.
                    let mut fi = FastImport::start(
                        repo,
                        &["pack.compression=0"],
                        &[
                            "--depth=0".as_ref(),
                            format!("--big-file-threshold={BIG_BLOB}").as_ref(),
                            &export,
                        ],
                    )?;
                    for &m in marks {
                        fi.blob(m, &plan.blobs[m as usize - 1])?;
                    }
                    fi.finish()?;
                    tracing::debug!("git: blob writer {w} done");
                    Ok::<_, Error>(out)
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|h| h.join().expect("a blob writer panicked"))
            .collect()
    })
}

/// Write the commits of `plan` onto its blobs (marked in `marks`): one on `main` per layer,
/// each on the one before, and a branch for each.
fn write_commits(repo: &Path, plan: &Plan, marks: &[PathBuf], names: &[String]) -> Result<()> {
    let args: Vec<std::ffi::OsString> = marks
        .iter()
        .map(|m| {
            let mut a = std::ffi::OsString::from("--import-marks=");
            a.push(m);
            a
        })
        .collect();
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    // fast-import looks up every imported mark in the blob writers' packs, touching a page
    // of each: small pack windows under a small limit keep that from holding the packs'
    // size in memory (384 MB peak against 153 MB on a Debian-like image, at the same speed).
    let mut fi = FastImport::start(
        repo,
        &["core.packedGitWindowSize=1m", "core.packedGitLimit=32m"],
        &args,
    )?;
    let n = plan.commits.len();
    let first = plan.blobs.len() as u32 + 1;
    // The previous commit's paths, with their mode and blob.
    let mut before: Option<HashMap<&[u8], (&str, u32)>> = None;
    for (i, listing) in plan.commits.iter().enumerate() {
        let k = i + 1;
        let digest = &names[i];
        let short = digest
            .trim_start_matches("sha256:")
            .get(..12)
            .unwrap_or(digest);
        // `git commit -m` ends the message with a newline; so does this, for the same ids.
        let message = format!("layer {k}/{n}: {digest}\n");
        let mark = first + i as u32;
        let _ = write!(
            fi.line,
            "commit refs/heads/main\nmark :{mark}\nauthor {IDENT}\ncommitter {IDENT}\n\
             data {}\n{message}",
            message.len()
        );
        if i > 0 {
            let _ = writeln!(fi.line, "from :{}", mark - 1);
        }
        // Only what changed since the commit before: fast-import's cost per path listed grows
        // with the size of its directory, and a layer changes few of the image's paths.
        // Deletions first, so that a path that turns from a directory into a file, or back,
        // is cleared before it is set. fast-import drops directories left empty.
        let now: HashMap<&[u8], (&str, u32)> = listing
            .iter()
            .map(|(mode, blob, path)| (path.as_slice(), (*mode, *blob)))
            .collect();
        if let Some(prev) = &before {
            for path in prev.keys().filter(|p| !now.contains_key(*p)) {
                fi.line.extend_from_slice(b"D ");
                quote(path, &mut fi.line);
                fi.line.push(b'\n');
            }
        }
        for (mode, blob, path) in listing {
            if before.as_ref().and_then(|b| b.get(path.as_slice())) == Some(&(*mode, *blob)) {
                continue;
            }
            let _ = write!(fi.line, "M {mode} :{blob} ");
            quote(path, &mut fi.line);
            fi.line.push(b'\n');
            if fi.line.len() > 64 << 10 {
                fi.send_line()?;
            }
        }
        before = Some(now);
        let _ = write!(
            fi.line,
            "\nreset refs/heads/layer-{k}-{short}\nfrom :{mark}\n\n"
        );
        fi.send_line()?;
    }
    fi.finish()
}

/// Read fast-import's marks files: the object id of each blob mark `1..=count`, by position.
fn read_marks(files: &[PathBuf], count: usize) -> Result<Vec<[u8; 20]>> {
    let mut ids = vec![None; count];
    for f in files {
        let text = std::fs::read_to_string(f).ctx(|| format!("reading {}", f.display()))?;
        for line in text.lines() {
            let parsed = line
                .strip_prefix(':')
                .and_then(|l| l.split_once(' '))
                .and_then(|(m, id)| {
                    let m: usize = m.parse().ok()?;
                    let mut raw = [0u8; 20];
                    hex::decode_to_slice(id, &mut raw).ok()?;
                    Some((m, raw))
                });
            match parsed {
                Some((m, id)) if (1..=count).contains(&m) => ids[m - 1] = Some(id),
                _ => {
                    return Err(Error::malformed(
                        "git fast-import marks",
                        format!("line {line:?} of {}", f.display()),
                    ));
                }
            }
        }
    }
    ids.into_iter()
        .enumerate()
        .map(|(i, id)| {
            id.ok_or_else(|| {
                Error::malformed(
                    "git fast-import marks",
                    format!("blob mark {} missing", i + 1),
                )
            })
        })
        .collect()
}

/// Write git's index (`.git/index`, format version 2, gitformat-index(5)) for the work tree
/// at `root`, which holds `listing` (the last commit): each entry's object id from
/// fast-import, its stat data from the file just written. This is what `git reset` would
/// write, without hashing every file of the work tree again — a fifth of a plain pull's time
/// on a Debian-like image. The stat data makes `git status` trust the files as they are.
fn write_index(
    root: &Path,
    listing: &[(&'static str, u32, BString)],
    ids: &[[u8; 20]],
) -> Result<()> {
    use sha1::Digest as _;
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<&(&'static str, u32, BString)> = listing.iter().collect();
    // git orders entries by their path's bytes.
    entries.sort_unstable_by(|a, b| a.2.cmp(&b.2));
    let mut out = Vec::with_capacity(12 + entries.len() * 100);
    out.extend_from_slice(b"DIRC");
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (mode, mark, path) in entries {
        let p = root.join(crate::index::as_path(path));
        let md = std::fs::symlink_metadata(&p).ctx(|| format!("reading {}", p.display()))?;
        let mode: u32 = match *mode {
            "100755" => 0o100755,
            "120000" => 0o120000,
            _ => 0o100644,
        };
        // git keeps the low 32 bits of each of these.
        for field in [
            md.ctime() as u32,
            md.ctime_nsec() as u32,
            md.mtime() as u32,
            md.mtime_nsec() as u32,
            md.dev() as u32,
            md.ino() as u32,
            mode,
            md.uid(),
            md.gid(),
            md.size() as u32,
        ] {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out.extend_from_slice(&ids[*mark as usize - 1]);
        // Stage 0; the name's length, or 0xfff for "longer".
        out.extend_from_slice(&(path.len().min(0xfff) as u16).to_be_bytes());
        out.extend_from_slice(path);
        // 1 to 8 NULs, so that the entry (62 bytes and the name) ends on a multiple of 8.
        let len = 62 + path.len();
        out.resize(out.len() + (len + 8) / 8 * 8 - len, 0);
    }
    let sum = sha1::Sha1::digest(&out);
    out.extend_from_slice(&sum);
    // As git does: written aside, renamed into place.
    let lock = root.join(".git/index.lock");
    std::fs::write(&lock, &out).ctx(|| format!("writing {}", lock.display()))?;
    std::fs::rename(&lock, root.join(".git/index")).ctx(|| "writing .git/index".into())
}

/// Make `root` (which must not exist) a git repository with one commit per layer of
/// `indexes`, its work tree `last` (the merge of all of them) with files moved from `staging`.
pub fn commit_layers(
    indexes: &[LayerIndex],
    names: &[String],
    staging: &[PathBuf],
    last: &Tree,
    root: &Path,
    w: &Warnings,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut plan = Plan::default();
    let n = indexes.len();
    for k in 1..=n {
        let merged;
        let t = if k == n {
            last
        } else {
            let refs: Vec<&LayerIndex> = indexes[..k].iter().collect();
            merged = tree::merge(&refs, names)?;
            &merged
        };
        check_names(t)?;
        plan.commit(t, staging);
    }
    tracing::info!(
        "git: {} commits of {} blobs planned in {:.2?}",
        n,
        plan.blobs.len(),
        started.elapsed()
    );

    // The repository is made beside the work tree, which `materialize` wants to create, and
    // moved into it at the end.
    let repo = root.with_extension("git");
    std::fs::create_dir(&repo).ctx(|| format!("creating {}", repo.display()))?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    // Record the image's bytes as they are: no line-ending or filter rules, whatever
    // .gitattributes the image ships (git compares work tree files through them).
    git(&repo, &["config", "core.autocrlf", "false"])?;
    std::fs::write(
        repo.join(".git/info/attributes"),
        "* -text -eol -filter -ident -working-tree-encoding -diff -merge\n",
    )
    .ctx(|| "writing .git/info/attributes".into())?;
    let marks = write_blobs(&repo, &plan)?;
    tracing::info!("git: blobs written in {:.2?}", started.elapsed());
    write_commits(&repo, &plan, &marks, names)?;
    let ids = read_marks(&marks, plan.blobs.len())?;
    for m in &marks {
        std::fs::remove_file(m).ctx(|| format!("removing {}", m.display()))?;
    }
    tracing::info!("git: commits written in {:.2?}", started.elapsed());

    apply::materialize(last, staging, root, w)?;
    let dotgit = root.join(".git");
    with_writable(root, || std::fs::rename(repo.join(".git"), &dotgit))
        .ctx(|| format!("moving the repository to {}", dotgit.display()))?;
    std::fs::remove_dir(&repo).ctx(|| format!("removing {}", repo.display()))?;
    tracing::info!("git: work tree written in {:.2?}", started.elapsed());
    let listing = plan.commits.last().map_or(&[][..], |l| &l[..]);
    write_index(root, listing, &ids)?;
    tracing::info!("git: index written in {:.2?}", started.elapsed());
    Ok(())
}

/// Run `f` with `dir` writable by its owner: a non-root user cannot add to a directory the
/// image made read-only otherwise. Its mode is put back after.
fn with_writable(dir: &Path, f: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::symlink_metadata(dir)?.permissions().mode();
    if rustix::process::geteuid().is_root() || mode & 0o300 == 0o300 {
        return f();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o300))?;
    let r = f();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7777))?;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_so_that_every_byte_survives() {
        let mut out = Vec::new();
        quote(b"a b\n\"c\\d\xff\x7f\te", &mut out);
        assert_eq!(out, b"\"a b\\012\\\"c\\\\d\\377\\177\\011e\"");
    }

    #[test]
    fn names_git_would_not_record_are_known() {
        for bad in [
            &b".git"[..],
            b".GIT",
            b".Git. .",
            b"git~1",
            b".git:stream",
            b"a\\.git",
            b"x\0y",
        ] {
            assert!(git_refuses(bad, false), "{:?}", BString::from(bad));
        }
        assert!(git_refuses(b".gitmodules", true));
        assert!(git_refuses(b".GitModules ", true));
        for good in [
            &b".gitignore"[..],
            b".gitx",
            b"git",
            b"git~2",
            b"a.git",
            b"a\\b",
            b"\xff\n\"",
        ] {
            assert!(!git_refuses(good, false), "{:?}", BString::from(good));
        }
        assert!(!git_refuses(b".gitmodules", false));
    }
}
