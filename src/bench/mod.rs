//! `patchgd bench`: the performance targets as reproducible measurements (docs/benchmarks.md).
//!
//! - [`efficiency`]: the full pipeline's training throughput against the same PatchGD steps on
//!   batches already in memory (the compute ceiling), in one process, alternating rounds.
//! - [`memory`]: peak RSS of PatchGD and GD runs at growing image sizes, one child process per
//!   run (peak RSS is per process), each watched and stopped at a memory cap.
//! - [`budget`]: PatchGD against GD at the same peak-memory budget and the same wall time.
//! - [`precision`]: one run in each precision the device takes: speed, accuracy, and agreement
//!   of its predictions with f32's.
//! - [`predict`]: `patchgd predict`'s throughput against training's fill pass.
//! - [`allreduce`]: one step's gradient average across ranks (NCCL on a GPU, MPI on the CPU).

pub mod allreduce;
pub mod budget;
pub mod child;
pub mod efficiency;
pub mod memory;
pub mod precision;
pub mod predict;

use std::path::{Path, PathBuf};

use crate::pipeline::definition::DeviceChoice;
use crate::storage::Location;
use crate::synth::ultramnist::Recipe;
use crate::synth::{ImageFormat, write_ultramnist};
use crate::train::Precision;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Working directory: generated data and run outputs.
    pub dir: PathBuf,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// Small sizes and counts: a smoke run of every part in well under a minute.
    pub quick: bool,
    /// Wall time each method gets in the fixed-budget comparison.
    pub budget_seconds: f64,
    /// This program, for child runs (`patchgd run`).
    pub exe: PathBuf,
    /// The ranks this process was launched with (`mpirun -np N patchgd bench --only
    /// allreduce`): the all-reduce part measures over them, and rank 0 alone prints.
    pub group: std::rc::Rc<crate::dist::Group>,
}

impl BenchOptions {
    pub fn device_name(&self) -> &'static str {
        match self.device {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        }
    }
    pub fn precision_name(&self) -> &'static str {
        self.precision.name()
    }
}

/// Generate an UltraMNIST set under `dir` (PNG or tiled TIFF); returns (images URL, labels URL).
pub fn generate(
    dir: &Path,
    size: u32,
    classes: u32,
    train: usize,
    val: usize,
    format: ImageFormat,
) -> Result<(String, String), String> {
    generate_recipe(dir, &Recipe::new(size, classes, 42), train, val, format)
}

/// [`generate`] from any recipe.
pub fn generate_recipe(
    dir: &Path,
    recipe: &Recipe,
    train: usize,
    val: usize,
    format: ImageFormat,
) -> Result<(String, String), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let root = dir.display().to_string();
    let out = Location::parse(&root).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(write_ultramnist(&out, recipe, train, val, None, format))
        .map_err(|e| format!("generating {root}: {e}"))?;
    Ok((format!("{root}/images"), format!("{root}/labels.csv")))
}

/// A pipeline file's text for the benchmarks: small CNN by default, grey patches, no
/// checkpoints between steps; `extra` lines are appended under the top level.
#[allow(clippy::too_many_arguments)]
pub fn pipeline_yaml(
    opts: &BenchOptions,
    images: &str,
    labels: &str,
    output: &str,
    patch: usize,
    epochs: u64,
    batch: usize,
    classes: u32,
) -> String {
    format!(
        "name: bench
source:
  images: {images}
  labels: {labels}
  channels: 1
  decode_workers: 2
  buffer_mib: 16
patch:
  size: {patch}
  foreground:
    background: dark
    threshold: 32
model:
  backbone: small_cnn
  latent_dim: 64
  head_width: 64
  classes: {classes}
patchgd:
  sampling_fraction: 0.25
  fill_chunk: 64
train:
  epochs: {epochs}
  batch_size: {batch}
  lr: 0.003
  warmup_epochs: 0.5
  device: {}
  precision: {}
  seed: 42
checkpoint:
  every_steps: 0
output: {output}
",
        opts.device_name(),
        opts.precision_name(),
    )
}

/// Write `dir/NAME.yaml` for a child run ([`pipeline_yaml`], output `dir/out-NAME`); returns
/// the file and the output directory.
#[allow(clippy::too_many_arguments)]
pub fn write_pipeline(
    opts: &BenchOptions,
    dir: &Path,
    name: &str,
    (images, labels, classes): (&str, &str, u32),
    patch: usize,
    epochs: u64,
    batch: usize,
) -> Result<(PathBuf, PathBuf), String> {
    let out = dir.join(format!("out-{name}"));
    let yaml = pipeline_yaml(
        opts,
        images,
        labels,
        &out.display().to_string(),
        patch,
        epochs,
        batch,
        classes,
    );
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).map_err(|e| format!("{}: {e}", file.display()))?;
    Ok((file, out))
}

/// Markdown table: a header row and rows of cells.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("| {} |\n", header.join(" | "));
    out += &format!("|{}\n", "---|".repeat(header.len()));
    for r in rows {
        out += &format!("| {} |\n", r.join(" | "));
    }
    out
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// Which parts `patchgd bench` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    Efficiency,
    Memory,
    Budget,
    Precision,
    Predict,
    Allreduce,
}

/// Run the chosen parts and return the report (Markdown tables). Each table is also printed as
/// soon as it is ready, since the whole report takes minutes.
pub fn run(
    opts: &BenchOptions,
    parts: &[Part],
    backbones: &[crate::model::BackboneKind],
    sizes: &[u32],
) -> Result<String, String> {
    if opts.group.size() > 1 && parts.iter().any(|&p| p != Part::Allreduce) {
        return Err(format!(
            "launched as {} ranks: only `--only allreduce` measures across ranks; the other \
             parts run in one process",
            opts.group.size()
        ));
    }
    let root = opts.group.is_root();
    let mut report = format!(
        "# patchgd bench ({}; device {}, precision {})\n",
        if opts.quick { "quick" } else { "full" },
        opts.device_name(),
        opts.precision_name()
    );
    if root {
        println!("{report}");
    }
    for part in [
        Part::Efficiency,
        Part::Memory,
        Part::Budget,
        Part::Precision,
        Part::Predict,
        Part::Allreduce,
    ] {
        if !parts.contains(&part) {
            continue;
        }
        let text = match part {
            Part::Efficiency => efficiency_section(opts, backbones)?,
            Part::Memory => memory_section(opts, sizes)?,
            Part::Budget => budget_section(opts)?,
            Part::Precision => precision_section(opts)?,
            Part::Predict => predict_section(opts, backbones)?,
            Part::Allreduce => allreduce_section(opts)?,
        };
        if root {
            println!("{text}");
        }
        report.push_str(&text);
        report.push('\n');
    }
    Ok(report)
}

fn allreduce_section(opts: &BenchOptions) -> Result<String, String> {
    use crate::model::BackboneKind;
    // One GPU per rank on each machine, as in a data-parallel run.
    let gpu =
        tch::Device::Cuda(opts.group.local_rank() % tch::Cuda::device_count().max(1) as usize);
    let device = match opts.device {
        DeviceChoice::Cpu => tch::Device::Cpu,
        DeviceChoice::Auto | DeviceChoice::Cuda if tch::Cuda::is_available() => gpu,
        DeviceChoice::Auto => tch::Device::Cpu,
        DeviceChoice::Cuda => return Err("--device cuda, but no CUDA device is available".into()),
    };
    let (backbones, rounds) = if opts.quick {
        (vec![BackboneKind::SmallCnn], 3)
    } else {
        (
            vec![
                BackboneKind::SmallCnn,
                BackboneKind::Resnet18,
                BackboneKind::Resnet50,
            ],
            10,
        )
    };
    let mut rows = Vec::new();
    for b in backbones {
        let r = allreduce::measure(&opts.group, device, b, rounds)?;
        rows.push(vec![
            r.backbone.clone(),
            format!("{:.2} M", r.parameters as f64 / 1e6),
            format!("{:.1}", r.bytes as f64 / 1e6),
            r.ranks.to_string(),
            format!(
                "{} on {}",
                r.transport,
                crate::pipeline::setup::device_name(device)
            ),
            r.buckets.to_string(),
            r.rounds.to_string(),
            format!("{:.2}", r.seconds * 1e3),
            format!("{:.1}", r.algbw()),
            if r.ranks > 1 {
                format!("{:.1}", r.busbw())
            } else {
                "-".into()
            },
            format!("{:.0e}", r.error),
        ]);
    }
    Ok(format!(
        "## 6. Gradient averaging across ranks (one step's average of the whole gradient; \
         checked against the known result)\n\n{}",
        table(
            &[
                "backbone",
                "parameters",
                "gradient MB",
                "ranks",
                "transport",
                "buckets",
                "rounds",
                "median ms",
                "algbw GB/s",
                "busbw GB/s",
                "largest error",
            ],
            &rows
        )
    ))
}

fn predict_section(
    opts: &BenchOptions,
    backbones: &[crate::model::BackboneKind],
) -> Result<String, String> {
    let mut rows = Vec::new();
    for &b in backbones {
        let small = b == crate::model::BackboneKind::SmallCnn;
        let (size, patch, images, rounds) = match (opts.quick, small) {
            (true, _) => (128, 32, 8, 1),
            (false, true) => (512, 64, 64, 3),
            (false, false) => (512, 64, 16, 3),
        };
        let r = predict::measure(opts, b, size, patch, images, rounds)?;
        rows.push(vec![
            r.backbone.clone(),
            format!("{} / {}", r.image_px, r.patch_px),
            r.images.to_string(),
            r.rounds.to_string(),
            format!("{:.1}", r.training_fill),
            format!("{:.1}", r.predict_in_memory),
            format!("{:.1}", r.predict_pipeline),
            format!("{:.2}", r.predict_images_per_s),
            format!("{:.3}", r.ratio),
        ]);
    }
    Ok(format!(
        "## 5. Prediction throughput (patch passes/s; target: predict >= 0.9 x training's fill pass)\n\n{}",
        table(
            &[
                "backbone",
                "image / patch px",
                "images",
                "rounds",
                "training fill (in memory)",
                "predict (in memory)",
                "predict (full pipeline)",
                "predict images/s",
                "ratio",
            ],
            &rows
        )
    ))
}

fn efficiency_section(
    opts: &BenchOptions,
    backbones: &[crate::model::BackboneKind],
) -> Result<String, String> {
    let mut rows = Vec::new();
    for &b in backbones {
        let small = b == crate::model::BackboneKind::SmallCnn;
        let (size, patch, images, rounds) = match (opts.quick, small) {
            (true, _) => (128, 32, 8, 1),
            (false, true) => (512, 64, 64, 3),
            (false, false) => (512, 64, 16, 2),
        };
        let r = efficiency::measure(opts, b, size, patch, images, rounds)?;
        rows.push(vec![
            r.backbone.clone(),
            r.device.clone(),
            format!("{} / {}", r.image_px, r.patch_px),
            r.images.to_string(),
            r.rounds.to_string(),
            format!("{:.1}", r.ceiling),
            format!("{:.1}", r.pipeline),
            format!("{:.3}", r.ratio),
        ]);
    }
    Ok(format!(
        "## 1. Pipeline efficiency (patch passes/s; target: ratio >= 0.95)\n\n{}",
        table(
            &[
                "backbone",
                "device",
                "image / patch px",
                "images",
                "rounds",
                "in memory",
                "full pipeline",
                "ratio",
            ],
            &rows
        )
    ))
}

fn memory_section(opts: &BenchOptions, sizes: &[u32]) -> Result<String, String> {
    let rows = memory::measure(opts, sizes)?;
    let base = |method: &str| {
        rows.iter()
            .find(|r| r.method == method && r.run.ok)
            .map(|r| r.run.peak_rss_bytes)
    };
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let growth = match (r.run.ok, base(r.method)) {
                (true, Some(b)) => {
                    format!(
                        "{:+.1}%",
                        (r.run.peak_rss_bytes as f64 / b as f64 - 1.0) * 100.0
                    )
                }
                _ => "-".into(),
            };
            let status = if r.run.ok {
                "ok".to_string()
            } else if r.run.capped {
                format!("stopped at the {:.0} MiB cap", mib(child::default_cap()))
            } else {
                format!("failed: {}", r.run.tail)
            };
            vec![
                r.method.to_string(),
                r.image_px.to_string(),
                r.cells.to_string(),
                format!("{:.0}", mib(r.run.peak_rss_bytes)),
                growth,
                format!("{:.1}", r.run.seconds),
                status,
            ]
        })
        .collect();
    Ok(format!(
        "## 2. Peak RSS by image size ({} px patches, {} patches per inner iteration, fill chunk {}; target: PatchGD grows <= 15%)\n\n{}",
        if opts.quick { 32 } else { memory::PATCH },
        memory::PER_INNER,
        memory::FILL_CHUNK,
        table(
            &[
                "method",
                "image px",
                "patches (GD: pixels)",
                "peak RSS MiB",
                "vs smallest",
                "seconds",
                "status",
            ],
            &cells
        )
    ))
}

fn budget_section(opts: &BenchOptions) -> Result<String, String> {
    let b = budget::measure(opts)?;
    let mut probes: Vec<String> = b
        .probes
        .iter()
        .map(|p| {
            if p.stopped {
                format!(
                    "{} px: over {:.0} MiB (stopped)",
                    p.size,
                    mib(budget::probe_cap(b.budget_bytes))
                )
            } else {
                format!(
                    "{} px: {:.0} MiB{}",
                    p.size,
                    mib(p.peak_rss_bytes),
                    if p.fits { " (fits)" } else { "" }
                )
            }
        })
        .collect();
    if !b.probes.iter().any(|p| p.fits) {
        probes.push("none fit: GD runs at the smallest".into());
    }
    // PatchGD's real peak: the highest of its runs.
    let patchgd_peak = b
        .rows
        .iter()
        .filter(|r| r.method == "PatchGD")
        .map(|r| r.run.peak_rss_bytes)
        .max()
        .unwrap_or(0);
    let rows: Vec<Vec<String>> = b
        .rows
        .iter()
        .map(|r| {
            let last = r.run.epochs.last().cloned().unwrap_or_default();
            let secs: f64 = r.run.epochs.iter().map(|e| e.seconds).sum();
            vec![
                r.method.to_string(),
                r.input_px.to_string(),
                r.seed.to_string(),
                format!(
                    "{:.0}{}",
                    mib(r.run.peak_rss_bytes),
                    if r.method == "PatchGD" || r.run.peak_rss_bytes <= patchgd_peak {
                        ""
                    } else {
                        " (over)"
                    }
                ),
                r.run.epochs.len().to_string(),
                format!("{secs:.0}"),
                if r.run.ok {
                    format!("{:.3}", last.val_accuracy)
                } else {
                    format!("failed: {}", r.run.tail)
                },
            ]
        })
        .collect();
    let (patchgd, gd) = (b.spread("PatchGD"), b.spread("GD"));
    let summary: Vec<Vec<String>> = [("PatchGD", patchgd), ("GD", gd)]
        .iter()
        .map(|(m, s)| {
            vec![
                m.to_string(),
                s.n.to_string(),
                format!("{:.3}", s.mean),
                format!("{:.3}", s.sd),
                format!("{:.3}-{:.3}", s.min, s.max),
            ]
        })
        .collect();
    let gap = (patchgd.mean - gd.mean) * 100.0;
    Ok(format!(
        "## 3. PatchGD vs GD at one memory budget ({} px canvases with a faint texture, one {} px digit each, {} classes; {} train / {} val images; PatchGD: {} px patches, blank patches skipped; budget = PatchGD's probe peak {:.0} MiB; wall time {:.0} s per run; \"(over)\": GD above PatchGD's highest real peak)\n\nGD sizes probed: {}\n\n{}\n{}\nPatchGD - GD: {gap:+.1} points of validation accuracy (mean over seeds).\n",
        b.image_px,
        budget::DIGIT_PX,
        budget::CLASSES,
        b.train_images,
        b.val_images,
        b.patch_px,
        mib(b.budget_bytes),
        opts.budget_seconds,
        probes.join(", "),
        table(
            &[
                "method",
                "input px",
                "seed",
                "peak RSS MiB",
                "epochs",
                "train + eval s",
                "val accuracy",
            ],
            &rows
        ),
        table(
            &["method", "seeds", "val accuracy mean", "sd", "min-max"],
            &summary
        )
    ))
}

fn precision_section(opts: &BenchOptions) -> Result<String, String> {
    let p = precision::measure(opts)?;
    let f32_speed = p
        .rows
        .iter()
        .find(|r| r.precision == Precision::F32 && !r.other_seed && r.run.ok)
        .map(|r| median(r.run.epochs.iter().map(|e| e.patches_per_s).collect()));
    let rows: Vec<Vec<String>> = p
        .rows
        .iter()
        .map(|r| {
            if !r.run.ok {
                return vec![r.label(), format!("failed: {}", r.run.tail)];
            }
            let last = r.run.epochs.last().cloned().unwrap_or_default();
            let speed = median(r.run.epochs.iter().map(|e| e.patches_per_s).collect());
            let secs: f64 = r.run.epochs.iter().map(|e| e.seconds).sum();
            vec![
                r.label(),
                format!("{speed:.1}"),
                f32_speed.map_or("-".into(), |b| format!("{:.2}", speed / b)),
                format!("{secs:.0}"),
                format!("{:.0}", mib(r.run.peak_rss_bytes)),
                format!("{:.4}", last.train_loss),
                format!("{:.4}", last.val_loss),
                format!("{:.3}", last.val_accuracy),
                r.agreement_with_f32
                    .map_or("-".into(), |a| format!("{:.3}", a)),
            ]
        })
        .collect();
    let skipped = if p.skipped.is_empty() {
        String::new()
    } else {
        format!("\n\nNot run: {}.", p.skipped.join("; "))
    };
    Ok(format!(
        "## 4. Mixed precision ({} px canvases with one MNIST-style digit, 10 classes, {} px patches, small CNN, {} train / {} val images, {} epochs, same seed and order; speed: median of epochs' training patch passes/s){skipped}\n\n{}",
        p.image_px,
        p.patch_px,
        p.train_images,
        p.val_images,
        p.epochs,
        table(
            &[
                "precision",
                "patch passes/s",
                "vs f32",
                "train + eval s",
                "peak RSS MiB",
                "final train loss",
                "val loss",
                "val accuracy",
                "val predictions = f32's",
            ],
            &rows
        )
    ))
}
