//! `patchgd bench`: the performance targets (docs/benchmarks.md).

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Parts to run (repeatable); all by default.
    #[arg(long, value_enum)]
    pub only: Vec<patchgd::bench::Part>,
    /// Working directory for generated data and runs.
    #[arg(long, default_value = "out/bench")]
    pub dir: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// f32, bf16 (mixed precision), or f16 (mixed precision, CUDA).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Small sizes and counts (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Wall time of each run (each method, each seed) in the memory-budget comparison.
    #[arg(long, default_value_t = 240.0)]
    pub seconds: f64,
    /// Image sizes for the memory part.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
    pub sizes: Vec<u32>,
    /// Backbones for the efficiency part.
    #[arg(long, value_delimiter = ',', default_value = "small_cnn,resnet18")]
    pub backbones: Vec<String>,
    /// Also write the report (Markdown) to this file.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

pub fn run(args: BenchArgs, group: std::rc::Rc<patchgd::dist::Group>) -> Result<()> {
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
        group,
    };
    let parts = if args.only.is_empty() {
        vec![
            Part::Efficiency,
            Part::Memory,
            Part::Budget,
            Part::Precision,
            Part::Predict,
            Part::Allreduce,
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
