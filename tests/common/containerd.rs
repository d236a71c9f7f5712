//! A containerd daemon of a test's own (temporary root, state and socket; the CRI plugin off),
//! driven by `ctr-remote`, stargz-snapshotter's client: the tests' eStargz and zstd:chunked
//! producer that is not ours.

use std::time::{Duration, Instant};

/// The daemon, killed when dropped.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: std::process::Child,
}

impl Containerd {
    pub fn start() -> Containerd {
        Containerd::start_with("")
    }

    /// With `extra` appended to the config (a proxy plugin, say).
    pub fn start_with(extra: &str) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{0}/sock\"\n{1}",
                d.display(),
                extra
            ),
        )
        .unwrap();
        let child = std::process::Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdout(std::fs::File::create(d.join("log")).unwrap())
            .stderr(std::fs::File::create(d.join("err")).unwrap())
            .spawn()
            .expect("containerd (Debian containerd) is installed by scripts/test");
        let c = Containerd { dir, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// The daemon's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("err")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new("ctr-remote")
            .arg("-a")
            .arg(self.dir.path().join("sock"))
            .args(args)
            .output()
            .expect("ctr-remote (Debian stargz-snapshotter) is installed by scripts/test")
    }

    /// Run a ctr-remote command that must succeed. Retried: once in a dozen runs here a
    /// command failed right after the daemon came up (the error is printed); these commands
    /// are idempotent.
    pub fn ctr_ok(&self, args: &[&str]) {
        let mut out = self.ctr(args);
        for _ in 0..2 {
            if out.status.success() {
                break;
            }
            eprintln!(
                "ctr-remote {args:?} failed, retrying: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
            out = self.ctr(args);
        }
        assert!(
            out.status.success(),
            "ctr-remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
