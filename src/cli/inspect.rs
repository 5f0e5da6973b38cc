//! `patchgd inspect`: describe image objects, optionally stream every patch (`--scan`).

use anyhow::{Result, bail};
use patchgd::patch::Foreground;
use patchgd::source::StreamConfig;
use patchgd::source::inspect::{inspect as inspect_object, scan_entries};
use patchgd::source::list_images;
use patchgd::storage::StoreOptions;
use patchgd::train::metrics::{peak_rss_bytes, rss_bytes};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// An image object, or a prefix: every object under it is inspected.
    pub url: String,
    /// Patch size for the patch counts.
    #[arg(long, default_value_t = 256)]
    pub patch: usize,
    /// Stride (defaults to the patch size).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Object store setting, e.g. `--storage endpoint=http://127.0.0.1:9000` (repeatable;
    /// credentials come from the environment).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    pub storage: Vec<String>,
    /// At most this many objects of a prefix.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Also stream every patch through the source (at --level) and report counts, foreground,
    /// throughput and peak memory.
    #[arg(long)]
    pub scan: bool,
    /// Pyramid level for --scan.
    #[arg(long, default_value_t = 0)]
    pub level: usize,
    /// Channels for --scan: 1 (grey) or 3 (RGB).
    #[arg(long, default_value_t = 3)]
    pub channels: usize,
    /// Foreground threshold and background for --scan: `220` (light background, slides) or
    /// `dark:32` (dark background, UltraMNIST).
    #[arg(long, default_value = "220")]
    pub foreground: String,
    /// With --scan: keep only patches with at least this foreground fraction.
    #[arg(long, default_value_t = 0.0)]
    pub min_foreground: f32,
    /// With --scan: parallel decodes and the buffer bound in MiB.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    #[arg(long, default_value_t = 128)]
    pub buffer_mib: usize,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let opts = StoreOptions::from_pairs(&args.storage)?;
    let stride = args.stride.unwrap_or(args.patch);
    let rt = tokio::runtime::Runtime::new()?;
    let listing = rt.block_on(list_images(&args.url, &opts))?;
    if listing.images.len() > args.limit {
        eprintln!(
            "{} objects; showing the first {} (--limit)",
            listing.images.len(),
            args.limit
        );
    }
    let loc = &listing.location;
    let mut failed = listing.failures.len();
    for f in &listing.failures {
        println!("{}: {}", f.url, f.message);
    }
    for entry in listing.images.iter().take(args.limit) {
        match rt.block_on(inspect_object(
            loc,
            &entry.path,
            entry.size,
            args.patch,
            stride,
        )) {
            Ok(info) => print!("{}", info.render(args.patch, stride)),
            Err(e) => {
                failed += 1;
                println!("{e}");
            }
        }
    }
    if args.scan {
        let mut config = StreamConfig::new(args.patch, args.channels);
        config.stride = stride;
        config.level = args.level;
        config.decode_workers = args.workers;
        config.buffer_bytes = args.buffer_mib << 20;
        config.foreground =
            Foreground::parse(&args.foreground, args.min_foreground).map_err(anyhow::Error::msg)?;
        let rss_before = rss_bytes();
        let report = rt.block_on(scan_entries(loc, listing.images.clone(), config));
        let mib = report.pixel_bytes as f64 / (1 << 20) as f64;
        println!(
            "scan: {} images ({} failed), {} patches, {} kept (fg >= {}), mean fg fraction {:.3}; {:.1} MiB of patch pixels in {:.2} s = {:.1} MiB/s, {:.0} patches/s; RSS before scan {:.0} MiB, peak RSS {:.0} MiB",
            report.images,
            report.failures.len(),
            report.patches,
            report.kept,
            args.min_foreground,
            report.mean_fg_fraction,
            mib,
            report.seconds,
            mib / report.seconds,
            report.patches as f64 / report.seconds,
            rss_before as f64 / (1 << 20) as f64,
            peak_rss_bytes() as f64 / (1 << 20) as f64
        );
        for f in &report.failures {
            println!("  failed: {} ({}): {}", f.image_id, f.url, f.message);
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} objects could not be inspected",
            listing.images.len().min(args.limit) + listing.failures.len()
        );
    }
    Ok(())
}
