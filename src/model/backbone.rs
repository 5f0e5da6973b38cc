//! Backbones f1: a CNN trunk plus Linear(features -> D), mapping one patch to one D-vector.

use std::str::FromStr;

use tch::Tensor;
use tch::nn::{self, ModuleT};

use super::init::{Conv, ConvInit, conv2d, linear};
use super::mobilenet;
use super::norm::batch_norm2d;
use super::resnet::{self, Depth};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// Four stride-2 conv blocks (32, 64, 128, 128 channels): for tests and CPU demos.
    SmallCnn,
    Resnet18,
    Resnet50,
    MobilenetV2,
}

impl BackboneKind {
    pub const NAMES: &'static str = "small_cnn, resnet18, resnet50, mobilenet_v2";

    /// The name pipeline files use.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SmallCnn => "small_cnn",
            Self::Resnet18 => "resnet18",
            Self::Resnet50 => "resnet50",
            Self::MobilenetV2 => "mobilenet_v2",
        }
    }

    /// Channels the trunk takes. The torchvision-shaped trunks take RGB; grey input is repeated.
    pub fn input_channels(&self, data_channels: i64) -> i64 {
        match self {
            BackboneKind::SmallCnn => data_channels,
            _ => 3,
        }
    }
}

impl FromStr for BackboneKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "small_cnn" => Ok(Self::SmallCnn),
            "resnet18" => Ok(Self::Resnet18),
            "resnet50" => Ok(Self::Resnet50),
            "mobilenet_v2" => Ok(Self::MobilenetV2),
            other => Err(format!(
                "unknown backbone '{other}'; expected one of: {}",
                Self::NAMES
            )),
        }
    }
}

/// The small CNN's block: conv3x3 stride 2 (no bias) + BatchNorm + ReLU, PyTorch's defaults.
fn conv_bn_relu(p: nn::Path, c_in: i64, c_out: i64) -> nn::SequentialT {
    nn::seq_t()
        .add(conv2d(
            &p / "conv",
            Conv::new(c_in, c_out, 3).stride(2),
            ConvInit::TorchDefault,
        ))
        .add(batch_norm2d(&p / "bn", c_out))
        .add_fn(|x| x.relu())
}

/// The trunk + projection to `latent_dim`. Input: N x C x m x m, normalised; output: N x D.
pub struct Backbone {
    kind: BackboneKind,
    data_channels: i64,
    trunk: nn::SequentialT,
    /// Linear(features -> D): ours, not torchvision's (its `fc` / `classifier` is left out).
    project: nn::Linear,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backbone({:?})", self.kind)
    }
}

impl Backbone {
    /// Every layer starts as PyTorch (small CNN, projection) or torchvision (the ResNet and
    /// MobileNetV2 trunks) would start it (see [`super::init`]).
    pub fn new(p: &nn::Path, kind: BackboneKind, data_channels: i64, latent_dim: i64) -> Self {
        let (trunk, features): (nn::SequentialT, i64) = match kind {
            BackboneKind::SmallCnn => {
                let seq = nn::seq_t()
                    .add(conv_bn_relu(p / "block1", data_channels, 32))
                    .add(conv_bn_relu(p / "block2", 32, 64))
                    .add(conv_bn_relu(p / "block3", 64, 128))
                    .add(conv_bn_relu(p / "block4", 128, 128))
                    .add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
                (seq, 128)
            }
            BackboneKind::Resnet18 => (resnet::trunk(p, Depth::R18), Depth::R18.features()),
            BackboneKind::Resnet50 => (resnet::trunk(p, Depth::R50), Depth::R50.features()),
            BackboneKind::MobilenetV2 => (mobilenet::trunk(p), mobilenet::FEATURES),
        };
        let project = linear(p / "project", features, latent_dim);
        Self {
            kind,
            data_channels,
            trunk,
            project,
        }
    }

    pub fn kind(&self) -> BackboneKind {
        self.kind
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.features_t(x, train).apply(&self.project)
    }

    /// The trunk's pooled features, before the projection to D (what torchvision's model
    /// computes before its `fc` or `classifier`).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Tensor {
        let wanted = self.kind.input_channels(self.data_channels);
        let x = if x.size()[1] != wanted {
            x.expand([-1, wanted, -1, -1], false)
        } else {
            x.shallow_clone()
        };
        self.trunk.forward_t(&x, train)
    }
}
