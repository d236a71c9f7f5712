//! `imgfs index build|push IMAGE`: make the layer indexes of an image, and publish them to
//! its repository as an index artifact (`crate::artifact`) for other machines to mount from.

use std::collections::HashSet;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures_util::{StreamExt, TryStreamExt};

use super::{Global, Opened};
use crate::manifest::Layer;

#[derive(Args)]
pub struct IndexArgs {
    #[command(subcommand)]
    command: IndexCommand,
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Index every layer of IMAGE into the cache (layers already indexed are reused)
    Build(ImageArg),
    /// Build the indexes if needed and push them to IMAGE's repository as an OCI artifact
    /// that refers to the image manifest
    Push(PushArgs),
}

#[derive(Args)]
struct PushArgs {
    #[command(flatten)]
    image: ImageArg,
    /// Publish this access profile with the indexes (`imgfs mount --record-profile`):
    /// mounts that use the indexes fetch what it names at once, ahead of reads
    #[arg(long, value_name = "FILE")]
    profile: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct ImageArg {
    /// The image (see `imgfs --help` for the forms it takes)
    image: String,
    /// Layers fetched and indexed at once
    #[arg(long, short = 'j', default_value_t = 4)]
    jobs: usize,
    /// Uncompressed bytes between seek points in layers indexed now (a layer already
    /// indexed in the cache keeps its index): smaller spans make a small read fetch less.
    /// 2 MiB by default, half what a mount indexing a layer itself uses: over a wide-area
    /// link programs started faster than with 4 MiB, with or without a profile, and a
    /// published index carries no windows (BENCHMARKS.md, "Slim published indexes")
    #[arg(long, value_name = "SIZE", default_value = "2MiB", value_parser = parse_span)]
    span_size: bytesize::ByteSize,
}

/// A span size imgfs can read back: at least 64 KiB (a checkpoint carries a 32 KiB window),
/// at most 64 MiB (the largest range a read fetches).
fn parse_span(s: &str) -> Result<bytesize::ByteSize, String> {
    let size: bytesize::ByteSize = s.parse()?;
    if !(64 << 10..=64 << 20).contains(&size.as_u64()) {
        return Err(format!("{size} is not between 64KiB and 64MiB"));
    }
    Ok(size)
}

pub async fn run(g: &Global, args: IndexArgs) -> Result<()> {
    match args.command {
        IndexCommand::Build(a) => {
            let opened = build(g, &a).await?;
            report(&opened);
            Ok(())
        }
        IndexCommand::Push(PushArgs { image: a, profile }) => {
            // Read first: a wrong file should not cost an indexing run.
            let profile = match &profile {
                Some(f) => {
                    let bytes = std::fs::read(f)
                        .with_context(|| format!("reading the profile {}", f.display()))?;
                    Some(
                        crate::profile::Profile::parse(&bytes)
                            .with_context(|| format!("reading the profile {}", f.display()))?,
                    )
                }
                None => None,
            };
            let Opened {
                cache,
                source,
                image,
            } = build(g, &a).await?;
            let pushed = crate::artifact::push(&cache, &source, &image, profile.as_ref())
                .await
                .with_context(|| format!("pushing the indexes of {}", image.reference))?;
            let compressed: u64 = image
                .unique_layers()
                .iter()
                .map(|l| l.descriptor.size)
                .sum();
            println!(
                "pushed index artifact {} for {} ({} index(es), {} bytes, {:.2}% of the layers' \
                 {} compressed bytes{}{}{}{})",
                pushed.artifact,
                image.manifest_digest,
                pushed.indexes,
                pushed.index_bytes,
                100.0 * pushed.index_bytes as f64 / compressed.max(1) as f64,
                compressed,
                if pushed.windows_bytes > 0 {
                    format!(
                        "; their seek points' windows apart, {} bytes read as needed",
                        pushed.windows_bytes
                    )
                } else {
                    String::new()
                },
                if pushed.skipped_estargz > 0 {
                    format!("; {} eStargz layer(s) need none", pushed.skipped_estargz)
                } else {
                    String::new()
                },
                match pushed.profile {
                    Some((reads, fitting)) if fitting < reads => format!(
                        "; an access profile of {reads} reads, {} of them in layers this image \
                         does not have",
                        reads - fitting
                    ),
                    Some((reads, _)) => format!("; an access profile of {reads} reads"),
                    None => String::new(),
                },
                if pushed.tag_updated {
                    format!(
                        "; listed under tag {}",
                        crate::artifact::fallback_tag(&image.manifest_digest)
                    )
                } else {
                    String::new()
                },
            );
            Ok(())
        }
    }
}

/// Index every layer here (`crate::obtain`, which caches what it builds): a published index
/// is not consulted, so that what `push` publishes was built from the verified blob on this
/// machine, never relayed.
async fn build(g: &Global, a: &ImageArg) -> Result<Opened> {
    let opened = g.open(&a.image).await?;
    let Opened {
        cache,
        source,
        image,
    } = &opened;
    let opts = crate::obtain::Options {
        remote_index: false,
        limits: g.limits(),
        span: a.span_size.as_u64(),
        ..Default::default()
    };
    let n = image.layers.len();
    let mut seen = HashSet::new();
    let mut layers: Vec<(usize, &Layer)> = (image.layers.iter().enumerate())
        .filter(|(_, l)| seen.insert(&l.descriptor.digest))
        .collect();
    // Largest first, as a view does: the biggest layer is the one the others wait for.
    layers.sort_by_key(|(_, l)| std::cmp::Reverse(l.descriptor.size));
    futures_util::stream::iter(layers)
        .map(|(i, l)| crate::obtain::layer_index(cache, source, l, (i, n), &opts, None))
        .buffer_unordered(a.jobs.max(1))
        // Each index is in the cache once obtained: nothing is kept here.
        .try_for_each(|_| std::future::ready(Ok(())))
        .await
        .with_context(|| format!("indexing {}", image.reference))?;
    Ok(opened)
}

/// One line per layer: digest, entries, index size (bytes and per entry).
fn report(o: &Opened) {
    for layer in o.image.unique_layers() {
        let d = &layer.descriptor.digest;
        match o.cache.load_index_bytes(d) {
            Some(bytes) => {
                let entries = crate::index::codec::decode(d, &bytes)
                    .map(|i| i.entries.len())
                    .unwrap_or(0);
                println!(
                    "{d}\t{entries} entries\t{} bytes\t{:.1} B/entry",
                    bytes.len(),
                    bytes.len() as f64 / entries.max(1) as f64
                );
            }
            None => println!("{d}\teStargz: its TOC is its index"),
        }
    }
}
