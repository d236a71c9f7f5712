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
            progress: (!args.quiet).then(|| {
                std::sync::Arc::new(Bars::default()) as std::sync::Arc<dyn flatten::PullProgress>
            }),
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

/// Progress bars for a pull: one per layer and one for all (indicatif draws only on a
/// terminal).
#[derive(Default)]
struct Bars {
    multi: indicatif::MultiProgress,
    layers: std::sync::Mutex<Vec<(indicatif::ProgressBar, u64)>>,
    overall: std::sync::OnceLock<indicatif::ProgressBar>,
}

impl flatten::PullProgress for Bars {
    fn start(&self, layers: &[(crate::digest::Digest, u64)]) {
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} {bar:30} {bytes:>10}/{total_bytes:<10} {msg}",
        )
        .expect("a valid template");
        let total = layers.iter().map(|(_, n)| n).sum();
        let mut bars = self.layers.lock().unwrap();
        for (digest, size) in layers {
            let bar = self
                .multi
                .add(indicatif::ProgressBar::new(*size).with_style(style.clone()));
            bar.set_prefix(digest.short().to_string());
            bars.push((bar, 0));
        }
        let overall = self
            .multi
            .add(indicatif::ProgressBar::new(total).with_style(style));
        overall.set_prefix("all layers  ");
        let _ = self.overall.set(overall);
    }

    fn bytes(&self, layer: usize, received: u64) {
        let mut bars = self.layers.lock().unwrap();
        if let Some((bar, last)) = bars.get_mut(layer) {
            bar.set_position(received);
            if let Some(o) = self.overall.get() {
                o.inc(received.saturating_sub(*last));
            }
            *last = received;
        }
    }

    fn state(&self, layer: usize, state: &str) {
        if let Some((bar, _)) = self.layers.lock().unwrap().get(layer) {
            if state == "done" {
                bar.finish_with_message("done");
            } else {
                bar.set_message(state.to_string());
            }
        }
    }

    fn finish(&self) {
        if let Some(o) = self.overall.get() {
            o.finish_and_clear();
        }
        self.multi.clear().ok();
    }
}
