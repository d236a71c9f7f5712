//! `imgfs mount IMAGE DIR` and `imgfs umount DIR`.
//!
//! `mount` returns once the mount is ready and leaves a daemon serving it. The daemon is this
//! same program re-run with `--foreground` in a new session (not a fork: forking a process that
//! already runs threads is unsafe), its log in the cache directory. The daemon says "ready"
//! through an inherited socket the moment the mount is up; if it exits first, the parent
//! reports its error. The daemon's start and the socket between the two: `mount/daemon.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::Global;
use crate::fuse::ImageFs;

pub(super) mod daemon;

#[derive(Args)]
pub struct MountArgs {
    /// The image (see `imgfs --help` for the forms it takes)
    image: String,
    /// Empty directory to mount on
    dir: PathBuf,
    /// Stay attached and log to stderr; Ctrl-C or SIGTERM unmounts
    #[arg(long, short)]
    foreground: bool,
    /// Mount options: allow_other (other users may use the mount; the image's modes and
    /// owners are enforced), allow_root, ro (the default and only way)
    #[arg(short = 'o', value_name = "OPTION", value_delimiter = ',')]
    options: Vec<String>,
    /// Record which spans and chunks reads use, in order, into FILE (written every few
    /// seconds and when the mount ends), for `imgfs index push --profile` or `--profile`
    #[arg(long, value_name = "FILE")]
    record_profile: Option<PathBuf>,
    /// Fetch what this access profile names in the background as soon as the mount is up
    /// [default: the profile published with the image's indexes, if any, unless
    /// --prefetch none]
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    #[command(flatten)]
    read: super::ReadArgs,
}

#[derive(Args)]
pub struct UmountArgs {
    /// A directory an imgfs mount is on
    dir: PathBuf,
    /// Detach the mount now even if it is busy; it goes when nothing uses it any more
    #[arg(long, short = 'l')]
    lazy: bool,
    #[command(flatten)]
    _no_image: super::NoImage,
}

/// The filesystem type of what is mounted on `dir` (the topmost mount there), from
/// /proc/self/mountinfo; `None` if `dir` is not a mount point.
pub fn mounted_type(dir: &Path) -> Option<String> {
    let canon = dir.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Paths escape space, tab, newline and backslash in octal.
    let want = canon
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .and_then(|l| l.split_once(" - "))
        .and_then(|(_, rest)| rest.split(' ').next())
        .map(str::to_string)
}

/// Is `dir` a mount point?
pub fn is_mount_point(dir: &Path) -> bool {
    mounted_type(dir).is_some()
}

/// The type an imgfs mount has in /proc/self/mountinfo.
const IMGFS_TYPE: &str = "fuse.imgfs";

pub(super) fn check_mount_dir(dir: &Path) -> Result<()> {
    // A FUSE mount whose daemon died (killed, crashed) answers ENOTCONN to whatever the
    // kernel has not cached: `stat` of its root may still succeed, `statfs` never does.
    let gone = || {
        anyhow::anyhow!(
            "{}: a mount whose daemon is gone is still there: run `imgfs umount {}` first",
            dir.display(),
            dir.display()
        )
    };
    let md = match std::fs::metadata(dir) {
        Ok(md) => md,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(gone()),
        Err(e) => return Err(e).with_context(|| format!("{}: no such directory", dir.display())),
    };
    if !md.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    if is_mount_point(dir) {
        if rustix::fs::statfs(dir).err() == Some(rustix::io::Errno::NOTCONN) {
            return Err(gone());
        }
        bail!("{}: something is already mounted there", dir.display());
    }
    if std::fs::read_dir(dir)?.next().is_some() {
        bail!("{}: not empty (mount on an empty directory)", dir.display());
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse module (modprobe fuse), or install fuse3");
    }
    if !rustix::process::geteuid().is_root() {
        if which("fusermount3").is_none() {
            bail!("mounting as a user needs fusermount3: install the fuse3 package");
        }
        // fusermount3 opens the device as the user too (so that its mode decides who may
        // use FUSE): a device only root may open means no user mounts on this machine.
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            bail!(
                "/dev/fuse: {e}: this machine lets only root use FUSE. Mount as root, or ask \
                 an administrator to open /dev/fuse to users (chmod 0666 /dev/fuse, Debian's \
                 default, or a group such as fuse)"
            );
        }
    }
    Ok(())
}

fn which(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| p.is_file())
}

/// Allocator settings for the mount daemon, made before any other thread starts (the async
/// runtime's threads included: a thread that has allocated keeps the arena it got).
///
/// One arena: glibc gives each thread that frees a span buffer an arena of its own and keeps
/// its memory. A fixed mmap threshold at the pooled buffers' size: those buffers live outside
/// the heap, so the ones the pool does not keep are returned rather than left as holes that
/// small allocations split (the pool's reuse keeps the page faults of mapping anew few;
/// before there was a pool, a fixed threshold halved the read speed). The figures are in
/// BENCHMARKS.md ("First walk and memory on a Debian userland").
pub fn before_threads(args: &MountArgs) {
    if args.foreground {
        // SAFETY: mallopt only tunes the allocator; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            // Span-sized buffers (`bufpool::CAP`) mapped on their own, not carved from the
            // heap: freed, they go back to the system, where in the heap small allocations
            // split the holes they left and the next buffer grew the heap again.
            libc::mallopt(libc::M_MMAP_THRESHOLD, crate::bufpool::CAP as i32);
        }
    }
}

/// `imgfs mount`: check DIR and the options, then start the daemon and wait for it, or, as
/// the daemon (`--foreground`), serve the mount.
pub async fn mount(g: &Global, args: MountArgs) -> Result<()> {
    check_mount_dir(&args.dir)?;
    let acl = session_acl(&args.options)?;
    check_profile_paths(&args)?;
    if !args.foreground {
        return daemon::spawn(g, &format!("{} mounted", args.image), &args.dir).await;
    }
    serve(g, &args, acl).await?;
    daemon::remove_empty_log(g);
    Ok(())
}

/// A profile to use must be readable, and one to record must have a directory to go in:
/// said here rather than found out when the mount ends. (What a profile holds is a hint:
/// one that is not a profile is only logged.)
fn check_profile_paths(args: &MountArgs) -> Result<()> {
    if let Some(f) = &args.profile {
        std::fs::File::open(f).with_context(|| format!("opening the profile {}", f.display()))?;
    }
    if let Some(f) = &args.record_profile {
        let dir = match f.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            bail!(
                "{}: no directory {} to record the profile in",
                f.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Whether a mount without `--profile` replays the profile published with the indexes.
/// `--prefetch none` promises that every byte fetched was asked for by a read: a published
/// profile is not used then (a `--profile` given with it is).
fn wants_published_profile(args: &MountArgs) -> bool {
    !args.read.no_remote_index && !matches!(args.read.prefetch, super::PrefetchArg::None)
}

/// The access profile a mount replays: `--profile`'s file, else the one published with the
/// image's indexes (with remote indexes allowed). One that cannot be used is logged.
fn profile_to_use(
    args: &MountArgs,
    cache: &crate::cache::Cache,
    image: &crate::manifest::Image,
) -> Option<crate::profile::Profile> {
    let (bytes, whence) = match &args.profile {
        Some(f) => match std::fs::read(f) {
            Ok(b) => (b, f.display().to_string()),
            Err(e) => {
                tracing::warn!("not using the profile {}: {e}", f.display());
                return None;
            }
        },
        None if wants_published_profile(args) => (
            cache.load_published_profile(&image.manifest_digest)?,
            "published with the indexes".to_string(),
        ),
        None => return None,
    };
    match crate::profile::Profile::parse(&bytes) {
        Ok(p) => {
            tracing::info!("access profile {whence}: {} reads", p.reads.len());
            Some(p)
        }
        Err(e) => {
            tracing::warn!("not using the access profile {whence}: {e}");
            None
        }
    }
}

/// Write what `rec` has recorded to `path` (through a temporary file and a rename, so a
/// reader never sees half a profile).
fn write_profile(rec: &crate::profile::Recorder, path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing the profile {}", path.display()))?;
    std::io::Write::write_all(&mut tmp, &rec.profile().to_bytes())
        .with_context(|| format!("writing the profile {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing the profile {}", path.display()))?;
    Ok(())
}

/// How often a recording is written while the mount runs, so that a daemon killed
/// without a chance to write loses little.
const PROFILE_FLUSH: Duration = Duration::from_secs(5);

/// Who may use the mount, from the `-o` options (all of which are checked).
fn session_acl(options: &[String]) -> Result<fuser::SessionACL> {
    let mut acl = fuser::SessionACL::Owner;
    for o in options {
        match o.as_str() {
            "allow_other" => acl = fuser::SessionACL::All,
            "allow_root" => acl = fuser::SessionACL::RootAndOwner,
            // Read-only it is, always; the kernel enforces modes on shared mounts anyway.
            "ro" | "default_permissions" => {}
            "rw" => bail!("imgfs mounts are read-only: drop the rw option"),
            other => {
                bail!("unknown mount option {other:?} (imgfs takes allow_other, allow_root, ro)")
            }
        }
    }
    Ok(acl)
}

/// Mount the image in this process and serve it until a signal or an unmount ends it.
async fn serve(g: &Global, args: &MountArgs, acl: fuser::SessionACL) -> Result<()> {
    let t0 = std::time::Instant::now();
    // The parent (`imgfs mount` without --foreground) waits on this socket: progress lines,
    // then "ready".
    let parent = daemon::Parent::from_env();
    let mut opts = args.read.view_options(g);
    if let Some(sink) = progress_sink(parent.as_ref()) {
        opts.progress = Some(sink);
    }
    opts.record_profile = args.record_profile.is_some();
    opts.want_profile = args.profile.is_none() && wants_published_profile(args);
    let (cache, image, view) = g.open_view(&args.image, &opts).await?;
    tracing::info!("indexes loaded and merged at {:.1?}", t0.elapsed());
    // Background work on other threads; it never holds up the mount.
    view.start_prefetch();
    if let Some(p) = profile_to_use(args, &cache, &image) {
        view.start_profile(p);
    }
    let recording = args
        .record_profile
        .clone()
        .zip(view.reader.recorder())
        .map(|(path, rec)| {
            let (flush_path, flush_rec) = (path.clone(), rec.clone());
            let flusher = tokio::spawn(async move {
                let mut written = 0;
                loop {
                    tokio::time::sleep(PROFILE_FLUSH).await;
                    let n = flush_rec.len();
                    if n != written {
                        match write_profile(&flush_rec, &flush_path) {
                            Ok(()) => written = n,
                            Err(e) => tracing::warn!("{e:#}"),
                        }
                    }
                }
            });
            (path, rec, flusher)
        });
    let mut fs = ImageFs::new(view, tokio::runtime::Handle::current());
    fs.may_skip_opendir = !matches!(acl, fuser::SessionACL::RootAndOwner);
    let config = fuse_config(&image.reference, acl);
    let session = fuser::spawn_mount(fs, &args.dir, &config)
        .with_context(|| format!("mounting on {}", args.dir.display()))?;
    raise_readahead(&args.dir);
    if let Some(p) = parent {
        p.say("ready");
    }
    tracing::info!(
        "{} mounted on {} at {:.1?}",
        image.reference,
        args.dir.display(),
        t0.elapsed()
    );
    let external = wait_for_end(&session).await?;
    let ended = end_session(session, external, &args.dir);
    if let Some((path, rec, flusher)) = recording {
        // Stopped, and waited for, so that its older snapshot cannot land after this one.
        flusher.abort();
        let _ = flusher.await;
        write_profile(&rec, &path)?;
        tracing::info!(
            "access profile of {} reads in {}",
            rec.len(),
            path.display()
        );
    }
    ended?;
    tracing::info!("{} unmounted", args.dir.display());
    Ok(())
}

/// Where indexing progress goes: to the waiting parent, else to a terminal; nowhere if
/// neither is there.
fn progress_sink(parent: Option<&daemon::Parent>) -> Option<crate::view::ProgressSink> {
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if parent.is_none() && !terminal {
        return None;
    }
    let parent = parent.cloned();
    Some(crate::view::ProgressSink(Arc::new(move |p| {
        let line = describe_progress(p);
        if let Some(p) = &parent {
            p.say(&format!("progress {line}"));
        } else {
            eprintln!("imgfs: {line}");
        }
    })))
}

/// The FUSE session's settings: a read-only mount named after the image, open to those
/// `acl` lets in.
fn fuse_config(reference: &str, acl: fuser::SessionACL) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(reference.to_string()),
        // Shown as the type `fuse.imgfs`, by which `imgfs umount` knows its own mounts. fuser
        // gives the subtype only to fusermount3; as root the kernel needs it as an option.
        if rustix::process::geteuid().is_root() {
            fuser::MountOption::CUSTOM("subtype=imgfs".into())
        } else {
            fuser::MountOption::Subtype("imgfs".into())
        },
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if acl != fuser::SessionACL::Owner {
        // Other users see the mount: the kernel enforces the image's modes and owners, as
        // on any filesystem (another user must not read an image's /etc/shadow).
        config
            .mount_options
            .push(fuser::MountOption::DefaultPermissions);
    }
    config.acl = acl;
    config.n_threads = Some(2);
    config
}

/// Wait for Ctrl-C, SIGTERM, or the session's end from outside (`imgfs umount`, an aborted
/// connection): true for the last.
pub(super) async fn wait_for_end(session: &fuser::BackgroundSession) -> Result<bool> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let external = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break false,
            _ = term.recv() => break false,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if session.guard.is_finished() {
                    break true;
                }
            }
        }
    };
    Ok(external)
}

/// Unmount `dir` if it is still this session's mount, and end the session.
pub(super) fn end_session(
    session: fuser::BackgroundSession,
    external: bool,
    dir: &Path,
) -> Result<()> {
    // fuser unmounts by path. Once this mount is gone (`imgfs umount`), that would take
    // down whatever was mounted on the directory since — a new mount made right after
    // `imgfs umount` returned. So after the session has ended, the directory is unmounted
    // only if it is a dead FUSE mount (this one, its connection aborted); otherwise the
    // session is not dropped, and the process just exits.
    if external || session.guard.is_finished() {
        let dead = matches!(std::fs::metadata(dir),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
        if dead {
            session.join().ok();
        } else {
            std::mem::forget(session);
        }
    } else {
        session
            .umount_and_join()
            .with_context(|| format!("unmounting {}", dir.display()))?;
    }
    Ok(())
}

/// How far ahead the kernel may read a file sequentially read through the mount.
const READAHEAD_KB: u32 = 4096;

/// Whatever a FUSE filesystem asks for at INIT, the kernel caps a mount's readahead at its
/// backing device's default, 128 KiB — so a sequential reader sends 128 KiB reads one
/// after another. Root may raise it in sysfs once INIT is done (as JuiceFS does); measured
/// on a 200 MiB file: ~540 MB/s at 128 KiB, ~850 at 1 MiB, ~940 at 4 MiB. A user who may
/// not write there keeps the default.
fn raise_readahead(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    // The kernel sets the readahead when it processes INIT's reply (to the least of what it
    // was and what INIT agreed), so a raise made before that would be undone. A statfs
    // returns only after INIT (every request waits for it).
    if let Err(e) = rustix::fs::statfs(dir) {
        return tracing::debug!("not raising readahead: {e}");
    }
    let dev = match std::fs::metadata(dir) {
        Ok(m) => m.dev(),
        Err(e) => return tracing::debug!("not raising readahead: {e}"),
    };
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        rustix::fs::major(dev),
        rustix::fs::minor(dev)
    );
    if let Err(e) = std::fs::write(&knob, READAHEAD_KB.to_string()) {
        tracing::debug!("not raising readahead ({knob}): {e}");
    }
}

/// A progress line for a person.
fn describe_progress(p: &crate::view::IndexProgress) -> String {
    use crate::view::IndexProgress as P;
    match p {
        P::Indexing {
            layer,
            of,
            digest,
            bytes,
        } => format!(
            "indexing layer {layer}/{of} ({}, {}): streaming it once",
            digest.short(),
            bytesize::ByteSize(*bytes)
        ),
        P::Streamed {
            layer,
            of,
            done,
            bytes,
        } => format!(
            "indexing layer {layer}/{of}: {} of {} streamed ({:.0} %)",
            bytesize::ByteSize(*done),
            bytesize::ByteSize(*bytes),
            100.0 * *done as f64 / (*bytes).max(1) as f64
        ),
        P::Indexed {
            layer,
            of,
            entries,
            elapsed,
        } => format!("indexed layer {layer}/{of}: {entries} entries in {elapsed:.1?}"),
    }
}

pub fn umount(args: UmountArgs) -> Result<()> {
    let dir = args.dir.display();
    match mounted_type(&args.dir) {
        None => bail!("{dir}: not mounted"),
        Some(t) if t != IMGFS_TYPE => {
            bail!("{dir}: what is mounted there is not an imgfs mount ({t}); use umount(8)")
        }
        Some(_) => {}
    }
    let busy = || {
        anyhow::anyhow!(
            "{dir}: the mount is busy (a process has a file or its working directory in it): \
             close them, or `imgfs umount --lazy {dir}` to detach it now"
        )
    };
    if rustix::process::geteuid().is_root() {
        let flags = if args.lazy {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
        match rustix::mount::unmount(&args.dir, flags) {
            Ok(()) => {}
            Err(rustix::io::Errno::BUSY) => return Err(busy()),
            Err(e) => {
                return Err(std::io::Error::from(e)).with_context(|| format!("unmounting {dir}"));
            }
        }
    } else {
        let out = Command::new("fusermount3")
            .arg(if args.lazy { "-uz" } else { "-u" })
            .arg(&args.dir)
            .stderr(Stdio::piped())
            .output()
            .context("running fusermount3 (install fuse3)")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("busy") {
                return Err(busy());
            }
            bail!("fusermount3 -u {dir} failed: {}", err.trim());
        }
    }
    Ok(())
}
