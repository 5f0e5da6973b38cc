//! Models: backbone f1 (patch -> D-vector), the PatchGD head f2 over the latent grid Z, and the
//! GD baseline's linear classifier. Variables are named `backbone.*`, `head.*`, `classifier.*`.

pub mod backbone;
pub mod grad_cam;
pub mod head;
pub mod init;
pub mod input;
pub mod mobilenet;
pub mod norm;
pub mod precision;
pub mod pretrained;
pub mod resnet;
mod torch_pickle;

pub use backbone::{Backbone, BackboneKind};
pub use head::Head;
pub use input::Normalization;
pub use precision::Precision;

/// Saved tensors (a checkpoint's weights or optimizer state) that do not fit what they are
/// loaded into.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A tensor the model or optimizer has is not in the saved file.
    #[error("the saved {what} have no tensor '{name}'")]
    Missing {
        /// `weights` or `optimizer state`.
        what: &'static str,
        /// The tensor's name.
        name: String,
    },
    /// A saved tensor's shape differs from the model's.
    #[error("saved tensor '{name}' has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        found: Vec<i64>,
        /// The shape the model or optimizer has.
        expected: Vec<i64>,
    },
    /// A saved value that cannot be what it claims (the loss scaler's state).
    #[error("saved '{name}': {reason}")]
    Invalid {
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

use std::collections::BTreeMap;

use tch::nn;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Patch Gradient Descent: backbone on patches, head on the latent grid.
    Patchgd,
    /// The baseline: the whole (resized) image through the backbone and a linear classifier.
    Gd,
}

/// What the backbone's BatchNorm layers do in training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchNormMode {
    /// Normalise with each mini-batch's statistics and update the running ones (PyTorch's
    /// `model.train()`).
    #[default]
    Train,
    /// Normalise with the running statistics and leave them untouched; the scale and shift still
    /// learn. The usual choice when fine-tuning pretrained weights with small patch batches, and
    /// what makes a step's gradient independent of how its patches are grouped.
    Frozen,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub method: Method,
    pub backbone: BackboneKind,
    pub channels: i64,
    pub latent_dim: i64,
    pub head_width: i64,
    pub classes: i64,
    /// The head's Dropout2d probability ([`head::HEAD_DROPOUT`] by default).
    pub head_dropout: f64,
}

/// One trainable variable as the optimizer sees it.
pub struct Param {
    pub name: String,
    /// What the optimizer updates and checkpoints hold (fp32).
    pub master: Tensor,
    /// The lower-precision copy forward passes use, whose gradient drives the update (bf16);
    /// `None` when the master is used directly.
    pub compute: Option<Tensor>,
}

pub struct Model {
    pub vs: nn::VarStore,
    pub spec: ModelSpec,
    backbone: Backbone,
    head: Option<Head>,
    classifier: Option<nn::Linear>,
    /// How forward passes compute (`train.precision`); outputs are fp32 whatever it is.
    precision: Precision,
    /// With bf16: the fp32 master of each variable whose `vs` tensor now holds a bf16 copy.
    masters: BTreeMap<String, Tensor>,
    /// `model.batch_norm`: whether the backbone's BatchNorm uses batch statistics in training.
    batch_norm: BatchNormMode,
    /// `model.head_batch_norm`: the same for the head's BatchNorm.
    head_batch_norm: BatchNormMode,
}

impl Model {
    /// Builds with the current libtorch seed (call `tch::manual_seed` first for repeatable init).
    pub fn new(spec: ModelSpec, device: Device) -> Self {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = Backbone::new(
            &(&root / "backbone"),
            spec.backbone,
            spec.channels,
            spec.latent_dim,
        );
        let (head, classifier) = match spec.method {
            Method::Patchgd => (
                Some(Head::new(
                    &(&root / "head"),
                    spec.latent_dim,
                    spec.head_width,
                    spec.classes,
                    spec.head_dropout,
                )),
                None,
            ),
            Method::Gd => (
                None,
                Some(init::linear(
                    &root / "classifier",
                    spec.latent_dim,
                    spec.classes,
                )),
            ),
        };
        Self {
            vs,
            spec,
            backbone,
            head,
            classifier,
            precision: Precision::F32,
            masters: BTreeMap::new(),
            batch_norm: BatchNormMode::Train,
            head_batch_norm: BatchNormMode::Train,
        }
    }

    /// Choose what the backbone's BatchNorm does in training ([`BatchNormMode`]).
    pub fn set_batch_norm(&mut self, mode: BatchNormMode) {
        self.batch_norm = mode;
    }

    /// Choose what the head's BatchNorm does in training. Frozen, no layer of a PatchGD model
    /// looks across the images of a batch: a data-parallel step then equals one process's.
    pub fn set_head_batch_norm(&mut self, mode: BatchNormMode) {
        self.head_batch_norm = mode;
    }

    /// Choose how forward passes compute; call once, before the optimizer is built.
    ///
    /// `F16` runs them under autocast (fp16, effective on CUDA only). `Bf16` moves every conv and
    /// linear variable to a bf16 compute copy and keeps its fp32 master here (the optimizer
    /// updates the master and refreshes the copy); BatchNorm's variables stay fp32, which
    /// libtorch's batch_norm accepts with bf16 input and which keeps its running statistics exact.
    pub fn set_precision(&mut self, precision: Precision) {
        assert!(
            self.masters.is_empty(),
            "set_precision is called once, on a new model"
        );
        self.precision = precision;
        if precision != Precision::Bf16 {
            return;
        }
        let vars = self.vs.variables();
        // tch's BatchNorm is the one module with a `running_mean` next to its weight and bias.
        let batch_norms: Vec<&str> = vars
            .keys()
            .filter_map(|n| n.strip_suffix(".running_mean"))
            .collect();
        for (name, var) in &vars {
            let owner = name.rsplit_once('.').map_or("", |(p, _)| p);
            if batch_norms.contains(&owner) || var.kind() != Kind::Float {
                continue;
            }
            let master = var.detach().copy();
            let mut compute = var.shallow_clone();
            // set_data swaps the storage under every handle of the variable (the modules' too).
            tch::no_grad(|| compute.set_data(&var.to_kind(Kind::BFloat16)));
            self.masters.insert(name.clone(), master);
        }
    }

    /// `f(x)` in the model's precision: under autocast for f16, on a bf16 copy of `x` for bf16;
    /// the output in fp32 either way.
    fn forward(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        match self.precision {
            Precision::F32 => f(x),
            Precision::F16 => tch::autocast(true, || f(x)).to_kind(Kind::Float),
            Precision::Bf16 => f(&x.to_kind(Kind::BFloat16)).to_kind(Kind::Float),
        }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Patches (N x C x m x m, normalised) -> N x D.
    /// `train` selects batch statistics for BatchNorm unless it is frozen (the backbones have no
    /// other layer that trains differently).
    pub fn encode(&self, patches: &Tensor, train: bool) -> Tensor {
        let train = train && self.batch_norm == BatchNormMode::Train;
        self.forward(patches, |x| self.backbone.forward_t(x, train))
    }

    /// Patches -> the backbone trunk's pooled features (N x features), before the projection
    /// to D; eval mode with `train` false.
    pub fn trunk_features(&self, patches: &Tensor, train: bool) -> Tensor {
        let train = train && self.batch_norm == BatchNormMode::Train;
        self.forward(patches, |x| self.backbone.features_t(x, train))
    }

    /// Latent grid (B x D x rows x cols) -> B x classes logits.
    pub fn classify_grid(&self, z: &Tensor, train: bool) -> Tensor {
        let head = self
            .head
            .as_ref()
            .expect("classify_grid needs a PatchGD model");
        let frozen = self.head_batch_norm == BatchNormMode::Frozen;
        self.forward(z, |x| head.forward_with(x, train, frozen))
    }

    /// Whole-image vectors (B x D) -> B x classes logits (the GD baseline).
    pub fn classify_vector(&self, v: &Tensor) -> Tensor {
        let classifier = self
            .classifier
            .as_ref()
            .expect("classify_vector needs a GD model");
        self.forward(v, |x| x.apply(classifier))
    }

    /// Every variable (parameters and BatchNorm buffers) by name, sorted, in fp32 (the masters
    /// of bf16 copies): what the weights file holds.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, var)| match self.masters.get(&name) {
                Some(master) => (name, master.shallow_clone()),
                None => (name, var),
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Build with initial weights drawn from libtorch's generator seeded with `seed`, under a
    /// process-wide lock so that models built on other threads cannot interleave their draws.
    pub fn seeded(spec: ModelSpec, device: Device, seed: u64) -> Self {
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        Self::new(spec, device)
    }

    /// Start the head's dropout masks from a known state.
    pub fn reseed_dropout(&self, rng: crate::rng::Rng) {
        if let Some(h) = &self.head {
            h.reseed_dropout(rng);
        }
    }

    /// Keep the head's dropout masks as they are drawn (a run's trace), or stop.
    pub fn record_dropout(&self, on: bool) {
        if let Some(h) = &self.head {
            h.record_dropout(on);
        }
    }

    /// The head's dropout masks drawn since the last call (see [`Head::take_dropout_masks`]).
    pub fn take_dropout_masks(&self) -> Vec<Vec<bool>> {
        self.head
            .as_ref()
            .map(|h| h.take_dropout_masks())
            .unwrap_or_default()
    }

    /// Overwrite every variable with the tensor of the same name (a checkpoint's weights).
    pub fn load_named(&self, tensors: &[(String, Tensor)]) -> Result<(), LoadError> {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        if let Some(name) = self
            .vs
            .variables()
            .into_keys()
            .find(|n| !by_name.contains_key(n.as_str()))
        {
            return Err(LoadError::Missing {
                what: "weights",
                name,
            });
        }
        self.load_some(tensors)
    }

    /// Overwrite the variables named in `tensors` (pretrained weights: some of them); the
    /// others keep their values. A name the model does not have is ignored.
    pub fn load_some(&self, tensors: &[(String, Tensor)]) -> Result<(), LoadError> {
        let vars = self.vs.variables();
        for (name, t) in tensors {
            let Some(var) = vars.get(name) else { continue };
            if t.size() != var.size() {
                return Err(LoadError::Shape {
                    name: name.clone(),
                    found: t.size(),
                    expected: var.size(),
                });
            }
            tch::no_grad(|| {
                let t = t.to_device(var.device());
                if let Some(master) = self.masters.get(name) {
                    master.shallow_clone().copy_(&t);
                }
                var.shallow_clone().copy_(&t)
            });
        }
        Ok(())
    }

    /// Trainable parameters in a fixed (name) order, so that optimizer state lines up across
    /// runs: (name, the fp32 tensor the optimizer updates, its bf16 compute copy if any).
    pub fn trainable(&self) -> Vec<Param> {
        let mut vars: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter()
            .map(|(name, var)| match self.masters.get(&name) {
                Some(master) => Param {
                    master: master.shallow_clone(),
                    compute: Some(var),
                    name,
                },
                None => Param {
                    name,
                    master: var,
                    compute: None,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What PyTorch (or torchvision) draws a variable from, read off its name and shape alone.
    enum Expected {
        Constant(f64),
        /// U(±bound): std bound/√3, kurtosis 1.8.
        Uniform(f64),
        /// N(0, std): kurtosis 3.
        Normal(f64),
    }

    /// fan_in and fan_out of a weight, as PyTorch computes them from its shape.
    fn fans(shape: &[i64]) -> (f64, f64) {
        let receptive: i64 = shape[2..].iter().product();
        ((shape[1] * receptive) as f64, (shape[0] * receptive) as f64)
    }

    fn expected(
        backbone: BackboneKind,
        name: &str,
        shapes: &BTreeMap<String, Vec<i64>>,
    ) -> Expected {
        let (owner, kind) = name.rsplit_once('.').unwrap();
        let is_bn = shapes.contains_key(&format!("{owner}.running_mean"));
        let torchvision_trunk = name.starts_with("backbone.")
            && !name.starts_with("backbone.project.")
            && backbone != BackboneKind::SmallCnn;
        let weight = &shapes[&format!("{owner}.weight")];
        match kind {
            "running_mean" => Expected::Constant(0.0),
            "running_var" => Expected::Constant(1.0),
            "weight" | "bias" if is_bn => {
                Expected::Constant(if kind == "weight" { 1.0 } else { 0.0 })
            }
            // torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
            "weight" if torchvision_trunk => Expected::Normal((2.0 / fans(weight).1).sqrt()),
            // nn.Conv2d and nn.Linear's defaults, weight and bias alike.
            "weight" | "bias" => Expected::Uniform(1.0 / fans(weight).0.sqrt()),
            other => panic!("unexpected variable kind '{other}' in {name}"),
        }
    }

    fn check_model(spec: ModelSpec) {
        let model = Model::seeded(spec.clone(), Device::Cpu, 3);
        let tensors = model.named_tensors();
        let shapes: BTreeMap<String, Vec<i64>> =
            tensors.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        for (name, t) in &tensors {
            let values: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap();
            let n = values.len() as f64;
            let mean = values.iter().sum::<f64>() / n;
            let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
            let max = values.iter().fold(0f64, |m, v| m.max(v.abs()));
            let what = format!("{:?} {name} (n = {n})", spec.backbone);
            let (sigma, kurtosis, bound) = match expected(spec.backbone, name, &shapes) {
                Expected::Constant(c) => {
                    assert!(values.iter().all(|v| *v == c), "{what}: not all {c}");
                    continue;
                }
                Expected::Uniform(b) => (b / 3f64.sqrt(), 1.8, Some(b)),
                Expected::Normal(s) => (s, 3.0, None),
            };
            // Six standard errors: a wrong distribution (tch's bound is 2.45x) is far outside.
            assert!(
                mean.abs() <= 6.0 * sigma / n.sqrt(),
                "{what}: mean {mean:.3e}, expected 0 ± {:.1e}",
                6.0 * sigma / n.sqrt()
            );
            if n >= 16.0 {
                let tolerance = 6.0 * ((kurtosis - 1.0) / (4.0 * n)).sqrt();
                assert!(
                    (std / sigma - 1.0).abs() <= tolerance,
                    "{what}: std {std:.4e}, expected {sigma:.4e} (± {:.1}%)",
                    tolerance * 100.0
                );
            }
            if let Some(b) = bound {
                assert!(max <= b * (1.0 + 1e-6), "{what}: |value| {max} beyond {b}");
            }
        }
    }

    #[test]
    fn every_layer_starts_from_pytorchs_distribution() {
        for backbone in [
            BackboneKind::SmallCnn,
            BackboneKind::Resnet18,
            BackboneKind::Resnet50,
            BackboneKind::MobilenetV2,
        ] {
            for method in [Method::Patchgd, Method::Gd] {
                check_model(ModelSpec {
                    method,
                    backbone,
                    channels: 3,
                    latent_dim: 64,
                    head_width: 32,
                    classes: 10,
                    head_dropout: head::HEAD_DROPOUT,
                });
            }
        }
    }
}
