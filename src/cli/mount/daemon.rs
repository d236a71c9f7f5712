//! The mount daemon's two ends. The parent (`imgfs mount` without `--foreground`) starts this
//! same program again with `--foreground` in a new session, its output going to a log in the
//! cache directory named after its pid, and waits on an inherited socket: progress lines, then
//! "ready" once the mount is up, or the end of the stream if the daemon dies first. The daemon
//! writes those lines through [`Parent`], and removes its log at exit if nothing was logged.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

use crate::cli::Global;

/// The environment variable that hands the daemon its end of the socket.
const READY_FD: &str = "IMGFS_READY_FD";

/// Run the daemon and wait until its filesystem is up on `dir` (or the daemon has failed);
/// then say `what` is on `dir` ("IMAGE mounted", "layer store").
pub(in crate::cli) async fn spawn(g: &Global, what: &str, dir: &Path) -> Result<()> {
    let logs = g.cache()?.root().join("logs");
    std::fs::create_dir_all(&logs)?;
    let (mut child, log_path, parent_end) = start(&logs)?;
    if wait_ready(parent_end).await? && super::is_mount_point(dir) {
        println!("{}", child.id());
        eprintln!(
            "imgfs: {what} on {} (daemon {}, log {})",
            dir.display(),
            child.id(),
            log_path.display()
        );
        return Ok(());
    }
    let status = child.wait()?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let msg = last.strip_prefix("imgfs: ").unwrap_or(last);
    bail!("the mount daemon failed ({status}): {msg}");
}

/// Start the daemon with its output in a log under `logs`. Returns it, its log (named after
/// it once it has a pid; the open file follows the rename) and the parent's end of the
/// socket.
fn start(logs: &Path) -> Result<(Child, PathBuf, UnixStream)> {
    let starting = logs.join(format!("mount-starting-{}.log", std::process::id()));
    let log = std::fs::File::create(&starting)?;
    let (parent_end, child_end) = UnixStream::pair()?;
    let mut cmd = daemon_command(log, &child_end)?;
    let spawned = cmd.spawn().context("starting the mount daemon");
    let log_path = match &spawned {
        Ok(child) => {
            let named = daemon_log(logs, child.id());
            std::fs::rename(&starting, &named)?;
            named
        }
        Err(_) => starting,
    };
    let child = spawned?;
    // Only the daemon holds its end now, so the stream ends when the daemon does.
    drop(child_end);
    Ok((child, log_path, parent_end))
}

/// This program's command line again, with `--foreground`, in a new session, output to
/// `log`, and `child_end` inherited (named in `IMGFS_READY_FD`).
fn daemon_command(log: std::fs::File, child_end: &UnixStream) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    let argv = crate::cli::ARGS
        .get()
        .cloned()
        .unwrap_or_else(|| std::env::args_os().collect());
    cmd.args(argv.iter().skip(1))
        .arg("--foreground")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| rustix::process::setsid().map(|_| ()).map_err(Into::into));
    }
    let child_fd = std::os::fd::AsRawFd::as_raw_fd(child_end);
    cmd.env(READY_FD, child_fd.to_string());
    // SAFETY: only async-signal-safe calls (fcntl) on a descriptor we own.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(child_fd);
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty()).map_err(Into::into)
        });
    }
    Ok(cmd)
}

/// Read the daemon's lines until "ready" (true) or the end of the stream (false), showing
/// its progress to a person only.
async fn wait_ready(parent_end: UnixStream) -> Result<bool> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(&parent_end).lines() {
            let Ok(line) = line else { return false };
            if line == "ready" {
                return true;
            }
            if let Some(p) = line.strip_prefix("progress ")
                && terminal
            {
                eprintln!("imgfs: {p}");
            }
        }
        false
    })
    .await?;
    Ok(ready)
}

/// The log of the mount daemon with process id `pid`.
fn daemon_log(logs: &Path, pid: u32) -> PathBuf {
    logs.join(format!("mount-{pid}.log"))
}

/// The daemon's end of the socket its parent waits on. Shared: the progress of indexing and
/// the "ready" both go through it.
#[derive(Clone)]
pub(in crate::cli) struct Parent(Arc<Mutex<std::fs::File>>);

impl Parent {
    /// The socket the parent passed, if this process is a mount daemon.
    pub(in crate::cli) fn from_env() -> Option<Parent> {
        std::env::var(READY_FD)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map(|fd| {
                use std::os::fd::FromRawFd;
                // SAFETY: the parent passed us this descriptor, and nothing else owns it.
                Parent(Arc::new(Mutex::new(unsafe {
                    std::fs::File::from_raw_fd(fd)
                })))
            })
    }

    /// Send one line; a parent that stopped listening is ignored.
    pub(in crate::cli) fn say(&self, line: &str) {
        use std::io::Write;
        let _ = writeln!(self.0.lock().unwrap(), "{line}");
    }
}

/// At a daemon's exit: a daemon that had nothing to say leaves no log behind.
pub(in crate::cli) fn remove_empty_log(g: &Global) {
    if std::env::var_os(READY_FD).is_some()
        && let Ok(cache) = g.cache()
    {
        let log = daemon_log(&cache.root().join("logs"), std::process::id());
        if std::fs::metadata(&log).is_ok_and(|m| m.len() == 0) {
            let _ = std::fs::remove_file(&log);
        }
    }
}
