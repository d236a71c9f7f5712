//! `imgfs store DIR`: serve an Additional Layer Store for podman and CRI-O on DIR
//! (`crate::store`, `crate::fuse::store`), so that they run images without pulling their
//! layers. References are resolved with this command's options (credentials, mirrors,
//! platform), as `imgfs mount` would resolve them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use super::{Global, Opened};
use crate::store::{OpenImage, Store};

#[derive(Args)]
pub struct StoreArgs {
    /// Empty directory to serve the store on; in storage.conf, under [storage.options]:
    /// additionallayerstores = ["DIR:ref"]
    pub dir: PathBuf,
    /// Stay attached and log to stderr; Ctrl-C or SIGTERM unmounts
    #[arg(long, short)]
    pub foreground: bool,
    #[command(flatten)]
    pub read: super::ReadArgs,
}

pub async fn run(g: &Global, args: StoreArgs) -> Result<()> {
    super::mount::check_mount_dir(&args.dir)?;
    let cache = g.cache()?;
    let opts = args.read.view_options(g);
    let global = Arc::new(g.clone());
    let open_image: OpenImage = Arc::new(move |reference: String| {
        let g = global.clone();
        Box::pin(async move {
            // The library's error as it is (the store adds the reference).
            let Opened { source, image, .. } = g.open(&reference).await.map_err(|e| {
                e.downcast::<crate::error::Error>().unwrap_or_else(|e| {
                    crate::error::Error::NotFound {
                        what: "image".into(),
                        detail: format!("{e:#}"),
                    }
                })
            })?;
            Ok((source, image))
        })
    });
    let store = Arc::new(Store::new(cache, opts, open_image));
    let fs = crate::fuse::store::StoreFs::new(store, tokio::runtime::Handle::current());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("imgfs-store".into()),
        // The type `fuse.imgfs`, as `imgfs mount` gives its mounts (see there).
        if rustix::process::geteuid().is_root() {
            fuser::MountOption::CUSTOM("subtype=imgfs".into())
        } else {
            fuser::MountOption::Subtype("imgfs".into())
        },
        // Overlay mounts of the container's user read the layers, and the kernel enforces
        // the image's modes and owners. Set-user-ID files in images work as in a pull.
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Suid,
        fuser::MountOption::Dev,
    ];
    config.acl = fuser::SessionACL::All;
    let session = fuser::spawn_mount(fs, &args.dir, &config)
        .with_context(|| format!("serving the layer store on {}", args.dir.display()))?;
    tracing::info!("layer store on {}", args.dir.display());
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
    if external {
        session.join().ok();
    } else {
        session
            .umount_and_join()
            .with_context(|| format!("unmounting {}", args.dir.display()))?;
    }
    Ok(())
}
