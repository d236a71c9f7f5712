//! What a new user meets first: a shared mount that enforces the image's permissions (checked
//! as a second user), `umount` that touches only imgfs mounts, an interrupted pull that leaves
//! nothing, and `ls -l` and a mount that look like a real filesystem.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::layers::Tar;
use common::mounted::{Mounted, is_mounted};
use common::proxy::{Fault, Proxy};
use common::*;

/// A uid and gid no image file here belongs to.
const STRANGER: &str = "54321";

/// A small system image: shadow and root's home protected, a symlink, users by name.
fn system_image(repo: &str) -> String {
    let reg = registry();
    let base = Tar::new()
        .dir("./", 0o755)
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .file(
            "etc/group",
            0o644,
            b"root:x:0:\nshadow:x:42:\nalice:x:1000:\n",
        )
        .owned_file("etc/shadow", 0o640, 0, 42, b"root:*:19000:0:99999:7:::\n")
        .dir("root", 0o700)
        .file("root/secret", 0o600, b"private\n")
        .owned_file("home-file", 0o644, 1000, 1000, b"alice's\n")
        .symlink("passwd-link", "etc/passwd")
        .symlink("etc-link", "etc")
        .bytes();
    FixtureImage::new("amd64", vec![FixtureLayer::from_tar(base)]).push(&reg.host, repo, "v1");
    format!("{}/{repo}:v1", reg.host)
}

/// A command run as the stranger (`setpriv`: no user entry needed, unless a tool wants one).
fn stranger(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid",
        STRANGER,
        "--regid",
        STRANGER,
        "--clear-groups",
        "--",
    ])
    .arg(program);
    c
}

/// Run a command as the stranger; whether it succeeded.
fn as_stranger(args: &[&str]) -> bool {
    stranger(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// `test -x PATH` as root.
fn executable(path: &str) -> bool {
    Command::new("test")
        .args(["-x", path])
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_shared_mount_enforces_the_images_permissions() {
    let image = system_image("first/perms");
    let work = tempfile::tempdir().unwrap();
    // The stranger must be able to reach the mount point.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mnt = work.path().join("mnt");
    let cache = work.path().join("cache");
    let m = Mounted::new(&cache, &image, &mnt, &["-o", "allow_other"]);
    let p = |rel: &str| mnt.join(rel).to_str().unwrap().to_string();
    let readable = as_stranger(&["cat", &p("etc/passwd")]);
    let shadow = as_stranger(&["cat", &p("etc/shadow")]);
    let root_dir = as_stranger(&["ls", &p("root")]);
    let secret = as_stranger(&["cat", &p("root/secret")]);
    let exec = as_stranger(&["test", "-x", &p("etc/passwd")]);
    let root_exec = executable(&p("etc/passwd"));
    m.unmount(&cache);
    assert!(readable, "a world-readable file is readable");
    assert!(!shadow, "another user reads etc/shadow (0640 root:shadow)");
    assert!(!root_dir, "another user lists root/ (0700)");
    assert!(!secret, "another user reads root/secret");
    assert!(!exec, "etc/passwd (0644) is executable for another user");
    assert!(!root_exec, "etc/passwd (0644) is executable for root");

    // The owner's own mount shows what the image's root sees, and answers access() alike.
    let m = Mounted::new(&cache, &image, &mnt, &[]);
    let owner_exec = executable(&p("etc/passwd"));
    let owner_dir = executable(&p("root"));
    m.unmount(&cache);
    assert!(!owner_exec && owner_dir, "{owner_exec} {owner_dir}");
}

#[test]
fn umount_takes_down_only_imgfs_mounts_and_says_when_one_is_busy() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let tmpfs = work.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "none"])
        .arg(&tmpfs)
        .status()
        .unwrap();
    assert!(st.success());
    let err = imgfs_err(&cache, &["umount", tmpfs.to_str().unwrap()]);
    let still = is_mounted(&tmpfs);
    Command::new("umount").arg(&tmpfs).status().unwrap();
    assert!(
        err.contains("not an imgfs mount") && err.contains("tmpfs"),
        "{err}"
    );
    assert!(still, "the tmpfs was unmounted");

    let image = system_image("first/umount");
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &image, &mnt, &[]);
    let mut user = Command::new("sleep")
        .arg("30")
        .current_dir(&mnt)
        .spawn()
        .unwrap();
    let err = imgfs_err(&cache, &["umount", mnt.to_str().unwrap()]);
    assert!(err.contains("busy") && err.contains("--lazy"), "{err}");
    assert!(is_mounted(&mnt));
    imgfs_ok(&cache, &["umount", "--lazy", mnt.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
    user.kill().unwrap();
    user.wait().unwrap();
    m.wait_gone();
}

#[test]
fn an_interrupted_pull_says_so_and_leaves_nothing() {
    let reg = registry();
    let img = FixtureImage::new(
        "amd64",
        vec![FixtureLayer::gzip(&[("big", &noise(4 << 20, 5))])],
    );
    img.push(&reg.host, "first/interrupt", "v1");
    let proxy = Proxy::start(&reg.host);
    let image = format!("{}/first/interrupt:v1", proxy.host);
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        // The config is a blob too: every blob GET of this pull trickles.
        proxy.fault_next_blobs(3, Fault::Trickle(Duration::from_millis(50)));
        let work = tempfile::tempdir().unwrap();
        let cache = work.path().join("cache");
        let target = work.path().join("rootfs");
        let child = Command::new(env!("CARGO_BIN_EXE_imgfs"))
            .arg("--cache-dir")
            .arg(&cache)
            .args(["pull", "-q", &image])
            .arg(&target)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the download has started (a partial blob in tmp/, a build dir).
        let deadline = Instant::now() + Duration::from_secs(20);
        while pull_build_dirs(work.path()).is_empty()
            || std::fs::read_dir(cache.join("tmp")).map_or(0, |d| d.count()) == 0
        {
            assert!(Instant::now() < deadline, "the pull never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{stderr}");
        assert_eq!(stderr.trim(), "imgfs: interrupted");
        assert!(!target.exists());
        assert!(
            pull_build_dirs(work.path()).is_empty(),
            "a build dir is left"
        );
        let tmp: Vec<_> = std::fs::read_dir(cache.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "tmp/ keeps {tmp:?}");
    }
}

#[test]
fn ls_and_the_mount_look_like_a_real_filesystem() {
    let image = system_image("first/looks");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let long = imgfs_ok(&cache, &["ls", "-l", &image]);
    let line = |name: &str| {
        long.lines()
            .find(|l| l.ends_with(name) || l.contains(&format!(" {name} -> ")))
            .unwrap_or_else(|| panic!("{name} in {long}"))
            .to_string()
    };
    assert!(long.starts_with("total "), "{long}");
    let link = line("passwd-link");
    assert!(link.starts_with("lrwxrwxrwx 1 root  root"), "{link}");
    assert!(
        link.contains(" 10 Sep 13  2020 passwd-link -> etc/passwd"),
        "{link}"
    );
    let home = line("home-file");
    assert!(home.contains(" alice alice "), "{home}");
    let etc = line("etc");
    assert!(etc.starts_with("drwxr-xr-x 2 root  root"), "{etc}");
    let numeric = imgfs_ok(&cache, &["ls", "-n", &image, "home-file"]);
    assert!(numeric.contains(" 1000 1000 "), "{numeric}");
    // Several paths: files first, then each directory under its name; a trailing slash
    // follows a symlink.
    let several = imgfs_ok(&cache, &["ls", &image, "etc-link/", "home-file", "root"]);
    assert_eq!(
        several,
        "home-file\n\netc-link/:\ngroup\npasswd\nshadow\n\nroot:\nsecret\n"
    );

    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &image, &mnt, &[]);
    let link_md = std::fs::symlink_metadata(mnt.join("passwd-link")).unwrap();
    let root_md = std::fs::metadata(&mnt).unwrap();
    m.unmount(&cache);
    use std::os::unix::fs::MetadataExt;
    assert_eq!((link_md.mode() & 0o7777, link_md.size()), (0o777, 10));
    assert_eq!(
        root_md.mtime(),
        layers::MTIME as i64,
        "the root's time is its entry's"
    );
}

#[test]
fn cat_into_a_closed_pipe_ends_quietly() {
    let reg = registry();
    FixtureImage::new(
        "amd64",
        vec![FixtureLayer::gzip(&[("big", &text(3 << 20, 9))])],
    )
    .push(&reg.host, "first/pipe", "v1");
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --cache-dir {} cat {}/first/pipe:v1 big | head -c 10 >/dev/null",
            env!("CARGO_BIN_EXE_imgfs"),
            work.path().display(),
            reg.host
        ))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn mount_8_and_fstab_mount_through_fuse3s_helper() {
    // fuse3's mount helper runs `imgfs IMAGE DIR -o OPTS` from the PATH mount(8) gives it;
    // /usr/local/bin is on it.
    let link = Path::new("/usr/local/bin/imgfs");
    let ours = Path::new(env!("CARGO_BIN_EXE_imgfs"));
    match std::fs::read_link(link) {
        Ok(t) if t == ours => {}
        Ok(_) | Err(_) if link.exists() => panic!("{} is another imgfs", link.display()),
        _ => std::os::unix::fs::symlink(ours, link).unwrap(),
    }
    struct Unlink<'a>(&'a Path);
    impl Drop for Unlink<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _unlink = Unlink(link);
    let image = system_image("first/fstab");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fstab = work.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "{image} {} fuse.imgfs noauto,nofail,allow_other,cache_dir={} 0 0\n",
            mnt.display(),
            cache.display()
        ),
    )
    .unwrap();
    let out = Command::new("mount")
        .arg("--fstab")
        .arg(&fstab)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = std::fs::read(mnt.join("etc/passwd"));
    imgfs_ok(&cache, &["umount", mnt.to_str().unwrap()]);
    assert!(passwd.unwrap().starts_with(b"root:x:0:0"));
}

#[test]
fn what_users_type_by_mistake_gets_an_answer() {
    let work = tempfile::tempdir().unwrap();
    let err = imgfs_err(work.path(), &["inspect", "http://localhost:5000/app:1"]);
    assert!(
        err.contains("no scheme") && err.contains("localhost:5000/app:1"),
        "{err}"
    );
    let image = system_image("first/ro");
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&work.path().join("c"), &image, &mnt, &["-o", "ro"]);
    m.unmount(&work.path().join("c"));
    let err = imgfs_err(
        work.path(),
        &["mount", &image, mnt.to_str().unwrap(), "-o", "rw"],
    );
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn inspect_shows_the_config_and_pull_takes_a_layer_count() {
    let reg = registry();
    let mut second = FixtureLayer::gzip(&[("second", b"2")]);
    // Named eStargz by its annotation alone: inspect reads no layer.
    second.annotations.insert(
        "containerd.io/snapshot/stargz/toc.digest".into(),
        imgfs::digest::Digest::of(b"toc").to_string().into(),
    );
    FixtureImage::new(
        "amd64",
        vec![FixtureLayer::gzip(&[("first", b"1")]), second],
    )
    .push(&reg.host, "first/inspect", "v1");
    let image = format!("{}/first/inspect:v1", reg.host);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let shown = imgfs_ok(&cache, &["inspect", &image]);
    assert!(shown.contains("Cmd:        [\"/bin/sh\"]"), "{shown}");
    assert!(shown.contains("Env:        PATH=/usr/bin"), "{shown}");
    let layers: Vec<&str> = shown.lines().filter(|l| l.contains("sha256:")).collect();
    assert!(layers.last().unwrap().ends_with("estargz"), "{shown}");

    let target = work.path().join("rootfs");
    imgfs_ok(
        &cache,
        &[
            "pull",
            "-q",
            "--layer",
            "1",
            &image,
            target.to_str().unwrap(),
        ],
    );
    assert!(target.join("first").exists() && !target.join("second").exists());
    let err = imgfs_err(
        &cache,
        &[
            "pull",
            "--layer",
            "3",
            &image,
            work.path().join("x").to_str().unwrap(),
        ],
    );
    assert!(err.contains("has 2 layers"), "{err}");
}

/// Restores /dev/fuse's mode when dropped.
struct DevFuseMode(u32);

impl DevFuseMode {
    fn set(mode: u32) -> DevFuseMode {
        use std::os::unix::fs::PermissionsExt;
        let old = std::fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o777;
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode)).unwrap();
        DevFuseMode(old)
    }
}

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.0));
    }
}

#[test]
fn a_user_mounts_through_fusermount3_where_the_machine_lets_users_use_fuse() {
    // fusermount3 wants a name for the user.
    let named = Command::new("getent")
        .args(["passwd", STRANGER])
        .output()
        .unwrap();
    if !named.status.success() {
        let st = Command::new("useradd")
            .args([
                "-M",
                "-u",
                STRANGER,
                "-s",
                "/usr/sbin/nologin",
                "imgfs-test",
            ])
            .status()
            .unwrap();
        assert!(st.success(), "useradd");
    }
    let image = system_image("first/user");
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (mnt, cache) = (work.path().join("mnt"), work.path().join("cache"));
    for d in [&mnt, &cache] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(54321), Some(54321)).unwrap();
    }
    let as_user = |args: &[&str]| {
        stranger(env!("CARGO_BIN_EXE_imgfs"))
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .env("HOME", work.path())
            .output()
            .unwrap()
    };
    let mount = [&["mount", &image][..], &[mnt.to_str().unwrap()]].concat();
    {
        // Where only root may open the device, fusermount3 cannot help: it opens it as the
        // user too. The error says what to do.
        let _mode = DevFuseMode::set(0o600);
        let out = as_user(&mount);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("only root") && err.contains("chmod 0666"),
            "{err}"
        );
    }
    let _mode = DevFuseMode::set(0o666);
    let out = as_user(&mount);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = stranger("cat")
        .arg(mnt.join("etc/passwd"))
        .output()
        .unwrap();
    let out = as_user(&["umount", mnt.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(read.stdout.starts_with(b"root:x:0:0"), "{read:?}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_quiet_daemon_leaves_no_log_and_tar_of_the_mount_warns_nothing() {
    let image = system_image("first/log");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    let m = Mounted::new(&cache, &image, &mnt, &[]);
    let log = cache.join(format!("logs/mount-{}.log", m.pid));
    assert!(log.exists(), "the log is named after the daemon's pid");
    // tar probes files with ioctls; fuser's default logged a warning for each.
    let st = Command::new("tar")
        .arg("cf")
        .arg(work.path().join("out.tar"))
        .arg("-C")
        .arg(&mnt)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let during = std::fs::read_to_string(&log).unwrap();
    m.unmount(&cache);
    assert_eq!(during, "", "the daemon logged something");
    assert!(!log.exists(), "an empty log is removed");
}
