//! Backbones f1: a CNN trunk plus Linear(features -> D), mapping one patch to one D-vector.

use std::str::FromStr;

use tch::Tensor;
use tch::nn::{self, ModuleT};

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

fn conv_bn_relu(p: nn::Path, c_in: i64, c_out: i64) -> nn::SequentialT {
    let cfg = nn::ConvConfig {
        stride: 2,
        padding: 1,
        bias: false,
        ..Default::default()
    };
    nn::seq_t()
        .add(nn::conv2d(&p / "conv", c_in, c_out, 3, cfg))
        .add(nn::batch_norm2d(&p / "bn", c_out, Default::default()))
        .add_fn(|x| x.relu())
}

/// The trunk + projection to `latent_dim`. Input: N x C x m x m, normalised; output: N x D.
pub struct Backbone {
    kind: BackboneKind,
    data_channels: i64,
    trunk: Box<dyn ModuleT>,
    project: Option<nn::Linear>,
}

impl std::fmt::Debug for Backbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Backbone({:?})", self.kind)
    }
}

impl Backbone {
    pub fn new(p: &nn::Path, kind: BackboneKind, data_channels: i64, latent_dim: i64) -> Self {
        let (trunk, features): (Box<dyn ModuleT>, Option<i64>) = match kind {
            BackboneKind::SmallCnn => {
                let seq = nn::seq_t()
                    .add(conv_bn_relu(p / "block1", data_channels, 32))
                    .add(conv_bn_relu(p / "block2", 32, 64))
                    .add(conv_bn_relu(p / "block3", 64, 128))
                    .add(conv_bn_relu(p / "block4", 128, 128))
                    .add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1));
                (Box::new(seq), Some(128))
            }
            BackboneKind::Resnet18 => (
                Box::new(tch::vision::resnet::resnet18_no_final_layer(p)),
                Some(512),
            ),
            BackboneKind::Resnet50 => (
                Box::new(tch::vision::resnet::resnet50_no_final_layer(p)),
                Some(2048),
            ),
            // tch's MobileNetV2 ends in Dropout(0.2) + Linear(1280 -> n): with n = D that is the
            // projection already.
            BackboneKind::MobilenetV2 => {
                (Box::new(tch::vision::mobilenet::v2(p, latent_dim)), None)
            }
        };
        let project =
            features.map(|f| nn::linear(p / "project", f, latent_dim, Default::default()));
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
        let wanted = self.kind.input_channels(self.data_channels);
        let x = if wanted != self.data_channels {
            x.expand([-1, wanted, -1, -1], false)
        } else {
            x.shallow_clone()
        };
        let h = self.trunk.forward_t(&x, train);
        match &self.project {
            Some(linear) => h.apply(linear),
            None => h,
        }
    }
}
