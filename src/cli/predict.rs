//! `patchgd predict`: a trained run's model over new images (docs/inference.md).

use std::sync::Arc;

use anyhow::Result;
use patchgd::pipeline::definition::DeviceChoice;
use patchgd::pipeline::{PredictRequest, predict};
use patchgd::storage::StoreOptions;

#[derive(clap::Args)]
pub struct PredictArgs {
    /// A run's output, or one of its checkpoint directories: the model and its settings
    /// (backbone, patch, level, channels, normalisation, classes).
    #[arg(long)]
    pub model: String,
    /// An image object, or a prefix: every object under it is predicted.
    #[arg(long)]
    pub images: String,
    /// A labels table (CSV or Parquet with `image_id`, `label`): adds metrics.json. Images it
    /// does not name are predicted all the same.
    #[arg(long)]
    pub labels: Option<String>,
    /// Where predictions.parquet, errors.parquet, summary.json (and metrics.json) go.
    #[arg(long)]
    pub output: String,
    /// Images per head pass (default: the run's train.batch_size).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// `auto`, `cpu` or `cuda` (default: the run's train.device).
    #[arg(long)]
    pub device: Option<String>,
    /// Object store setting, e.g. `--storage endpoint=http://127.0.0.1:9000` (repeatable;
    /// credentials come from the environment).
    #[arg(long = "storage", value_name = "KEY=VALUE")]
    pub storage: Vec<String>,
    /// Also write each image's per-patch class evidence (Grad-CAM at the latent grid Z):
    /// heatmaps.parquet (image_id, row, col, class, score) and heatmaps/<image_id>.png, the
    /// predicted class's evidence over a thumbnail. PatchGD models only.
    #[arg(long)]
    pub heatmaps: bool,
    /// Plain log lines even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let device = match args.device.as_deref() {
        None => None,
        Some("auto") => Some(DeviceChoice::Auto),
        Some("cpu") => Some(DeviceChoice::Cpu),
        Some("cuda") => Some(DeviceChoice::Cuda),
        Some(other) => anyhow::bail!("--device {other}: expected auto, cpu or cuda"),
    };
    let request = PredictRequest {
        model: args.model,
        images: args.images,
        labels: args.labels,
        output: args.output,
        storage: StoreOptions::from_pairs(&args.storage)?,
        batch_size: args.batch_size,
        device,
        heatmaps: args.heatmaps,
    };
    let progress = Arc::new(super::progress::Progress::new(!args.no_progress));
    let summary = predict(&request, progress.as_ref());
    progress.finish();
    let s = summary?;
    println!(
        "predicted {} of {} images ({} failed){}; {:.1} images/s, {:.0} patch passes/s; results in {}",
        s.images_predicted,
        s.images_seen,
        s.images_failed,
        s.accuracy.map_or(String::new(), |a| format!(
            "; accuracy {a:.3} over {} labelled",
            s.images_labelled
        )),
        s.images_per_s,
        s.patch_passes_per_s,
        s.output
    );
    if let Some(h) = &s.heatmaps {
        println!(
            "heatmaps: {} images ({} rows) in heatmaps.parquet, {} pictures under heatmaps/{}",
            h.images,
            h.rows,
            h.pictures,
            if h.failures.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} could not be drawn: see errors.parquet)",
                    h.failures.len()
                )
            }
        );
    }
    Ok(())
}
