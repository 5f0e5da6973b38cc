//! Models: backbone f1 (patch -> D-vector), the PatchGD head f2 over the latent grid Z, and the
//! GD baseline's linear classifier. Variables are named `backbone.*`, `head.*`, `classifier.*`.

pub mod backbone;
pub mod head;

pub use backbone::{Backbone, BackboneKind};
pub use head::Head;

use tch::nn;
use tch::{Device, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Patch Gradient Descent: backbone on patches, head on the latent grid.
    Patchgd,
    /// The baseline: the whole (resized) image through the backbone and a linear classifier.
    Gd,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub method: Method,
    pub backbone: BackboneKind,
    pub channels: i64,
    pub latent_dim: i64,
    pub head_width: i64,
    pub classes: i64,
}

pub struct Model {
    pub vs: nn::VarStore,
    pub spec: ModelSpec,
    backbone: Backbone,
    head: Option<Head>,
    classifier: Option<nn::Linear>,
    /// Forward passes under fp16 autocast (CUDA), outputs back in fp32.
    mixed: bool,
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
                )),
                None,
            ),
            Method::Gd => (
                None,
                Some(nn::linear(
                    &root / "classifier",
                    spec.latent_dim,
                    spec.classes,
                    Default::default(),
                )),
            ),
        };
        Self {
            vs,
            spec,
            backbone,
            head,
            classifier,
            mixed: false,
        }
    }

    /// Run forward passes under fp16 autocast (mixed precision; takes effect on CUDA only).
    pub fn set_mixed_precision(&mut self, on: bool) {
        self.mixed = on;
    }

    /// `f` under autocast when mixed, its output in fp32 either way.
    fn forward(&self, f: impl FnOnce() -> Tensor) -> Tensor {
        if self.mixed {
            tch::autocast(true, f).to_kind(tch::Kind::Float)
        } else {
            f()
        }
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Patches (N x C x m x m, normalised) -> N x D.
    pub fn encode(&self, patches: &Tensor, train: bool) -> Tensor {
        self.forward(|| self.backbone.forward_t(patches, train))
    }

    /// Latent grid (B x D x rows x cols) -> B x classes logits.
    pub fn classify_grid(&self, z: &Tensor, train: bool) -> Tensor {
        let head = self
            .head
            .as_ref()
            .expect("classify_grid needs a PatchGD model");
        self.forward(|| head.forward_t(z, train))
    }

    /// Whole-image vectors (B x D) -> B x classes logits (the GD baseline).
    pub fn classify_vector(&self, v: &Tensor) -> Tensor {
        let classifier = self
            .classifier
            .as_ref()
            .expect("classify_vector needs a GD model");
        self.forward(|| v.apply(classifier))
    }

    /// Every variable (parameters and BatchNorm buffers) by name, sorted: what the weights file holds.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
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

    /// Overwrite every variable with the tensor of the same name (a checkpoint's weights).
    pub fn load_named(&self, tensors: &[(String, Tensor)]) -> Result<(), String> {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for (name, mut var) in self.vs.variables() {
            let t = by_name
                .get(name.as_str())
                .ok_or_else(|| format!("weights have no tensor '{name}'"))?;
            if t.size() != var.size() {
                return Err(format!(
                    "tensor '{name}' has shape {:?}, the model expects {:?}",
                    t.size(),
                    var.size()
                ));
            }
            tch::no_grad(|| var.copy_(&t.to_device(var.device())));
        }
        Ok(())
    }

    /// Trainable parameters in a fixed (name) order, so that optimizer state lines up across runs.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.named_tensors()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }
}
