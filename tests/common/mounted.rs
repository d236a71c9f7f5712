//! A mount made by the `imgfs` binary, for the mount suites: unmounted when dropped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::imgfs_ok;

/// A mount that is unmounted (and its daemon waited for) when dropped.
pub struct Mounted {
    pub dir: PathBuf,
    pub pid: i32,
}

impl Mounted {
    pub fn new(cache: &Path, image: &str, dir: &Path, extra: &[&str]) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = vec!["mount", image, dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = imgfs_ok(cache, &args);
        Mounted {
            dir: dir.to_path_buf(),
            pid: out.trim().parse().expect("mount prints the daemon's pid"),
        }
    }

    pub fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .unwrap_or_default()
                .contains(") Z ")
    }

    /// `imgfs umount`, then wait for the mount and its daemon to be gone.
    pub fn unmount(&self, cache: &Path) {
        imgfs_ok(cache, &["umount", self.dir.to_str().unwrap()]);
        self.wait_gone();
    }

    pub fn wait_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.alive() || is_mounted(&self.dir)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !is_mounted(&self.dir),
            "still mounted: {}",
            self.dir.display()
        );
        assert!(!self.alive(), "daemon {} still running", self.pid);
    }
}

impl Drop for Mounted {
    /// After a failed test readers may still hold files open: detach lazily and stop the
    /// daemon, so that no mount or process outlives the test.
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
        if self.alive() {
            let _ = std::process::Command::new("kill")
                .arg("-9")
                .arg(self.pid.to_string())
                .status();
        }
    }
}

/// Is `dir` a mount point now?
pub fn is_mounted(dir: &Path) -> bool {
    let canon = dir.canonicalize().unwrap_or(dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}
