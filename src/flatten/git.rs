//! `imgfs pull --git`: the root filesystem as a git repository with one commit per layer, each
//! on top of the previous one, so that `git diff` shows what every layer changed. Commits are
//! deterministic (fixed author and dates), so the same image gives the same commit ids.
//! git itself records no owners, xattrs or device nodes; the work tree has them.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::apply::{self, Place, Warnings};
use crate::error::{Error, IoContext, Result};
use crate::index::LayerIndex;
use crate::tree;

fn git(repo: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_AUTHOR_NAME", "imgfs")
        .env("GIT_AUTHOR_EMAIL", "imgfs@localhost")
        .env("GIT_COMMITTER_NAME", "imgfs")
        .env("GIT_COMMITTER_EMAIL", "imgfs@localhost")
        .env("GIT_AUTHOR_DATE", "2000-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2000-01-01T00:00:00Z")
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

/// Empty `dir` but for `.git`.
fn clear(dir: &Path) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        make_writable(dir);
    }
    for e in std::fs::read_dir(dir).ctx(|| format!("reading {}", dir.display()))? {
        let e = e.ctx(|| format!("reading {}", dir.display()))?;
        if e.file_name() == ".git" {
            continue;
        }
        let p = e.path();
        let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.ctx(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

/// Build the tree as of each layer in turn at `root`, committing after each.
pub fn commit_layers(
    indexes: &[LayerIndex],
    names: &[String],
    staging: &[PathBuf],
    root: &Path,
    w: &Warnings,
) -> Result<()> {
    let work = root.with_extension("next");
    std::fs::create_dir(root).ctx(|| format!("creating {}", root.display()))?;
    git(root, &["init", "-q", "-b", "main"])?;
    // Record the image's bytes as they are: no line-ending or filter rules, whatever
    // .gitattributes the image ships; and every file, whatever .gitignore it ships.
    git(root, &["config", "core.autocrlf", "false"])?;
    std::fs::write(
        root.join(".git/info/attributes"),
        "* -text -eol -filter -ident -working-tree-encoding -diff -merge\n",
    )
    .ctx(|| "writing .git/info/attributes".into())?;
    for k in 1..=indexes.len() {
        let refs: Vec<&LayerIndex> = indexes[..k].iter().collect();
        let t = tree::merge(&refs, names)?;
        if let Some(d) = t
            .walk()
            .into_iter()
            .find(|&d| t.dentries[d as usize].name == ".git")
        {
            return Err(Error::Unsupported {
                what: "image for --git (it contains a .git of its own, which git cannot record)"
                    .into(),
                value: t.path(d).to_string(),
            });
        }
        // Materialise next to the repository, then swap the contents in: `materialize`
        // wants a fresh directory, and the repository must stay.
        apply::materialize(&t, staging, &work, Place::Link, w)?;
        clear(root)?;
        for e in std::fs::read_dir(&work).ctx(|| format!("reading {}", work.display()))? {
            let e = e.ctx(|| format!("reading {}", work.display()))?;
            std::fs::rename(e.path(), root.join(e.file_name()))
                .ctx(|| format!("moving {}", e.path().display()))?;
        }
        std::fs::remove_dir(&work).ctx(|| format!("removing {}", work.display()))?;
        let digest = &names[k - 1];
        let short = digest
            .trim_start_matches("sha256:")
            .get(..12)
            .unwrap_or(digest);
        git(root, &["add", "-A", "-f"])?;
        git(
            root,
            &[
                "commit",
                "-q",
                "--allow-empty",
                "-m",
                &format!("layer {k}/{}: {digest}", indexes.len()),
            ],
        )?;
        git(root, &["branch", &format!("layer-{k}-{short}")])?;
    }
    Ok(())
}
