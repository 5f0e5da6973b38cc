//! The `patchgd` command line: `run` a pipeline definition, `synth` a data set.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use patchgd::pipeline::{Definition, run};
use patchgd::storage::Location;
use patchgd::synth::{Recipe, mnist::MnistDigits, write_ultramnist};

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
    },
    /// Generate a data set.
    Synth {
        #[command(subcommand)]
        kind: SynthKind,
    },
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
}

fn synth(args: UltramnistArgs) -> Result<()> {
    let base = match &args.config {
        Some(path) => Some(Definition::from_file(path)?.synth.with_context(|| {
            format!("pipeline file '{}' has no synth: section", path.display())
        })?),
        None => None,
    };
    let pick = |flag: Option<u32>, from: Option<u32>, name: &str| {
        flag.or(from)
            .with_context(|| format!("--{name} is required"))
    };
    let out = args
        .out
        .or(base.as_ref().map(|b| b.out.clone()))
        .context("--out is required")?;
    let size = pick(args.size, base.as_ref().map(|b| b.size), "size")?;
    let classes = pick(args.classes, base.as_ref().map(|b| b.classes), "classes")?;
    let train = args
        .train
        .or(base.as_ref().map(|b| b.train))
        .context("--train is required")?;
    let val = args
        .val
        .or(base.as_ref().map(|b| b.val))
        .context("--val is required")?;
    let seed = args.seed.or(base.as_ref().map(|b| b.seed)).unwrap_or(42);
    if !(2..=46).contains(&classes) {
        bail!("--classes is {classes}; allowed: 2 to 46 (sums of at most five digits)");
    }
    if size < 28 {
        bail!("--size is {size}; must be at least 28 px");
    }
    let mnist = args
        .mnist
        .as_deref()
        .map(MnistDigits::load)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let recipe = Recipe::new(size, classes, seed);
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Runtime::new()?;
    let loc = Location::parse(&out)?;
    rt.block_on(write_ultramnist(&loc, &recipe, train, val, mnist.as_ref()))?;
    eprintln!(
        "synth: {train} train + {val} val UltraMNIST images ({size} px, {classes} classes, seed {seed}) written to {} in {:.1} s",
        loc.url,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            pipeline,
            set,
            no_progress,
        } => {
            let text = std::fs::read_to_string(&pipeline)
                .with_context(|| format!("cannot read pipeline file '{}'", pipeline.display()))?;
            let overrides: Vec<&str> = set.iter().map(String::as_str).collect();
            let def = Definition::from_yaml_with_overrides(
                &text,
                &pipeline.display().to_string(),
                &overrides,
            )?;
            let summary = run(&def, !no_progress)?;
            println!(
                "{}: validation accuracy {:.3} (QWK {:.3}) after {} epochs; images seen {} = used {} + failed {}; {:.1} s; results in {}",
                summary.name,
                summary.final_val_accuracy,
                summary.final_val_qwk,
                summary.epochs,
                summary.images_seen,
                summary.images_used,
                summary.images_failed,
                summary.wall_seconds,
                summary.output
            );
        }
        Command::Synth {
            kind: SynthKind::Ultramnist(args),
        } => synth(args)?,
    }
    Ok(())
}
