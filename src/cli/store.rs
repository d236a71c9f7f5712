//! `imgfs store DIR`: serve an Additional Layer Store for podman and CRI-O on DIR
//! (`crate::store`, `crate::fuse::store`), so that they run images without pulling their
//! layers. References are resolved with this command's options (credentials, mirrors,
//! platform), as `imgfs mount` would resolve them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

use super::{Global, Opened, mount};
use crate::store::{OpenImage, Store};

#[derive(Args)]
pub struct StoreArgs {
    /// Empty directory to serve the store on; in storage.conf, under [storage.options]:
    /// additionallayerstores = ["DIR:ref"]
    pub dir: PathBuf,
    /// Stay attached and log to stderr; Ctrl-C or SIGTERM stops it. Without it, the store is
    /// served by a daemon (its pid printed) until `imgfs umount DIR`
    #[arg(long, short)]
    pub foreground: bool,
    #[command(flatten)]
    pub read: super::ReadArgs,
}

pub async fn run(g: &Global, args: StoreArgs) -> Result<()> {
    mount::check_mount_dir(&args.dir)?;
    if !args.foreground {
        return mount::daemon::spawn(g, "layer store", &args.dir).await;
    }
    let served = serve(g, &args).await;
    mount::daemon::remove_empty_log(g);
    served
}

/// Serve the store in this process until a signal or an unmount ends it.
async fn serve(g: &Global, args: &StoreArgs) -> Result<()> {
    let parent = mount::daemon::Parent::from_env();
    let cache = g.cache()?;
    let opts = args.read.view_options(g);
    let store = Arc::new(Store::new(cache, opts, open_image(g)));
    let fs = crate::fuse::store::StoreFs::new(store, tokio::runtime::Handle::current());
    let session = fuser::spawn_mount(fs, &args.dir, &fuse_config("imgfs-store"))
        .with_context(|| format!("serving the layer store on {}", args.dir.display()))?;
    if let Some(p) = parent {
        p.say("ready");
    }
    tracing::info!("layer store on {}", args.dir.display());
    let external = mount::wait_for_end(&session).await?;
    mount::end_session(session, external, &args.dir)?;
    tracing::info!("layer store on {} stopped", args.dir.display());
    Ok(())
}

/// References resolved as `imgfs mount` resolves them: this command's credentials, mirrors
/// and platform.
pub(super) fn open_image(g: &Global) -> OpenImage {
    let global = Arc::new(g.clone());
    Arc::new(move |reference: String| {
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
    })
}

/// Shared with every user (overlay mounts of containers read the layers), with the image's
/// modes and owners enforced by the kernel. Not read-only: containers/storage announces uses
/// by creating files (answered, never made). Set-user-ID files and devices work as in a pull.
pub(super) fn fuse_config(fsname: &str) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(fsname.into()),
        // The type `fuse.imgfs`, by which `imgfs umount` knows its own mounts.
        if rustix::process::geteuid().is_root() {
            fuser::MountOption::CUSTOM("subtype=imgfs".into())
        } else {
            fuser::MountOption::Subtype("imgfs".into())
        },
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::Suid,
        fuser::MountOption::Dev,
    ];
    config.acl = fuser::SessionACL::All;
    config
}
