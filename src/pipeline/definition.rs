//! Pipeline definitions: the YAML file a user runs (`patchgd run FILE`). Parsed strictly
//! (unknown keys are refused, with the allowed keys named) and validated before anything runs.
//! Reference: docs/pipeline-reference.md; JSON Schema: schemas/pipeline.schema.json.

use serde::{Deserialize, Serialize};

use crate::model::{BackboneKind, BatchNormMode, Method, Normalization};
use crate::patch::Foreground;
use crate::source::StreamConfig;
use crate::storage::StoreOptions;
pub use crate::synth::SynthSpec;
use crate::train::{Accumulation, Precision};

#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read pipeline file '{file}': {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("pipeline file '{file}': {message}")]
    Parse { file: String, message: String },
    #[error("pipeline file '{file}': key '{key}': {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// A name for the run, used in logs.
    #[serde(default = "default_name")]
    pub name: String,
    pub source: SourceSpec,
    pub patch: PatchSpec,
    pub model: ModelSection,
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default)]
    pub patchgd: PatchGdSpec,
    #[serde(default)]
    pub gd: GdSpec,
    pub train: TrainSpec,
    /// Where the run writes metrics, predictions, errors, weights and the plot.
    pub output: String,
    /// Object store settings for every URL in the file (endpoint, region, retries, ...).
    #[serde(default)]
    pub storage: StoreOptions,
    /// When and where checkpoints are written (docs/checkpoints.md).
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// The latent store: its memory budget, spill directory, and Z reuse across epochs.
    #[serde(default)]
    pub latent: LatentSpec,
    /// How `patchgd synth ultramnist --config FILE` generates this pipeline's data set.
    #[serde(default)]
    pub synth: Option<SynthSpec>,
    /// A SQL query over `images` and `patches` that chooses the training set: it returns
    /// `image_id` (whole images) or `image_id, row, col` (patches). docs/sql.md.
    #[serde(default)]
    pub select: Option<String>,
    /// Run `select:` on a Ballista cluster (`df://HOST:PORT`, docs/cluster.md) instead of
    /// in this process.
    #[serde(default)]
    pub select_cluster: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// URL or path of the images (every object under it is an image).
    pub images: String,
    /// URL or path of the labels table (CSV with header, or Parquet): image_id, label, split.
    pub labels: String,
    /// 1 (grey) or 3 (RGB): images are converted to this.
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Images decoded in parallel.
    #[serde(default = "default_decode_workers")]
    pub decode_workers: usize,
    /// MiB of patch batches buffered between the source and the trainer.
    #[serde(default = "default_buffer_mib")]
    pub buffer_mib: usize,
    /// `skip`: report a bad image in the errors table and go on; `stop`: end the run.
    #[serde(default)]
    pub on_error: OnError,
    /// Pyramid level of TIFF images (0 = full resolution).
    #[serde(default)]
    pub level: usize,
    /// Instead of `level`: the TIFF level nearest this many microns per pixel.
    #[serde(default)]
    pub target_mpp: Option<f64>,
    /// How pixels become the backbone's input: x / 255, then (x - mean) / std per channel
    /// (`minus_one_to_one`, the default; `mnist`; `imagenet`; or `{mean: [...], std: [...]}`).
    #[serde(default)]
    pub normalize: Normalization,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Skip,
    Stop,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchSpec {
    pub size: usize,
    /// Defaults to `size` (no overlap).
    #[serde(default)]
    pub stride: Option<usize>,
    /// Patch statistics and the foreground filter.
    #[serde(default)]
    pub foreground: ForegroundSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForegroundSpec {
    /// Grey level (0-255) separating foreground from background.
    #[serde(default = "default_fg_threshold")]
    pub threshold: u8,
    /// `light` (slides: glass is bright) or `dark` (UltraMNIST: black canvas).
    #[serde(default)]
    pub background: Background,
    /// Keep only patches with at least this foreground fraction; the others stay zero in Z.
    #[serde(default)]
    pub min_fraction: f32,
}

impl Default for ForegroundSpec {
    fn default() -> Self {
        Self {
            threshold: default_fg_threshold(),
            background: Background::Light,
            min_fraction: 0.0,
        }
    }
}

impl ForegroundSpec {
    pub fn to_foreground(&self) -> Foreground {
        Foreground {
            threshold: self.threshold,
            light_background: self.background == Background::Light,
            min_fraction: self.min_fraction,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// A checkpoint every this many optimizer steps (0: only at the end of the run).
    #[serde(default = "default_every_steps")]
    pub every_steps: u64,
    /// Complete checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Where checkpoints go; defaults to OUTPUT/checkpoints.
    #[serde(default)]
    pub url: Option<String>,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: default_every_steps(),
            keep: default_keep(),
            url: None,
        }
    }
}

fn default_every_steps() -> u64 {
    100
}
fn default_keep() -> usize {
    2
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentSpec {
    /// Take fill-pass cells from the store when written within `max_age_steps` optimizer steps.
    #[serde(default)]
    pub reuse: bool,
    #[serde(default = "default_max_age")]
    pub max_age_steps: u64,
    /// MiB of latent grids kept in memory; the rest spills to `spill_dir`.
    #[serde(default = "default_latent_budget")]
    pub budget_mib: usize,
    /// Local directory for spilled grids; defaults to a temporary directory.
    #[serde(default)]
    pub spill_dir: Option<String>,
}

impl Default for LatentSpec {
    fn default() -> Self {
        Self {
            reuse: false,
            max_age_steps: default_max_age(),
            budget_mib: default_latent_budget(),
            spill_dir: None,
        }
    }
}

fn default_max_age() -> u64 {
    1000
}
fn default_latent_budget() -> usize {
    256
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    #[default]
    Light,
    Dark,
}

fn default_fg_threshold() -> u8 {
    220
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub backbone: BackboneKind,
    /// D: the size of one patch's latent vector.
    #[serde(default = "default_latent_dim")]
    pub latent_dim: i64,
    /// Width of the PatchGD head's conv blocks.
    #[serde(default = "default_head_width")]
    pub head_width: i64,
    /// Number of classes; omitted = largest label + 1.
    #[serde(default)]
    pub classes: Option<i64>,
    /// Dropout2d probability after each of the head's blocks (0 turns it off).
    #[serde(default = "default_head_dropout")]
    pub head_dropout: f64,
    /// What the backbone's BatchNorm does in training: `train` (batch statistics) or `frozen`
    /// (running statistics, as for fine-tuning pretrained weights).
    #[serde(default)]
    pub batch_norm: BatchNormMode,
    /// The same for the PatchGD head's BatchNorm. Frozen, no layer looks across a batch's
    /// images, so a data-parallel run takes the steps one process would (docs/distributed.md).
    #[serde(default)]
    pub head_batch_norm: BatchNormMode,
    /// Backbone weights to start from: a torchvision state dict (`torch.save`, `.pt`/`.pth`) or
    /// a safetensors file with torchvision's names (or patchgd's own), on any supported store.
    #[serde(default)]
    pub pretrained: Option<String>,
    /// A previous patchgd run's output, or one of its checkpoints, to start every weight from
    /// (the head too, when the class count matches).
    #[serde(default)]
    pub init_from: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchGdSpec {
    /// rho: the fraction of patches sampled with gradient per inner iteration.
    #[serde(default = "default_rho")]
    pub sampling_fraction: f64,
    /// epsilon: `zeta` (step once per outer step) or `one` (step every inner iteration).
    #[serde(default = "default_accumulation")]
    pub accumulation: Accumulation,
    /// Patches per backbone call in the fill pass and at inference.
    #[serde(default = "default_fill_chunk")]
    pub fill_chunk: i64,
}

impl Default for PatchGdSpec {
    fn default() -> Self {
        Self {
            sampling_fraction: default_rho(),
            accumulation: default_accumulation(),
            fill_chunk: default_fill_chunk(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdSpec {
    /// The GD baseline resizes each whole image to image_size x image_size.
    #[serde(default = "default_gd_size")]
    pub image_size: u32,
}

impl Default for GdSpec {
    fn default() -> Self {
        Self {
            image_size: default_gd_size(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    pub epochs: u64,
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Linear warm-up length in epochs.
    #[serde(default = "default_warmup")]
    pub warmup_epochs: f64,
    /// Epoch at which the linear decay reaches zero (the horizon); defaults to `epochs`.
    #[serde(default)]
    pub decay_epochs: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// An image whose patch pixels exceed this many MiB waits for its step in an unnamed
    /// temporary file ($TMPDIR) instead of memory, so memory stays flat in image size.
    #[serde(default = "default_spool_above_mib")]
    pub spool_above_mib: f64,
    /// `f32`; `bf16`: conv and linear layers compute in bf16 (CPU or CUDA), fp32 master weights;
    /// `f16`: mixed precision on CUDA (fp16 autocast, loss scaling, fp32 weights).
    #[serde(default)]
    pub precision: Precision,
}

fn default_name() -> String {
    "run".into()
}
fn default_method() -> Method {
    Method::Patchgd
}
fn default_channels() -> usize {
    3
}
fn default_decode_workers() -> usize {
    2
}
fn default_buffer_mib() -> usize {
    128
}
fn default_latent_dim() -> i64 {
    256
}
fn default_head_width() -> i64 {
    256
}
fn default_head_dropout() -> f64 {
    crate::model::head::HEAD_DROPOUT
}
fn default_rho() -> f64 {
    0.25
}
fn default_accumulation() -> Accumulation {
    Accumulation::Zeta
}
fn default_fill_chunk() -> i64 {
    256
}
fn default_gd_size() -> u32 {
    256
}
fn default_spool_above_mib() -> f64 {
    16.0
}
fn default_lr() -> f64 {
    1e-3
}
fn default_warmup() -> f64 {
    2.0
}
fn default_seed() -> u64 {
    42
}

impl Definition {
    pub fn from_file(path: &std::path::Path) -> Result<Self, DefinitionError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_yaml(&text, &file)
    }

    /// Parse and validate; `file` names the source in messages.
    pub fn from_yaml(text: &str, file: &str) -> Result<Self, DefinitionError> {
        let def: Definition = serde_norway::from_str(text).map_err(|e| DefinitionError::Parse {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        def.validate(file)?;
        Ok(def)
    }

    /// Parse with `key.path=value` overrides applied first (values are YAML scalars), e.g.
    /// `method=gd` or `train.epochs=3`: how the CLI's `--set` runs a variant of one file.
    pub fn from_yaml_with_overrides(
        text: &str,
        file: &str,
        overrides: &[&str],
    ) -> Result<Self, DefinitionError> {
        let parse_err = |message: String| DefinitionError::Parse {
            file: file.to_string(),
            message,
        };
        let mut doc: serde_norway::Value =
            serde_norway::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        for item in overrides {
            let (key, raw) = item.split_once('=').ok_or_else(|| {
                parse_err(format!(
                    "override '{item}' is not KEY=VALUE (for example train.epochs=3)"
                ))
            })?;
            let value: serde_norway::Value = serde_norway::from_str(raw)
                .map_err(|e| parse_err(format!("override '{item}': {e}")))?;
            let mut node = &mut doc;
            for part in key.split('.') {
                let map = node.as_mapping_mut().ok_or_else(|| {
                    parse_err(format!(
                        "override '{item}': '{part}' is not inside a mapping"
                    ))
                })?;
                let k = serde_norway::Value::String(part.to_string());
                if !map.contains_key(&k) {
                    map.insert(k.clone(), serde_norway::Value::Mapping(Default::default()));
                }
                node = map.get_mut(&k).expect("just inserted");
            }
            *node = value;
        }
        let def: Definition =
            serde_norway::from_value(doc).map_err(|e| parse_err(e.to_string()))?;
        def.validate(file)?;
        Ok(def)
    }

    pub fn stride(&self) -> usize {
        self.patch.stride.unwrap_or(self.patch.size)
    }

    /// Where checkpoints go: `checkpoint.url`, or OUTPUT/checkpoints.
    pub fn checkpoint_url(&self) -> String {
        self.checkpoint
            .url
            .clone()
            .unwrap_or_else(|| format!("{}/checkpoints", self.output.trim_end_matches('/')))
    }

    /// What the source stage needs from this file. GD reads each image whole, resized.
    /// The model this definition describes, predicting `classes` classes.
    pub fn model_spec(&self, classes: i64) -> crate::model::ModelSpec {
        crate::model::ModelSpec {
            method: self.method,
            backbone: self.model.backbone,
            channels: self.source.channels as i64,
            latent_dim: self.model.latent_dim,
            head_width: self.model.head_width,
            head_dropout: self.model.head_dropout,
            classes,
        }
    }

    pub fn stream_config(&self) -> StreamConfig {
        let (patch, stride, resize_to) = match self.method {
            Method::Patchgd => (self.patch.size, self.stride(), None),
            Method::Gd => {
                let s = self.gd.image_size;
                (s as usize, s as usize, Some(s))
            }
        };
        StreamConfig {
            stride,
            resize_to,
            decode_workers: self.source.decode_workers,
            buffer_bytes: self.source.buffer_mib << 20,
            level: self.source.level,
            target_mpp: self.source.target_mpp,
            foreground: self.patch.foreground.to_foreground(),
            ..StreamConfig::new(patch, self.source.channels)
        }
    }

    /// The pipeline's images as SQL sees them (`images` and `patches` tables), with its patch
    /// settings (PatchGD's, even for a GD pipeline: SQL is about patches).
    pub fn data_set(&self) -> crate::sql::DataSet {
        let mut stream = self.stream_config();
        stream.patch = self.patch.size;
        stream.stride = self.stride();
        stream.resize_to = None;
        crate::sql::DataSet {
            images: self.source.images.clone(),
            labels: Some(self.source.labels.clone()),
            storage: self.storage.clone(),
            stream,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const MINIMAL: &str = "source: {images: data/x, labels: data/x.csv}\npatch: {size: 32}\nmodel: {backbone: small_cnn}\ntrain: {epochs: 1, batch_size: 2}\noutput: out/x\n";

    #[test]
    fn minimal_file_gets_the_documented_defaults() {
        let d = Definition::from_yaml(MINIMAL, "t.yaml").unwrap();
        assert_eq!(d.stride(), 32);
        assert_eq!(d.method, Method::Patchgd);
        assert_eq!(d.patchgd.accumulation, Accumulation::Zeta);
        assert_eq!(
            (d.train.lr, d.train.seed, d.model.latent_dim),
            (1e-3, 42, 256)
        );
    }
}
