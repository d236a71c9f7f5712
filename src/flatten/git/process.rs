//! Running git: a command with the fixed identity and dates that make commit ids
//! deterministic, and one `git fast-import` process fed through a buffer, whose own words
//! (its stderr) become the error when it stops.

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use super::plan::Blob;
use crate::error::{Error, IoContext, Result};

pub(super) fn git_command(repo: &Path) -> Command {
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

pub(super) fn git(repo: &Path, args: &[&str]) -> Result<()> {
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

/// One `git fast-import` process.
pub(super) struct FastImport {
    child: Child,
    /// `None` once closed.
    stdin: Option<BufWriter<ChildStdin>>,
    /// Collects fast-import's stderr, so that a failure can say what git said.
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    /// A reused line buffer.
    pub(super) line: Vec<u8>,
    /// A reused buffer for file contents.
    buf: Vec<u8>,
}

impl FastImport {
    /// Start `git [-c CONFIG]... fast-import --quiet --done ARGS`.
    pub(super) fn start(
        repo: &Path,
        config: &[&str],
        args: &[&std::ffi::OsStr],
    ) -> Result<FastImport> {
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
    pub(super) fn send_line(&mut self) -> Result<()> {
        let line = std::mem::take(&mut self.line);
        let r = self.send(&line);
        self.line = line;
        self.line.clear();
        r
    }

    /// Send one blob under `mark`.
    pub(super) fn blob(&mut self, mark: u32, blob: &Blob) -> Result<()> {
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
    pub(super) fn finish(mut self) -> Result<()> {
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
