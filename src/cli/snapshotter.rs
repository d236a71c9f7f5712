//! `imgfs snapshotter`: serve containerd's snapshots API on a unix socket
//! (`crate::snapshotter`), with lazy layers served by a layer store mounted at
//! `<root>/layers`. It runs in the foreground, as a service manager expects; SIGTERM or
//! Ctrl-C stops it. A daemon killed before leaves a dead FUSE mount there, which is
//! detached first: snapshots recorded before are served again from their records.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::Global;
use super::store::{fuse_config, open_image};
use crate::snapshotter::{Snapshotter, service};
use crate::store::Store;

#[derive(Args)]
pub struct SnapshotterArgs {
    /// Unix socket to serve on: the `address` of `[proxy_plugins.imgfs]` in containerd's
    /// config (README)
    #[arg(long, default_value = "/run/imgfs/snapshotter.sock")]
    pub address: PathBuf,
    /// Directory for snapshots, their state and the layer store's mount
    #[arg(long, default_value = "/var/lib/imgfs/snapshotter")]
    pub root: PathBuf,
    #[command(flatten)]
    pub read: super::ReadArgs,
}

pub async fn run(g: &Global, args: SnapshotterArgs) -> Result<()> {
    let root = &args.root;
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    if let Some(dir) = args.address.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let layers = Snapshotter::layers_dir(root);
    detach_stale(&layers);
    let store = Arc::new(Store::new(
        g.cache()?,
        args.read.view_options(g),
        open_image(g),
    ));
    let rt = tokio::runtime::Handle::current();
    let snapshotter = Arc::new(
        Snapshotter::open(root, store.clone(), rt.clone())
            .with_context(|| format!("opening the snapshotter's state in {}", root.display()))?,
    );
    let fs = crate::fuse::store::StoreFs::new(store, rt);
    let session = fuser::spawn_mount(fs, &layers, &fuse_config("imgfs-snapshotter"))
        .with_context(|| format!("serving lazy layers on {}", layers.display()))?;
    tracing::info!(
        "snapshotter on {} (root {})",
        args.address.display(),
        root.display()
    );
    let served = service::serve(snapshotter, &args.address, stop()).await;
    let _ = std::fs::remove_file(&args.address);
    // Detached rather than unmounted, which fails while containers use the layers; their
    // reads fail once this process is gone, and new ones find the next daemon's mount.
    detach_stale(&layers);
    // Its drop would unmount by path, which is already done.
    std::mem::forget(session);
    served.with_context(|| format!("serving on {}", args.address.display()))
}

/// Detach a FUSE mount left on `dir` by a daemon that was killed (its connection is gone,
/// and every access fails with ENOTCONN), so that a new one can be mounted there.
fn detach_stale(dir: &Path) {
    match rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => tracing::info!("detached the previous layer store on {}", dir.display()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => {}
        Err(e) => tracing::warn!("detaching {}: {e}", dir.display()),
    }
}

async fn stop() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
