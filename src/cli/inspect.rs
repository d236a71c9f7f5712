//! `imgfs inspect`: what an image is, without downloading its layers.

use std::io::Write;

use anyhow::Result;
use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{Global, Opened};
use crate::manifest::{Descriptor, Image, Layer};

#[derive(Args)]
pub struct InspectArgs {
    /// The image (see `imgfs --help` for the forms it takes)
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

/// `imgfs inspect`: the manifest or config as received, a JSON report, or one for a person.
pub async fn run(g: &Global, args: InspectArgs) -> Result<()> {
    let Opened { image, .. } = g.open(&args.image).await?;
    let mut out = std::io::stdout().lock();
    match args.raw {
        Some(Raw::Manifest) => out.write_all(&image.raw_manifest)?,
        Some(Raw::Config) => out.write_all(&image.raw_config)?,
        None if args.json => write_json(&mut out, &image)?,
        None => write_text(&mut out, &image)?,
    }
    Ok(())
}

/// The `--json` report, for scripts.
fn write_json(out: &mut impl Write, image: &Image) -> Result<()> {
    let report = Report {
        reference: &image.reference,
        digest: image.manifest_digest.to_string(),
        media_type: &image.manifest_media_type,
        index_digest: image.index_digest.as_ref().map(|d| d.to_string()),
        platform: image.platform.to_string(),
        config: image.config.as_ref(),
        layers: &image.layers,
    };
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)?;
    Ok(())
}

/// The report for a person: the manifest, the config's essentials, then one line per layer.
fn write_text(out: &mut impl Write, image: &Image) -> Result<()> {
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
    if let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(&image.raw_config) {
        write_config(out, &cfg)?;
    }
    write_layers(out, &image.layers)
}

/// The config's essentials, as the image's author set them (absent ones omitted).
fn write_config(out: &mut impl Write, cfg: &serde_json::Value) -> Result<()> {
    let run = &cfg["config"];
    let words = |v: &serde_json::Value| {
        v.as_array().map(|a| {
            let w: Vec<String> = a
                .iter()
                .map(|x| x.as_str().unwrap_or("?").to_string())
                .collect();
            serde_json::to_string(&w).unwrap_or_default()
        })
    };
    if let Some(c) = cfg["created"].as_str() {
        writeln!(out, "Created:    {c}")?;
    }
    if let Some(e) = words(&run["Entrypoint"]) {
        writeln!(out, "Entrypoint: {e}")?;
    }
    if let Some(c) = words(&run["Cmd"]) {
        writeln!(out, "Cmd:        {c}")?;
    }
    if let Some(u) = run["User"].as_str().filter(|u| !u.is_empty()) {
        writeln!(out, "User:       {u}")?;
    }
    if let Some(w) = run["WorkingDir"].as_str().filter(|w| !w.is_empty()) {
        writeln!(out, "WorkingDir: {w}")?;
    }
    if let Some(ports) = run["ExposedPorts"].as_object().filter(|p| !p.is_empty()) {
        let p: Vec<&str> = ports.keys().map(String::as_str).collect();
        writeln!(out, "Ports:      {}", p.join(", "))?;
    }
    for (i, e) in run["Env"].as_array().into_iter().flatten().enumerate() {
        let label = if i == 0 { "Env:" } else { "" };
        writeln!(out, "{label:<12}{}", e.as_str().unwrap_or("?"))?;
    }
    let labels = run["Labels"].as_object().into_iter().flatten();
    for (i, (k, v)) in labels.enumerate() {
        let label = if i == 0 { "Labels:" } else { "" };
        writeln!(out, "{label:<12}{k}={}", v.as_str().unwrap_or("?"))?;
    }
    Ok(())
}

/// The layers, bottom first: their total, then each one's digest, size and format.
fn write_layers(out: &mut impl Write, layers: &[Layer]) -> Result<()> {
    let total: u64 = layers.iter().map(|l| l.descriptor.size).sum();
    writeln!(
        out,
        "Layers:     {} ({} compressed)",
        layers.len(),
        human(total)
    )?;
    for (i, l) in layers.iter().enumerate() {
        let size = if l.descriptor.size == 0 {
            "size unknown".to_string()
        } else {
            human(l.descriptor.size)
        };
        let kind = match crate::layer::format::toc_format(l.compression, &l.descriptor.annotations)
        {
            Some((format, _)) => format.name().to_lowercase(),
            None => l.compression.to_string(),
        };
        writeln!(
            out,
            "  {:>3}  {}  {:>10}  {kind}",
            i + 1,
            l.descriptor.digest,
            size,
        )?;
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
