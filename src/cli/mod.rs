//! The command line: argument parsing, logging setup and the commands themselves. This is the
//! boundary where library errors get their context and become one line on stderr.

mod browse;
mod cache;
mod config;
mod index;
mod inspect;
mod mount;
mod pull;
mod snapshotter;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::cache::Cache;
use crate::manifest::{Image, Platform};
use crate::reference::ImageRef;
use crate::registry::ClientOptions;
use crate::source::{Source, SourceOptions};
use crate::view::{ImageView, Prefetch, ViewOptions};

#[derive(Parser)]
#[command(
    name = "imgfs",
    version,
    about = "Use a container image without a container engine",
    after_help = "IMAGE is a registry reference (alpine, quay.io/org/app:1.2, host:5000/a/b@sha256:…),\n\
                  an OCI layout (oci:DIR[:TAG]) or a docker save archive (docker-archive:FILE[:REF])."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes, before or after its name.
#[derive(Args, Clone)]
struct Global {
    /// Cache directory [default: $XDG_CACHE_HOME/imgfs]
    #[arg(long, global = true, value_name = "CACHE_DIR", env = "IMGFS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Platform to pick from a multi-platform image [default: the host's]
    #[arg(long, global = true, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
    /// Reach this registry (HOST[:PORT]) over plain HTTP; loopback always is
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    insecure: Vec<String>,
    /// Try this mirror (HOST[:PORT], same repository names) first for blobs, indexes and
    /// manifests by digest; falls back to the image's registry. Also in the config file
    #[arg(long = "mirror", global = true, value_name = "HOST")]
    mirrors: Vec<String>,
    /// Refuse a layer whose tar stream expands past SIZE (a gzip bomb, a disk filler)
    #[arg(long, global = true, value_name = "SIZE", default_value = "64GiB")]
    max_uncompressed_size: bytesize::ByteSize,
    /// More log output (-v info, -vv debug); IMGFS_LOG=… sets filters directly
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

/// The image options, hidden: `umount` and `cache` open no image, so their help does not
/// list them (a command's own argument stops clap from adding the global one to its help).
/// Given anyway, they change nothing.
#[derive(Args)]
struct NoImage {
    #[arg(long, hide = true)]
    platform: Option<String>,
    #[arg(long = "insecure-registry", hide = true)]
    insecure: Vec<String>,
    #[arg(long = "mirror", hide = true)]
    mirrors: Vec<String>,
    #[arg(long, hide = true, default_value = "64GiB")]
    max_uncompressed_size: bytesize::ByteSize,
}

/// `--prefetch`: the command line's face of [`Prefetch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PrefetchArg {
    /// Nothing: every byte fetched was asked for by a read
    None,
    /// Spans ahead of sequential readers
    Auto,
    /// Everything, in the background after the mount is ready
    All,
}

/// How `mount`, `ls` and `cat` get file bytes.
#[derive(Args, Clone)]
struct ReadArgs {
    /// Keep whole layer blobs in the cache (default: indexes, and the spans reads fetch)
    #[arg(long)]
    keep_blobs: bool,
    /// What to fetch besides what is read: nothing, spans ahead of sequential reads, or
    /// everything in the background
    #[arg(long, value_enum, default_value_t = PrefetchArg::Auto)]
    prefetch: PrefetchArg,
    /// Most disk space for fetched spans in the cache (oldest go first)
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    chunk_cache: bytesize::ByteSize,
    /// The image as of its first N layers
    #[arg(long, value_name = "N")]
    layer: Option<usize>,
    /// Do not look in the registry for published layer indexes (`imgfs index push`);
    /// index layers here
    #[arg(long)]
    no_remote_index: bool,
}

impl ReadArgs {
    fn view_options(&self, g: &Global) -> ViewOptions {
        ViewOptions {
            limits: g.limits(),
            layers: self.layer,
            keep_blobs: self.keep_blobs,
            prefetch: match self.prefetch {
                PrefetchArg::None => Prefetch::None,
                PrefetchArg::Auto => Prefetch::Auto,
                PrefetchArg::All => Prefetch::All,
            },
            chunk_cache: self.chunk_cache.as_u64(),
            remote_index: !self.no_remote_index,
            ..ViewOptions::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Show an image's digest, platform, config and layers
    Inspect(inspect::InspectArgs),
    /// Download and verify every blob of an image into the cache
    Fetch(FetchArgs),
    /// Write the image's merged root filesystem to a new directory (or a tar stream)
    Pull(pull::PullArgs),
    /// Mount the image read-only on an empty directory; returns when it is ready
    Mount(mount::MountArgs),
    /// Unmount an imgfs mount or layer store
    Umount(mount::UmountArgs),
    /// Serve an Additional Layer Store on a directory: podman and CRI-O run images from it
    /// without pulling their layers
    Store(store::StoreArgs),
    /// Serve containerd's snapshots API (a proxy snapshotter): containers start from images
    /// whose layers are read lazily
    Snapshotter(snapshotter::SnapshotterArgs),
    /// List a directory of the image, without mounting it
    Ls(browse::LsArgs),
    /// Print a file of the image, without mounting it
    Cat(browse::CatArgs),
    /// Show or trim the cache (blobs, layer indexes, fetched spans)
    Cache(cache::CacheArgs),
    /// Build layer indexes, or publish them to the registry for other machines
    Index(index::IndexArgs),
}

#[derive(Args)]
struct FetchArgs {
    /// The image (see `imgfs --help` for the forms it takes)
    image: String,
    /// Downloads in flight at once
    #[arg(long, short = 'j', default_value_t = 4)]
    jobs: usize,
}

/// The arguments the process runs with, after [`helper_args`]: the mount daemon is started
/// with these, not with the raw ones.
static ARGS: std::sync::OnceLock<Vec<std::ffi::OsString>> = std::sync::OnceLock::new();

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match helper_args(&raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("imgfs: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(&args);
    let _ = ARGS.set(args);
    if let Command::Mount(args) = &cli.command {
        mount::before_threads(args);
    }
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("imgfs: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => {
            // `imgfs cat … | head`: the reader has all it wanted. Quiet, and the status a
            // tool killed by SIGPIPE has, as `cat` would.
            ExitCode::from(128 + libc::SIGPIPE as u8)
        }
        Err(e) => {
            if let Some(Interrupted(sig)) = e.downcast_ref::<Interrupted>() {
                eprintln!("imgfs: interrupted");
                // The shell's convention: 128 + the signal's number.
                return ExitCode::from(128 + *sig as u8);
            }
            // `{:#}` prints the whole context chain on one line.
            eprintln!("imgfs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A command stopped by a signal (its number), after cleaning up.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted(i32);

/// Output went to a pipe whose reader is gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The signal that cancelled a command, once one has.
#[derive(Clone, Default)]
struct Signalled(std::sync::Arc<std::sync::atomic::AtomicI32>);

impl Signalled {
    fn signal(&self) -> i32 {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => libc::SIGINT,
            s => s,
        }
    }
}

/// Cancel `token` on the first SIGINT or SIGTERM (the command then cleans up and reports
/// [`Interrupted`]); a second one ends the process at once.
fn cancel_on_signal(token: tokio_util::sync::CancellationToken) -> Result<Signalled> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let signalled = Signalled::default();
    let seen = signalled.clone();
    tokio::spawn(async move {
        let sig = tokio::select! {
            _ = int.recv() => libc::SIGINT,
            _ = term.recv() => libc::SIGTERM,
        };
        seen.0.store(sig, std::sync::atomic::Ordering::Relaxed);
        token.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        std::process::exit(128 + sig);
    });
    Ok(signalled)
}

/// Mounts made by mount(8) and /etc/fstab: `mount -t fuse.imgfs IMAGE DIR -o OPTS` runs
/// fuse3's helper, which runs `imgfs IMAGE DIR -o OPTS`; a `mount.fuse.imgfs` link to this
/// program is run as `mount.fuse.imgfs IMAGE DIR [-sfnv] -o OPTS`. Both become
/// `imgfs mount IMAGE DIR …`, with fstab's own options (noauto, nofail, _netdev, …) dropped
/// and `cache_dir=DIR` for the cache (at boot there is no $HOME). Anything else is as given.
fn helper_args(raw: &[std::ffi::OsString]) -> Result<Vec<std::ffi::OsString>> {
    use std::ffi::OsString;
    let program = raw.first().cloned().unwrap_or_else(|| "imgfs".into());
    let called = std::path::Path::new(&program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let as_helper = called.starts_with("mount.");
    let subcommands = [
        "inspect", "fetch", "pull", "mount", "umount", "ls", "cat", "cache", "index", "help",
    ];
    let first = raw.get(1).and_then(|a| a.to_str()).unwrap_or("");
    let fuse_form = !as_helper
        && raw.len() >= 3
        && !first.starts_with('-')
        && !subcommands.contains(&first)
        && std::path::Path::new(&raw[2]).is_dir();
    if !as_helper && !fuse_form {
        return Ok(raw.to_vec());
    }
    let mut out: Vec<OsString> = vec![program, "mount".into()];
    let mut positional = Vec::new();
    let mut mount_opts: Vec<String> = Vec::new();
    let mut it = raw[1..].iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let opts = it.next().context("-o needs options")?;
                let opts = opts.to_str().context("mount options are not UTF-8")?;
                for o in opts.split(',').filter(|o| !o.is_empty()) {
                    match o.split_once('=') {
                        Some(("cache_dir", dir)) => {
                            out.extend(["--cache-dir".into(), dir.into()]);
                        }
                        Some(("platform", p)) => out.extend(["--platform".into(), p.into()]),
                        // fstab's and mount(8)'s own, or fuse3's helper's.
                        Some(("comment" | "subtype" | "fsname", _)) => {}
                        Some((k, _)) if k.starts_with("x-") => {}
                        // What fstab's `defaults` and the helpers add: the mount is read-only,
                        // nosuid and nodev whatever they say.
                        None if matches!(
                            o,
                            "defaults"
                                | "auto"
                                | "noauto"
                                | "user"
                                | "users"
                                | "nouser"
                                | "nofail"
                                | "_netdev"
                                | "exec"
                                | "noexec"
                                | "nosuid"
                                | "nodev"
                                | "suid"
                                | "dev"
                                | "rw"
                                | "async"
                                | "atime"
                                | "noatime"
                                | "relatime"
                        ) => {}
                        _ => mount_opts.push(o.to_string()),
                    }
                }
            }
            // mount(8)'s -s (sloppy), -f (fake), -n (no mtab), -v (verbose).
            Some("-s" | "-f" | "-n" | "-v") if as_helper => {}
            Some("-t") if as_helper => {
                it.next();
            }
            _ => positional.push(a.clone()),
        }
    }
    out.extend(positional);
    if !mount_opts.is_empty() {
        out.extend(["-o".into(), mount_opts.join(",").into()]);
    }
    Ok(out)
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "imgfs=info",
        _ => "imgfs=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMGFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person: not in a daemon's log file, nor in a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> Result<()> {
    let g = cli.global;
    match cli.command {
        Command::Inspect(args) => inspect::run(&g, args).await,
        Command::Fetch(args) => fetch(&g, args).await,
        Command::Pull(args) => pull::run(&g, args).await,
        Command::Mount(args) => mount::mount(&g, args).await,
        Command::Umount(args) => mount::umount(args),
        Command::Store(args) => store::run(&g, args).await,
        Command::Snapshotter(args) => snapshotter::run(&g, args).await,
        Command::Ls(args) => browse::ls(&g, args).await,
        Command::Cat(args) => browse::cat(&g, args).await,
        Command::Cache(args) => cache::run(&g, args),
        Command::Index(args) => index::run(&g, args).await,
    }
}

/// What every image command starts from: the cache, the opened source and the image.
struct Opened {
    cache: Cache,
    source: Source,
    image: Image,
}

impl Global {
    fn cache(&self) -> Result<Cache> {
        let dir = self.cache_dir.clone().unwrap_or_else(Cache::default_dir);
        Ok(Cache::open(&dir)?)
    }

    fn limits(&self) -> crate::index::Limits {
        crate::index::Limits {
            max_uncompressed: self.max_uncompressed_size.as_u64(),
            ..crate::index::Limits::default()
        }
    }

    fn platform(&self) -> Result<Option<Platform>> {
        Ok(self.platform.as_deref().map(Platform::parse).transpose()?)
    }

    async fn open(&self, image: &str) -> Result<Opened> {
        let (cache, source) = self.open_source(image).await?;
        let image = crate::fetch::resolve(&cache, &source, self.platform()?.as_ref())
            .await
            .with_context(|| format!("resolving {}", source.name()))?;
        Ok(Opened {
            cache,
            source,
            image,
        })
    }

    /// The cache and the opened source of `image`, not resolved yet (a view resolves it
    /// and looks for published indexes at once: `ImageView::resolve_and_open`).
    async fn open_source(&self, image: &str) -> Result<(Cache, Source)> {
        let cache = self.cache()?;
        let reference = ImageRef::parse(image)?;
        let mut mirrors = config::load()?.mirrors;
        if let ImageRef::Registry(r) = &reference
            && !self.mirrors.is_empty()
        {
            // Command-line mirrors come first, then the config file's.
            let configured = mirrors.remove(&r.registry).unwrap_or_default();
            let mut list = self.mirrors.clone();
            list.extend(configured.into_iter().filter(|m| !self.mirrors.contains(m)));
            mirrors.insert(r.registry.clone(), list);
        }
        let opts = SourceOptions {
            registry: ClientOptions {
                insecure: self.insecure.clone(),
                mirrors,
                pace: pace_from_env()?,
                ..Default::default()
            },
        };
        let source = Source::open(&reference, &opts)
            .await
            .with_context(|| format!("opening {reference}"))?;
        Ok((cache, source))
    }

    /// The cache, and the view of `image` opened with `opts`, with the image it shows.
    async fn open_view(
        &self,
        image: &str,
        opts: &ViewOptions,
    ) -> Result<(Cache, Image, ImageView)> {
        let (cache, source) = self.open_source(image).await?;
        let name = source.name();
        let platform = self.platform()?;
        let (image, view) =
            ImageView::resolve_and_open(&cache, Arc::new(source), platform.as_ref(), opts)
                .await
                .with_context(|| format!("opening {name}"))?;
        Ok((cache, image, view))
    }
}

/// The stall and low-speed rules (`registry::pace`), from the environment:
/// `IMGFS_STALL_TIMEOUT` (seconds without a byte), `IMGFS_LOW_SPEED_LIMIT` (bytes a second;
/// 0 turns the rule off) and `IMGFS_LOW_SPEED_TIME` (seconds it is averaged over).
/// Environment variables rather than flags: a mount's daemon inherits them.
fn pace_from_env() -> Result<crate::registry::Pace> {
    fn var(name: &str) -> Result<Option<f64>> {
        let Ok(v) = std::env::var(name) else {
            return Ok(None);
        };
        let n: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0)
            .with_context(|| format!("{name}={v:?} is not a number of seconds or bytes"))?;
        Ok(Some(n))
    }
    let mut pace = crate::registry::Pace::default();
    if let Some(s) = var("IMGFS_STALL_TIMEOUT")? {
        anyhow::ensure!(s > 0.0, "IMGFS_STALL_TIMEOUT must be more than 0 seconds");
        pace.stall = std::time::Duration::from_secs_f64(s);
    }
    if let Some(n) = var("IMGFS_LOW_SPEED_LIMIT")? {
        pace.low_speed_limit = n as u64;
    }
    if let Some(s) = var("IMGFS_LOW_SPEED_TIME")? {
        pace.low_speed_time = std::time::Duration::from_secs_f64(s);
    }
    Ok(pace)
}

async fn fetch(g: &Global, args: FetchArgs) -> Result<()> {
    let Opened {
        cache,
        source,
        image,
    } = g.open(&args.image).await?;
    let layers: Vec<_> = image.layers.iter().map(|l| &l.descriptor).collect();
    let paths = crate::fetch::all(&cache, &source, &layers, args.jobs)
        .await
        .with_context(|| format!("fetching {}", image.reference))?;
    let mut seen = std::collections::HashSet::new();
    for (layer, path) in image.layers.iter().zip(paths) {
        if seen.insert(&layer.descriptor.digest) {
            println!("{}\t{}", layer.descriptor.digest, path.display());
        }
    }
    Ok(())
}
