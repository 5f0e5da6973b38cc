//! The head f2 of METHOD.md: one 3x3 conv block at stride 1, three at stride 2, each
//! Conv -> ReLU -> BatchNorm -> Dropout2d(0.2); then adaptive average pooling (so any grid size
//! works) and Linear(width -> classes).

use tch::Tensor;
use tch::nn;

#[derive(Debug)]
struct Block {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

#[derive(Debug)]
pub struct Head {
    blocks: Vec<Block>,
    classifier: nn::Linear,
}

pub const HEAD_DROPOUT: f64 = 0.2;

impl Head {
    pub fn new(p: &nn::Path, latent_dim: i64, width: i64, classes: i64) -> Self {
        let blocks = (0..4)
            .map(|i| {
                let stride = if i == 0 { 1 } else { 2 };
                let c_in = if i == 0 { latent_dim } else { width };
                let cfg = nn::ConvConfig {
                    stride,
                    padding: 1,
                    ..Default::default()
                };
                Block {
                    conv: nn::conv2d(p / format!("block{i}") / "conv", c_in, width, 3, cfg),
                    bn: nn::batch_norm2d(p / format!("block{i}") / "bn", width, Default::default()),
                }
            })
            .collect();
        let classifier = nn::linear(p / "classifier", width, classes, Default::default());
        Self { blocks, classifier }
    }

    /// `z`: B x D x rows x cols. Returns B x classes logits.
    pub fn forward_t(&self, z: &Tensor, train: bool) -> Tensor {
        let mut x = z.shallow_clone();
        for b in &self.blocks {
            x = x
                .apply(&b.conv)
                .relu()
                .apply_t(&b.bn, train)
                .feature_dropout(HEAD_DROPOUT, train);
        }
        x.adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&self.classifier)
    }
}
