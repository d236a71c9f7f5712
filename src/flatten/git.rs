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
//!
//! The steps, one file each: `plan` (what each commit lists), `names` (paths as git takes
//! them), `process` (running git and fast-import), `objects` (blobs and commits written),
//! `index_file` (`.git/index`); this file runs them in order.

mod index_file;
mod names;
mod objects;
mod plan;
mod process;

use std::path::{Path, PathBuf};

use super::apply::{self, Warnings};
use crate::error::{IoContext, Result};
use crate::index::LayerIndex;
use crate::tree::{self, Tree};
use index_file::write_index;
use objects::{read_marks, write_blobs, write_commits};
use plan::{Plan, check_names};
use process::git;

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
