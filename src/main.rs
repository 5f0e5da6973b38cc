//! The `patchgd` command line: `run` a pipeline definition, `synth` a data set, `inspect` images.

/// The command line's own modules (the library has none of this).
mod cli {
    pub mod progress;
}

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use patchgd::patch::Foreground;
use patchgd::pipeline::{Definition, RunOptions, run_with};
use patchgd::source::StreamConfig;
use patchgd::source::inspect::{inspect as inspect_object, scan_entries};
use patchgd::source::list_images;
use patchgd::storage::{Location, StoreOptions};
use patchgd::synth::{
    ImageFormat, Recipe, SynthOverrides, SynthSpec, mnist::MnistDigits, write_ultramnist,
};
use patchgd::train::metrics::{peak_rss_bytes, rss_bytes};

#[derive(Parser)]
#[command(
    name = "patchgd",
    version,
    about = "Patch Gradient Descent on very large images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a pipeline definition (YAML): train, evaluate, and write the results to its output.
    Run {
        pipeline: PathBuf,
        /// Override a key of the file, e.g. `--set method=gd --set output=out/gd` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Plain log lines even on a terminal.
        #[arg(long)]
        no_progress: bool,
        /// Start over: delete the checkpoints under the output instead of resuming from them.
        /// (Without it, a run resumes from its newest complete checkpoint.)
        #[arg(long)]
        fresh: bool,
    },
    /// Generate a data set.
    Synth {
        #[command(subcommand)]
        kind: SynthKind,
    },
    /// Describe image objects: size, levels, tiles, compression, channels, patch counts.
    Inspect(InspectArgs),
    /// Measure the performance targets (docs/benchmarks.md): pipeline efficiency against
    /// the in-memory ceiling, peak memory by image size, PatchGD vs GD at one memory budget.
    Bench(BenchArgs),
    /// Query images, patches, latents and run results with SQL (docs/sql.md). Without a query:
    /// an interactive prompt with history.
    Sql(SqlArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Parts to run (repeatable); all by default.
    #[arg(long, value_enum)]
    only: Vec<patchgd::bench::Part>,
    /// Working directory for generated data and runs.
    #[arg(long, default_value = "out/bench")]
    dir: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32, bf16 (mixed precision), or f16 (mixed precision, CUDA).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Small sizes and counts (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Wall time of each run (each method, each seed) in the memory-budget comparison.
    #[arg(long, default_value_t = 240.0)]
    seconds: f64,
    /// Image sizes for the memory part.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
    sizes: Vec<u32>,
    /// Backbones for the efficiency part.
    #[arg(long, value_delimiter = ',', default_value = "small_cnn,resnet18")]
    backbones: Vec<String>,
    /// Also write the report (Markdown) to this file.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SqlArgs {
    /// The query; omit it for the interactive prompt.
    query: Option<String>,
    /// A pipeline file: its images become `images` and `patches` (with its patch settings),
    /// and its output directory's results `metrics`, `predictions`, `errors`, `latents`.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Images URL for `images` and `patches` (instead of --pipeline).
    #[arg(long)]
    images: Option<String>,
    /// Labels table (CSV or Parquet) for --images.
    #[arg(long)]
    labels: Option<String>,
    /// Patch size for --images.
    #[arg(long, default_value_t = 256)]
    patch: usize,
    /// Pyramid level for --images.
    #[arg(long, default_value_t = 0)]
    level: usize,
    /// Channels for --images: 1 (grey) or 3 (RGB).
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// A run's output directory (instead of the pipeline's).
    #[arg(long)]
    run: Option<String>,
    /// Object store setting (repeatable; credentials come from the environment).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    storage: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: patchgd::sql::shell::Format,
    /// Write the result to this file instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// An image object, or a prefix: every object under it is inspected.
    url: String,
    /// Patch size for the patch counts.
    #[arg(long, default_value_t = 256)]
    patch: usize,
    /// Stride (defaults to the patch size).
    #[arg(long)]
    stride: Option<usize>,
    /// Object store setting, e.g. `--storage endpoint=http://127.0.0.1:9000` (repeatable;
    /// credentials come from the environment).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    storage: Vec<String>,
    /// At most this many objects of a prefix.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Also stream every patch through the source (at --level) and report counts, foreground,
    /// throughput and peak memory.
    #[arg(long)]
    scan: bool,
    /// Pyramid level for --scan.
    #[arg(long, default_value_t = 0)]
    level: usize,
    /// Channels for --scan: 1 (grey) or 3 (RGB).
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Foreground threshold and background for --scan: `220` (light background, slides) or
    /// `dark:32` (dark background, UltraMNIST).
    #[arg(long, default_value = "220")]
    foreground: String,
    /// With --scan: keep only patches with at least this foreground fraction.
    #[arg(long, default_value_t = 0.0)]
    min_foreground: f32,
    /// With --scan: parallel decodes and the buffer bound in MiB.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 128)]
    buffer_mib: usize,
}

fn sql(args: SqlArgs) -> Result<()> {
    use patchgd::sql::{DataSet, Sources, register, session, shell};
    let mut storage = StoreOptions::from_pairs(&args.storage)?;
    let mut sources = Sources::default();
    if let Some(path) = &args.pipeline {
        let def = Definition::from_file(path)?;
        if args.storage.is_empty() {
            storage = def.storage.clone();
        }
        sources.data = Some(def.data_set());
        // The run tables exist once the pipeline has run.
        let out = Location::parse_with(&def.output, &def.storage)?;
        let rt = tokio::runtime::Runtime::new()?;
        if rt.block_on(out.head(&out.path("metrics.parquet"))).is_ok() {
            sources.run = Some(def.output.clone());
        }
    }
    if let Some(images) = &args.images {
        let mut data = DataSet::new(images, args.patch);
        data.labels = args.labels.clone();
        data.storage = storage.clone();
        data.stream.level = args.level;
        data.stream.channels = args.channels;
        sources.data = Some(data);
    }
    if let Some(run) = &args.run {
        sources.run = Some(run.clone());
    }
    sources.storage = storage;
    let rt = tokio::runtime::Runtime::new()?;
    let ctx = session();
    let reported = rt.block_on(register(&ctx, &sources))?;
    let wants_latents = args.query.as_ref().is_none_or(|q| q.contains("latents"));
    if let Some(run) = &sources.run
        && wants_latents
        && !ctx.table_exist("latents")?
    {
        eprintln!("note: no latents table: run '{run}' has no complete checkpoint");
    }
    let out = shell::Output {
        format: args.format,
        file: args.output.clone(),
    };
    match &args.query {
        Some(q) => {
            rt.block_on(shell::run_one(&ctx, &reported, q, &out))?;
        }
        None => {
            let mut tables: Vec<&str> = vec![];
            if sources.data.is_some() {
                tables.extend(["images", "patches"]);
            }
            if sources.run.is_some() {
                tables.extend(["metrics", "predictions", "errors", "latents"]);
            }
            let banner = format!(
                "patchgd sql: tables {}",
                if tables.is_empty() {
                    "none (use --pipeline, --images or --run; table functions work)".to_string()
                } else {
                    tables.join(", ")
                }
            );
            shell::interactive(&rt, &ctx, &reported, &banner)?;
        }
    }
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
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
        let (light, threshold) = match args.foreground.strip_prefix("dark:") {
            Some(t) => (false, t),
            None => (
                true,
                args.foreground
                    .strip_prefix("light:")
                    .unwrap_or(&args.foreground),
            ),
        };
        let mut config = StreamConfig::new(args.patch, args.channels);
        config.stride = stride;
        config.level = args.level;
        config.decode_workers = args.workers;
        config.buffer_bytes = args.buffer_mib << 20;
        config.foreground = Foreground {
            threshold: threshold.parse().with_context(|| {
                format!(
                    "--foreground '{}': expected 0-255 or dark:N",
                    args.foreground
                )
            })?,
            light_background: light,
            min_fraction: args.min_foreground,
        };
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

#[derive(Subcommand)]
enum SynthKind {
    /// UltraMNIST: 3-5 digits on a black canvas, label = their sum (docs/ultramnist.md).
    Ultramnist(UltramnistArgs),
}

#[derive(clap::Args)]
struct UltramnistArgs {
    /// Take defaults from this pipeline file's `synth:` section (flags override them).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output URL or path: images go under OUT/images, labels to OUT/labels.csv.
    #[arg(long)]
    out: Option<String>,
    /// Canvas size in pixels.
    #[arg(long)]
    size: Option<u32>,
    /// Number of classes: labels (digit sums) 0..classes-1.
    #[arg(long)]
    classes: Option<u32>,
    /// Training images.
    #[arg(long)]
    train: Option<usize>,
    /// Validation images.
    #[arg(long)]
    val: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Directory with the MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte),
    /// for real handwritten digits instead of the built-in glyphs.
    #[arg(long)]
    mnist: Option<PathBuf>,
    /// `png` (default), or `tiff`: tiled pyramidal TIFF written tile by tile (8k-32k px images).
    #[arg(long)]
    format: Option<String>,
    /// TIFF tile size (default 256).
    #[arg(long)]
    tile: Option<u32>,
    /// TIFF tile compression: jpeg (default), deflate, lzw or none.
    #[arg(long)]
    compression: Option<String>,
    /// Write BigTIFF (64-bit offsets).
    #[arg(long)]
    bigtiff: bool,
}

fn synth(args: UltramnistArgs) -> Result<()> {
    let base = match &args.config {
        Some(path) => Some(Definition::from_file(path)?.synth.with_context(|| {
            format!("pipeline file '{}' has no synth: section", path.display())
        })?),
        None => None,
    };
    let spec = SynthOverrides {
        out: args.out,
        size: args.size,
        classes: args.classes,
        train: args.train,
        val: args.val,
        seed: args.seed,
        format: args.format,
        tile: args.tile,
        compression: args.compression,
    }
    .over(base)
    .map_err(|e| anyhow::anyhow!("--{e}"))?;
    let mut format = spec.image_format()?;
    if let ImageFormat::Tiff { bigtiff, .. } = &mut format {
        *bigtiff = args.bigtiff;
    }
    let mnist = args.mnist.as_deref().map(MnistDigits::load).transpose()?;
    let SynthSpec {
        out,
        size,
        classes,
        train,
        val,
        seed,
        ..
    } = spec;
    let recipe = Recipe::new(size, classes, seed);
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let loc = Location::parse(&out)?;
    rt.block_on(write_ultramnist(
        &loc,
        &recipe,
        train,
        val,
        mnist.as_ref(),
        format,
    ))?;
    eprintln!(
        "synth: {train} train + {val} val UltraMNIST images ({size} px, {classes} classes, seed {seed}) written to {} in {:.1} s",
        loc.url,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The library reports through `tracing`: warnings and notes go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .init();
    match cli.command {
        Command::Run {
            pipeline,
            set,
            no_progress,
            fresh,
        } => {
            let text = std::fs::read_to_string(&pipeline)
                .with_context(|| format!("cannot read pipeline file '{}'", pipeline.display()))?;
            let overrides: Vec<&str> = set.iter().map(String::as_str).collect();
            let def = Definition::from_yaml_with_overrides(
                &text,
                &pipeline.display().to_string(),
                &overrides,
            )?;
            let progress = Arc::new(cli::progress::Progress::new(!no_progress));
            let summary = run_with(
                &def,
                &RunOptions {
                    fresh,
                    observer: Some(progress.clone()),
                },
            );
            progress.finish();
            let summary = summary?;
            println!(
                "{}: validation accuracy {:.3} (QWK {:.3}) after {} epoch{}; images seen {} = used {} + failed {}{}; {:.1} s; results in {}",
                summary.name,
                summary.final_val_accuracy,
                summary.final_val_qwk,
                summary.epochs,
                if summary.epochs == 1 { "" } else { "s" },
                summary.images_seen,
                summary.images_used,
                summary.images_failed,
                if summary.images_deselected > 0 {
                    format!(" + left out by select: {}", summary.images_deselected)
                } else {
                    String::new()
                },
                summary.wall_seconds,
                summary.output
            );
        }
        Command::Synth {
            kind: SynthKind::Ultramnist(args),
        } => synth(args)?,
        Command::Inspect(args) => inspect(args)?,
        Command::Sql(args) => sql(args)?,
        Command::Bench(args) => bench(args)?,
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    use patchgd::bench::{BenchOptions, Part};
    let opts = BenchOptions {
        dir: std::path::absolute(&args.dir)?,
        device: serde_norway::from_str(&args.device)
            .with_context(|| format!("--device '{}': expected auto, cpu or cuda", args.device))?,
        precision: serde_norway::from_str(&args.precision).with_context(|| {
            format!(
                "--precision '{}': expected f32, bf16 or f16",
                args.precision
            )
        })?,
        quick: args.quick,
        budget_seconds: if args.quick { 5.0 } else { args.seconds },
        exe: std::env::current_exe()?,
    };
    let parts = if args.only.is_empty() {
        vec![
            Part::Efficiency,
            Part::Memory,
            Part::Budget,
            Part::Precision,
        ]
    } else {
        args.only
    };
    let backbones = args
        .backbones
        .iter()
        .map(|b| b.parse().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let sizes = if args.quick && args.sizes == [1024, 4096, 16384] {
        vec![128, 256, 512]
    } else {
        args.sizes
    };
    let report =
        patchgd::bench::run(&opts, &parts, &backbones, &sizes).map_err(anyhow::Error::msg)?;
    if let Some(path) = args.output {
        std::fs::write(&path, report)
            .with_context(|| format!("cannot write '{}'", path.display()))?;
    }
    Ok(())
}
