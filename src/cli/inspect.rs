//! `imgfs inspect`: what an image is, without downloading its layers.

use std::io::Write;

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{Global, Opened};
use crate::manifest::{Descriptor, Layer};

#[derive(Args)]
pub struct InspectArgs {
    image: String,
    /// Print JSON for scripts
    #[arg(long, conflicts_with = "raw")]
    json: bool,
    /// Print the manifest or config exactly as received
    #[arg(long, value_enum)]
    raw: Option<Raw>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Raw {
    Manifest,
    Config,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report<'a> {
    reference: &'a str,
    digest: String,
    media_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    index_digest: Option<String>,
    platform: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<&'a Descriptor>,
    layers: &'a [Layer],
}

pub async fn run(g: &Global, args: InspectArgs) -> Result<()> {
    let Opened { image, .. } = g.open(&args.image).await?;
    let mut out = std::io::stdout().lock();
    match args.raw {
        Some(Raw::Manifest) => out.write_all(&image.raw_manifest)?,
        Some(Raw::Config) => out.write_all(&image.raw_config)?,
        None if args.json => {
            let report = Report {
                reference: &image.reference,
                digest: image.manifest_digest.to_string(),
                media_type: &image.manifest_media_type,
                index_digest: image.index_digest.as_ref().map(|d| d.to_string()),
                platform: image.platform.to_string(),
                config: image.config.as_ref(),
                layers: &image.layers,
            };
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        }
        None => {
            writeln!(out, "Reference:  {}", image.reference)?;
            writeln!(out, "Digest:     {}", image.manifest_digest)?;
            writeln!(out, "MediaType:  {}", image.manifest_media_type)?;
            if let Some(i) = &image.index_digest {
                writeln!(out, "Index:      {i}")?;
            }
            writeln!(out, "Platform:   {}", image.platform)?;
            if let Some(c) = &image.config {
                writeln!(out, "Config:     {} ({} bytes)", c.digest, c.size)?;
            }
            let total: u64 = image.layers.iter().map(|l| l.descriptor.size).sum();
            writeln!(
                out,
                "Layers:     {} ({} compressed)",
                image.layers.len(),
                human(total)
            )?;
            for (i, l) in image.layers.iter().enumerate() {
                let size = if l.descriptor.size == 0 {
                    "size unknown".to_string()
                } else {
                    human(l.descriptor.size)
                };
                writeln!(
                    out,
                    "  {:>3}  {}  {:>10}  {}",
                    i + 1,
                    l.descriptor.digest,
                    size,
                    l.compression
                )?;
            }
        }
    }
    Ok(())
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
