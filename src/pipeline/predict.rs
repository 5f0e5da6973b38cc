//! `patchgd predict`: a trained model applied to any number of images, labelled or not, from any
//! store, streamed as training streams them (a gigapixel pyramid level keeps memory flat). The
//! model's settings (backbone, patch, level, channels, normalisation, classes) come from the
//! run that trained it; each image's Z is filled (eval mode) and the head runs once.
//!
//! Outputs, under `--output`: `predictions.parquet` (image_id, url, label, predicted,
//! probabilities), `errors.parquet`, `summary.json` (seen = predicted + failed) and, with labels,
//! `metrics.json` (accuracy, QWK, per-class precision and recall, confusion matrix).

#![warn(missing_docs)]

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;
use tch::Tensor;

use super::checkpoint::TrainingState;
use super::definition::{Definition, DeviceChoice};
use super::observer::RunObserver;
use super::runner::RunError;
use super::setup::{build_trainer, choose_device, device_name};
use crate::model::pretrained::read_tensors;
use crate::model::{Method, ModelSpec};
use crate::sink::tables::{errors_batch, predict_predictions_batch, to_parquet};
use crate::source::catalog::load_labels;
use crate::source::{Failure, ImageEntry, list_images, stream_images};
use crate::storage::{Location, StoreOptions};
use crate::train::{PassOutcome, Phase, Precision, Prediction};

/// What to predict, and where the results go.
#[derive(Clone, Debug)]
pub struct PredictRequest {
    /// A run's output, or one of its checkpoint directories.
    pub model: String,
    /// Every object under this URL is an image to predict.
    pub images: String,
    /// An optional labels table (`image_id`, `label`; `split` is ignored): metrics for the
    /// images it names.
    pub labels: Option<String>,
    /// Where the results go.
    pub output: String,
    /// Object-store settings for every URL.
    pub storage: StoreOptions,
    /// Images per head pass; the run's `train.batch_size` when `None`.
    pub batch_size: Option<usize>,
    /// Where the model runs; the run's `train.device` when `None`.
    pub device: Option<DeviceChoice>,
    /// Also write each image's per-cell class evidence (Grad-CAM at Z): `heatmaps.parquet`
    /// and a PNG per image under `heatmaps/` (PatchGD models only).
    pub heatmaps: bool,
}

/// A trained model as a run left it: its definition, weights and class count.
pub struct TrainedModel {
    /// The definition of the run that trained it (settings the weights depend on).
    pub definition: Definition,
    /// Every variable, by name.
    pub weights: Vec<(String, Tensor)>,
    /// Classes the head predicts (read off the weights).
    pub classes: i64,
    /// The weights file's URL.
    pub weights_url: String,
}

impl TrainedModel {
    /// Load a run output (`model.safetensors` + `pipeline.yaml`) or a checkpoint directory
    /// (`model.safetensors` + `state.yaml`).
    pub async fn load(url: &str, storage: &StoreOptions) -> Result<Self, RunError> {
        let loc = Location::parse_with(url, storage)?;
        let bad = |reason: String| RunError::Model {
            url: url.to_string(),
            reason,
        };
        let definition = match loc.get_relative("pipeline.yaml").await {
            Ok(yaml) => Definition::from_yaml(&String::from_utf8_lossy(&yaml), "pipeline.yaml")
                .map_err(|e| bad(format!("its pipeline.yaml: {e}")))?,
            Err(crate::storage::StorageError::NotFound { .. }) => {
                let state = loc.get_relative("state.yaml").await.map_err(|e| {
                    bad(format!(
                        "neither a run output (pipeline.yaml) nor a checkpoint (state.yaml): {e}"
                    ))
                })?;
                let state: TrainingState = serde_norway::from_slice(&state)
                    .map_err(|e| bad(format!("its state.yaml: {e}")))?;
                state.pipeline
            }
            Err(e) => return Err(e.into()),
        };
        let weights_url = format!("{}/model.safetensors", url.trim_end_matches('/'));
        let bytes = loc.get_relative("model.safetensors").await?;
        let weights = read_tensors(&bytes, &weights_url)?;
        let head_bias = match definition.method {
            Method::Patchgd => "head.classifier.bias",
            Method::Gd => "classifier.bias",
        };
        let classes = weights
            .iter()
            .find(|(n, _)| n == head_bias)
            .map(|(_, t)| t.size()[0])
            .ok_or_else(|| bad(format!("model.safetensors has no '{head_bias}'")))?;
        Ok(Self {
            definition,
            weights,
            classes,
            weights_url,
        })
    }

    /// The model the weights belong to.
    pub fn spec(&self) -> ModelSpec {
        self.definition.model_spec(self.classes)
    }
}

/// What a prediction run did, written as `summary.json`. Seen = predicted + failed.
#[derive(Clone, Debug, Serialize)]
pub struct PredictSummary {
    /// The model's weights file.
    pub model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Classes the model predicts.
    pub classes: i64,
    /// Objects under the images URL.
    pub images_seen: usize,
    /// Images with a prediction.
    pub images_predicted: usize,
    /// Images in the errors table.
    pub images_failed: usize,
    /// Predicted images that have a label (the metrics cover these).
    pub images_labelled: usize,
    /// Accuracy over the labelled images, when there are any.
    pub accuracy: Option<f64>,
    /// Backbone patch passes (the fill of every image).
    pub patch_passes: usize,
    /// Wall time of the prediction pass.
    pub seconds: f64,
    /// Images predicted per second of the pass.
    pub images_per_s: f64,
    /// Patch passes per second of the pass.
    pub patch_passes_per_s: f64,
    /// Peak resident memory of the process at the end (VmHWM; 0 where unknown): with the
    /// heatmaps' thumbnails, what an image's size costs in memory.
    pub peak_rss_bytes: u64,
    /// The output URL.
    pub output: String,
    /// With `--heatmaps`: images in `heatmaps.parquet`, its rows, and the PNGs written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmaps: Option<super::heatmaps::HeatmapOutcome>,
}

/// `metrics.json`: how the predictions compare with the labels.
#[derive(Clone, Debug, Serialize)]
pub struct PredictMetrics {
    /// Labelled images.
    pub images: usize,
    /// Fraction predicted right.
    pub accuracy: f64,
    /// Quadratic weighted kappa.
    pub qwk: f64,
    /// Per class: of the images predicted as it, the fraction that are (null: none predicted).
    pub precision: Vec<Option<f64>>,
    /// Per class: of the images that are it, the fraction predicted as it (null: none are).
    pub recall: Vec<Option<f64>>,
    /// `confusion[label][predicted]`: image counts.
    pub confusion: Vec<Vec<u64>>,
}

impl PredictMetrics {
    /// Metrics over the predictions that have a label.
    pub fn of(predictions: &[Prediction], classes: usize) -> Option<Self> {
        let labelled: Vec<&Prediction> = predictions.iter().filter(|p| p.label >= 0).collect();
        if labelled.is_empty() {
            return None;
        }
        let mut confusion = vec![vec![0u64; classes]; classes];
        for p in &labelled {
            confusion[p.label as usize][p.predicted as usize] += 1;
        }
        let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
        let precision = (0..classes)
            .map(|c| ratio(confusion[c][c], (0..classes).map(|l| confusion[l][c]).sum()))
            .collect();
        let recall = (0..classes)
            .map(|c| ratio(confusion[c][c], confusion[c].iter().sum()))
            .collect();
        let truth: Vec<i64> = labelled.iter().map(|p| p.label).collect();
        let predicted: Vec<i64> = labelled.iter().map(|p| p.predicted).collect();
        let right = labelled.iter().filter(|p| p.label == p.predicted).count();
        Some(Self {
            images: labelled.len(),
            accuracy: right as f64 / labelled.len() as f64,
            qwk: crate::train::metrics::quadratic_weighted_kappa(&truth, &predicted, classes),
            precision,
            recall,
            confusion,
        })
    }
}

/// The images `req.images` names (a prefix or one object), each with its label when the
/// table names it; the location the entries are relative to. A label outside the model's
/// classes is an error naming the image.
async fn list_labelled(
    req: &PredictRequest,
    classes: i64,
) -> Result<(Location, Vec<ImageEntry>, Vec<Failure>), RunError> {
    let labels: HashMap<String, i64> = match &req.labels {
        Some(url) => load_labels(url, &req.storage)
            .await?
            .into_iter()
            .map(|(id, (label, _))| (id, label))
            .collect(),
        None => HashMap::new(),
    };
    let mut listing = list_images(&req.images, &req.storage).await?;
    // The labels table may live under the images prefix; it is not an image.
    if let Some(url) = &req.labels {
        let (loc, path) = Location::parse_object(url, &req.storage)?;
        let labels_url = loc.url_of(&path);
        listing.images.retain(|e| e.url != labels_url);
    }
    for e in &mut listing.images {
        e.label = labels.get(&e.image_id).copied();
        if let Some(l) = e.label
            && !(0..classes).contains(&l)
        {
            return Err(RunError::Data(format!(
                "image '{}' has label {l} in '{}', but the model predicts classes 0..{}",
                e.image_id,
                req.labels.as_deref().unwrap_or_default(),
                classes - 1
            )));
        }
    }
    Ok((listing.location, listing.images, listing.failures))
}

/// Predict every image under `req.images` with the model at `req.model`; write the results
/// under `req.output`. Bad images are counted and named in `errors.parquet`; the run goes on.
pub fn predict(
    req: &PredictRequest,
    observer: &dyn RunObserver,
) -> Result<PredictSummary, RunError> {
    let rt = super::runner::runtime()?;
    let _guard = rt.enter();
    let trained = rt.block_on(TrainedModel::load(&req.model, &req.storage))?;
    let mut def = trained.definition.clone();
    // Inference computes in f32 (the weights are fp32 masters whatever the run trained in).
    def.train.precision = Precision::F32;
    if let Some(b) = req.batch_size {
        def.train.batch_size = b.max(1);
    }
    def.train.device = req.device.unwrap_or(def.train.device);
    def.latent.reuse = false;
    if req.heatmaps && def.method != Method::Patchgd {
        return Err(RunError::Model {
            url: trained.weights_url.clone(),
            reason: "--heatmaps needs a PatchGD model (method: patchgd): the evidence is taken \
                     at the latent grid Z, which a GD model does not have"
                .into(),
        });
    }
    let device = choose_device(def.train.device)?;
    let output = Location::parse_with(&req.output, &req.storage)?;
    let (images, entries, listing_failures) = rt.block_on(list_labelled(req, trained.classes))?;
    let seen = entries.len() + listing_failures.len();
    let mut trainer = build_trainer(&def, trained.spec(), device, entries.len().max(1))?;
    trainer.config.store_evaluation_latents = false;
    trainer
        .model
        .load_named(&trained.weights)
        .map_err(|e| RunError::Model {
            url: trained.weights_url.clone(),
            reason: e.to_string(),
        })?;
    observer.note(&format!(
        "predict: {} images under {} with {} ({} {} classes, patch {}, level {}) on {}",
        seen,
        images.url,
        trained.weights_url,
        def.model.backbone.name(),
        trained.classes,
        def.patch.size,
        def.source.level,
        device_name(device)
    ));
    observer.epoch_started("predict", seen);
    let urls: HashMap<String, String> = entries
        .iter()
        .map(|e| (e.image_id.clone(), e.url.clone()))
        .collect();
    let writer = req.heatmaps.then(|| {
        super::heatmaps::spawn(
            super::heatmaps::HeatmapJob {
                images: images.clone(),
                entries: entries
                    .iter()
                    .map(|e| (e.image_id.clone(), e.clone()))
                    .collect(),
                stream: def.stream_config(),
                stride: def.stride(),
                output: output.clone(),
            },
            rt.handle().clone(),
        )
    });
    trainer.evidence = writer.as_ref().map(|(tx, _)| tx.clone());
    let started = Instant::now();
    let rx = stream_images(images.clone(), entries, def.stream_config());
    let pass: Result<PassOutcome, RunError> = trainer.run_pass(
        Phase::Evaluate,
        rx,
        PassOutcome::default(),
        |n| observer.images_done(listing_failures.len() + n),
        |_, _| Ok::<(), RunError>(()),
    );
    // The writer finishes when every sender is gone: the trainer's copy here, ours below.
    trainer.evidence = None;
    let heatmaps = match writer {
        Some((tx, handle)) => {
            drop(tx);
            let outcome = handle.join().map_err(|_| RunError::Write {
                what: "heatmaps".into(),
                source: "the heatmap writer panicked".into(),
            });
            // A failed pass is the error to report; the writer's outcome only counts with it.
            Some(outcome.and_then(|o| o))
        }
        None => None,
    };
    let pass = pass?;
    let heatmaps = heatmaps.transpose()?;
    let seconds = started.elapsed().as_secs_f64();
    observer.finished();
    let failures: Vec<(u64, Failure)> = listing_failures
        .into_iter()
        .chain(pass.failures.iter().cloned())
        .map(|f| (0, f))
        .collect();
    let picture_failures: Vec<(u64, Failure)> = heatmaps
        .iter()
        .flat_map(|h| h.failures.iter().cloned().map(|f| (0, f)))
        .collect();
    let metrics = PredictMetrics::of(&pass.predictions, trained.classes as usize);
    let summary = PredictSummary {
        model: trained.weights_url.clone(),
        device: device_name(device),
        classes: trained.classes,
        images_seen: seen,
        images_predicted: pass.predictions.len(),
        images_failed: failures.len(),
        images_labelled: metrics.as_ref().map_or(0, |m| m.images),
        accuracy: metrics.as_ref().map(|m| m.accuracy),
        patch_passes: pass.patch_passes,
        seconds,
        images_per_s: pass.predictions.len() as f64 / seconds.max(1e-9),
        patch_passes_per_s: pass.patch_passes as f64 / seconds.max(1e-9),
        peak_rss_bytes: crate::train::metrics::peak_rss_bytes(),
        output: output.url.clone(),
        heatmaps,
    };
    let summary_json = pretty("summary.json", &summary)?;
    let metrics_json = match &metrics {
        Some(m) => Some(pretty("metrics.json", m)?),
        None => None,
    };
    rt.block_on(async {
        let table = predict_predictions_batch(&pass.predictions, &urls);
        output
            .put("predictions.parquet", to_parquet(&table))
            .await?;
        output
            .put(
                "errors.parquet",
                to_parquet(&errors_batch(&[failures, picture_failures].concat())),
            )
            .await?;
        if let Some(m) = metrics_json {
            output.put("metrics.json", m).await?;
        }
        output.put("summary.json", summary_json).await
    })?;
    Ok(summary)
}

/// Pretty JSON of one of the output files.
fn pretty<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, RunError> {
    serde_json::to_vec_pretty(value).map_err(|e| RunError::Write {
        what: what.to_string(),
        source: e.into(),
    })
}
