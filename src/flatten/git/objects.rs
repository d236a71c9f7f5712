//! Writing a plan's objects with `git fast-import`: the blobs by one process per core,
//! stored rather than deflated, then the commits by one more on top of their marks, each
//! commit listing only what changed since the one before; and reading the blob ids back
//! from the marks files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::names::quote;
use super::plan::{Listing, Plan};
use super::process::FastImport;
use crate::error::{Error, IoContext, Result};

/// Who made the commits, and when: fixed, so that an image always gives the same commit ids.
const IDENT: &str = "imgfs <imgfs@localhost> 946684800 +0000";

/// Blobs bigger than this are streamed by fast-import rather than held in its memory.
const BIG_BLOB: u64 = 1 << 20;

/// Write every blob of `plan` into `repo`, in parallel: one fast-import per core (it is one
/// thread), each given about the same number of bytes. Blobs are stored, not deflated: even
/// zlib's fastest level costs more than hashing (BENCHMARKS.md, `pull --git`). The work tree
/// holds the same bytes uncompressed anyway, and `git gc` compresses the repository when
/// its size matters more than the pull's time. Each writer leaves its pack and a marks file;
/// returns the marks files.
pub(super) fn write_blobs(repo: &Path, plan: &Plan) -> Result<Vec<PathBuf>> {
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
pub(super) fn write_commits(
    repo: &Path,
    plan: &Plan,
    marks: &[PathBuf],
    names: &[String],
) -> Result<()> {
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
    let mut before: Option<Paths> = None;
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
        before = Some(send_changes(&mut fi, before.as_ref(), listing)?);
        let _ = write!(
            fi.line,
            "\nreset refs/heads/layer-{k}-{short}\nfrom :{mark}\n\n"
        );
        fi.send_line()?;
    }
    fi.finish()
}

/// A commit's paths, each with its git mode and blob mark.
type Paths<'a> = HashMap<&'a [u8], (&'static str, u32)>;

/// Send the file commands of the commit listing `listing`: only what changed since the
/// commit `before` (none for the first). fast-import's cost per path listed grows with the
/// size of its directory, and a layer changes few of the image's paths. Returns the
/// commit's paths, for the next one.
fn send_changes<'a>(
    fi: &mut FastImport,
    before: Option<&Paths<'a>>,
    listing: &'a Listing,
) -> Result<Paths<'a>> {
    // Deletions first, so that a path that turns from a directory into a file, or back,
    // is cleared before it is set. fast-import drops directories left empty.
    let now: Paths = listing
        .iter()
        .map(|(mode, blob, path)| (path.as_slice(), (*mode, *blob)))
        .collect();
    if let Some(prev) = before {
        for path in prev.keys().filter(|p| !now.contains_key(*p)) {
            fi.line.extend_from_slice(b"D ");
            quote(path, &mut fi.line);
            fi.line.push(b'\n');
        }
    }
    for (mode, blob, path) in listing {
        if before.and_then(|b| b.get(path.as_slice())) == Some(&(*mode, *blob)) {
            continue;
        }
        let _ = write!(fi.line, "M {mode} :{blob} ");
        quote(path, &mut fi.line);
        fi.line.push(b'\n');
        if fi.line.len() > 64 << 10 {
            fi.send_line()?;
        }
    }
    Ok(now)
}

/// Read fast-import's marks files: the object id of each blob mark `1..=count`, by position.
pub(super) fn read_marks(files: &[PathBuf], count: usize) -> Result<Vec<[u8; 20]>> {
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
