//! `imgfs cache du|ls|prune`: see what the cache holds and trim it. Pruning is safe next to
//! running mounts: they keep their blobs open, hold their indexes in memory and refetch a
//! span whose chunk is gone; downloads in progress (their `tmp/` files are locked) are left alone.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use bytesize::ByteSize;
use clap::{Args, Subcommand};

use super::Global;
use crate::cache::Kind;

#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
    #[command(flatten)]
    _no_image: super::NoImage,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Show the space blobs, indexes, chunks and temporary files take
    Du,
    /// List what the cache holds, least recently used first
    Ls,
    /// Remove blobs and chunks, least recently used first (all of them unless --max-size);
    /// indexes stay unless --all
    Prune(PruneArgs),
}

#[derive(Args)]
struct PruneArgs {
    /// Remove only until the cache takes at most this much (e.g. 2GiB)
    #[arg(long, value_name = "SIZE")]
    max_size: Option<ByteSize>,
    /// Remove indexes too
    #[arg(long)]
    all: bool,
    /// Say what would go, remove nothing
    #[arg(long, short = 'n')]
    dry_run: bool,
}

pub fn run(g: &Global, args: CacheArgs) -> Result<()> {
    let cache = g.cache()?;
    match args.command {
        CacheCommand::Du => {
            let mut total = 0;
            for kind in Kind::ALL {
                let entries = cache.entries(kind);
                let size: u64 = entries.iter().map(|e| e.size).sum();
                total += size;
                println!(
                    "{:<8} {:>7} {:>11}",
                    kind.name(),
                    entries.len(),
                    ByteSize(size).to_string()
                );
            }
            println!(
                "{:<8} {:>7} {:>11}",
                "total",
                "",
                ByteSize(total).to_string()
            );
            println!("in {}", cache.root().display());
        }
        CacheCommand::Ls => {
            for kind in Kind::ALL {
                for e in cache.entries(kind) {
                    let age = SystemTime::now().duration_since(e.used).unwrap_or_default();
                    println!(
                        "{:<8} {:>11} {:>9}  {}",
                        kind.name(),
                        ByteSize(e.size).to_string(),
                        format!("{} ago", age_string(age)),
                        e.name
                    );
                }
            }
        }
        CacheCommand::Prune(p) => prune(&cache, &p),
    }
    Ok(())
}

fn age_string(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn prune(cache: &crate::cache::Cache, p: &PruneArgs) {
    let doomed = cache.prune_plan(p.max_size.map(|m| m.as_u64()), p.all);
    let mut freed = 0;
    let mut count = 0;
    for e in &doomed {
        if p.dry_run {
            println!("would remove {} {}", e.kind.name(), e.name);
        } else if let Err(err) = cache.remove(e) {
            eprintln!("imgfs: keeping {}: {err}", e.path.display());
            continue;
        }
        freed += e.size;
        count += 1;
    }
    println!(
        "{} {count} files, {}",
        if p.dry_run { "would free" } else { "freed" },
        ByteSize(freed)
    );
}
