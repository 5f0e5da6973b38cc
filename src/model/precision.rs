//! The precision a model computes in. The model applies it (`Model::set_precision`: bf16 weight
//! copies, fp16 autocast); the optimizer's side of mixed precision (fp32 masters, loss scaling)
//! is in `train::precision`.

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in fp32.
    #[default]
    F32,
    /// Backbone and head under fp16 autocast (CUDA only), loss scaling, fp32 weights.
    F16,
    /// Conv and linear weights, inputs and activations in bf16 (CPU or CUDA); fp32 masters,
    /// BatchNorm and loss.
    Bf16,
}

impl Precision {
    /// The name pipeline files use.
    pub fn name(&self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}
