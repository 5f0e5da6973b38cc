//! `patchgd synth ultramnist`: generate a data set (docs/ultramnist.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use patchgd::pipeline::Definition;
use patchgd::storage::Location;
use patchgd::synth::{
    ImageFormat, Recipe, SynthOverrides, SynthSpec, mnist::MnistDigits, write_ultramnist,
};

#[derive(Subcommand)]
pub enum SynthKind {
    /// UltraMNIST: 3-5 digits on a black canvas, label = their sum (docs/ultramnist.md).
    Ultramnist(UltramnistArgs),
}

#[derive(clap::Args)]
pub struct UltramnistArgs {
    /// Take defaults from this pipeline file's `synth:` section (flags override them).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output URL or path: images go under OUT/images, labels to OUT/labels.csv.
    #[arg(long)]
    pub out: Option<String>,
    /// Canvas size in pixels.
    #[arg(long)]
    pub size: Option<u32>,
    /// Number of classes: labels (digit sums) 0..classes-1.
    #[arg(long)]
    pub classes: Option<u32>,
    /// Training images.
    #[arg(long)]
    pub train: Option<usize>,
    /// Validation images.
    #[arg(long)]
    pub val: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory with the MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte),
    /// for real handwritten digits instead of the built-in glyphs.
    #[arg(long)]
    pub mnist: Option<PathBuf>,
    /// `png` (default), or `tiff`: tiled pyramidal TIFF written tile by tile (8k-32k px images).
    #[arg(long)]
    pub format: Option<String>,
    /// TIFF tile size (default 256).
    #[arg(long)]
    pub tile: Option<u32>,
    /// TIFF tile compression: jpeg (default), deflate, lzw or none.
    #[arg(long)]
    pub compression: Option<String>,
    /// Write BigTIFF (64-bit offsets).
    #[arg(long)]
    pub bigtiff: bool,
}

pub fn run(args: UltramnistArgs) -> Result<()> {
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
