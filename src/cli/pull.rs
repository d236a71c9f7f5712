//! `imgfs pull IMAGE DIR`: the flattened root filesystem on disk, or as a tar stream.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{Global, Opened};
use crate::flatten::{self, Output, PullOptions};

#[derive(Args)]
pub struct PullArgs {
    /// The image (see `imgfs --help` for the forms it takes)
    image: String,
    /// New or empty directory to write the root filesystem into
    #[arg(required_unless_present = "tar")]
    dir: Option<PathBuf>,
    /// Write one tar stream to FILE instead ("-" for stdout)
    #[arg(long, value_name = "FILE", conflicts_with = "dir")]
    tar: Option<PathBuf>,
    /// Make DIR a git repository with one commit per layer
    #[arg(long, requires = "dir")]
    git: bool,
    /// Layers fetched and extracted at once
    #[arg(long, short = 'j', default_value_t = 4)]
    jobs: usize,
    /// Print nothing but errors
    #[arg(long, short)]
    quiet: bool,
    /// The image as of its first N layers
    #[arg(long, value_name = "N")]
    layer: Option<usize>,
}

pub async fn run(g: &Global, args: PullArgs) -> Result<()> {
    let Opened {
        cache,
        source,
        mut image,
    } = g.open(&args.image).await?;
    if let Some(n) = args.layer {
        let all = image.layers.len();
        if n == 0 || n > all {
            bail!("--layer {n}: the image has {all} layers (1 to {all})");
        }
        image.layers.truncate(n);
    }
    let (out, what) = match (&args.dir, &args.tar) {
        (Some(dir), None) if args.git => (Output::Git(dir.clone()), dir.display().to_string()),
        (Some(dir), None) => (Output::Dir(dir.clone()), dir.display().to_string()),
        (None, Some(t)) if t.as_os_str() == "-" => {
            (Output::Tar(Box::new(std::io::stdout())), "stdout".into())
        }
        (None, Some(t)) => {
            let f = std::fs::File::create_new(t)
                .with_context(|| format!("creating {} (it must not exist)", t.display()))?;
            (Output::Tar(Box::new(f)), t.display().to_string())
        }
        _ => bail!("give either DIR or --tar FILE"),
    };
    let started = std::time::Instant::now();
    let cancel = tokio_util::sync::CancellationToken::new();
    let signalled = super::cancel_on_signal(cancel.clone())?;
    let report = flatten::pull(
        &cache,
        &source,
        &image,
        out,
        &PullOptions {
            jobs: args.jobs,
            progress: !args.quiet,
            limits: g.limits(),
            cancel,
        },
    )
    .await;
    if let Err(crate::error::Error::Interrupted) = report {
        if let Some(t) = &args.tar
            && t.as_os_str() != "-"
        {
            let _ = std::fs::remove_file(t);
        }
        return Err(super::Interrupted(signalled.signal()).into());
    }
    let report = report.with_context(|| format!("pulling {} to {what}", image.reference));
    if report.is_err()
        && let Some(t) = &args.tar
        && t.as_os_str() != "-"
    {
        let _ = std::fs::remove_file(t);
    }
    let report = report?;
    for w in &report.warnings {
        // Already logged as they happened; repeated here so they are not lost above the bars.
        tracing::debug!("{w}");
    }
    if !args.quiet {
        eprintln!(
            "{}: {} entries from {} layers in {:.2}s",
            image.reference,
            report.entries,
            image.layers.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
