//! The head f2 of docs/method.md: one 3x3 conv block at stride 1, three at stride 2, each
//! Conv -> ReLU -> BatchNorm -> Dropout2d(0.2); then adaptive average pooling (so any grid size
//! works) and Linear(width -> classes).

use std::cell::RefCell;

use tch::Tensor;
use tch::nn;

use super::init::{Conv, Conv2d, ConvInit, conv2d, linear};
use super::norm::{BatchNorm2d, batch_norm2d};
use crate::rng::Rng;

#[derive(Debug)]
struct Block {
    conv: Conv2d,
    bn: BatchNorm2d,
}

#[derive(Debug)]
pub struct Head {
    blocks: Vec<Block>,
    classifier: nn::Linear,
    /// Dropout2d probability (`model.head_dropout`; 0 = no dropout).
    dropout: f64,
    /// Dropout masks come from our own generator, not libtorch's process-wide one: its state
    /// is plain data (resumable) and two runs in one process cannot disturb each other.
    dropout_rng: RefCell<Rng>,
    /// The masks drawn since recording started, in call order (a run's trace records them).
    recorded_masks: RefCell<Option<Vec<Vec<bool>>>>,
}

/// The reference's Dropout2d probability: `model.head_dropout`'s default.
pub const HEAD_DROPOUT: f64 = 0.2;

impl Head {
    /// Convs (with bias), BatchNorms and the classifier start as PyTorch's defaults.
    pub fn new(p: &nn::Path, latent_dim: i64, width: i64, classes: i64, dropout: f64) -> Self {
        let blocks = (0..4)
            .map(|i| {
                let stride = if i == 0 { 1 } else { 2 };
                let c_in = if i == 0 { latent_dim } else { width };
                let block = p / format!("block{i}");
                Block {
                    conv: conv2d(
                        &block / "conv",
                        Conv::new(c_in, width, 3).stride(stride).bias(),
                        ConvInit::TorchDefault,
                    ),
                    bn: batch_norm2d(&block / "bn", width),
                }
            })
            .collect();
        let classifier = linear(p / "classifier", width, classes);
        Self {
            blocks,
            classifier,
            dropout,
            dropout_rng: RefCell::new(Rng::new(0)),
            recorded_masks: RefCell::new(None),
        }
    }

    /// Keep every dropout mask drawn from now on (`true`), or stop and forget them.
    pub fn record_dropout(&self, on: bool) {
        *self.recorded_masks.borrow_mut() = on.then(Vec::new);
    }

    /// The masks drawn since the last call, in call order: one per Dropout2d call, B x C values
    /// (image-major), true where the channel was zeroed.
    pub fn take_dropout_masks(&self) -> Vec<Vec<bool>> {
        self.recorded_masks
            .borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Start the dropout masks from a known state (the trainer does so before every outer step).
    pub fn reseed_dropout(&self, rng: Rng) {
        *self.dropout_rng.borrow_mut() = rng;
    }

    /// Dropout2d: zero whole channels with probability p, scale the rest by 1 / (1 - p).
    fn channel_dropout(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let mut rng = self.dropout_rng.borrow_mut();
        let dropped: Vec<bool> = (0..s[0] * s[1])
            .map(|_| rng.unit() < self.dropout)
            .collect();
        // In f32, as PyTorch's `noise.div_(1 - p)` computes it (an f64 quotient rounded to f32
        // can differ in the last place for some p).
        let keep = 1.0f32 / (1.0 - self.dropout) as f32;
        let mask: Vec<f32> = dropped
            .iter()
            .map(|&d| if d { 0.0 } else { keep })
            .collect();
        if let Some(log) = self.recorded_masks.borrow_mut().as_mut() {
            log.push(dropped);
        }
        // In x's kind: an fp32 mask would promote bf16 activations back to fp32.
        x * Tensor::from_slice(&mask)
            .view([s[0], s[1], 1, 1])
            .to_device(x.device())
            .to_kind(x.kind())
    }

    /// `z`: B x D x rows x cols. Returns B x classes logits. `train` turns dropout on and, unless
    /// `frozen_bn`, makes BatchNorm use the batch's statistics.
    pub fn forward_t(&self, z: &Tensor, train: bool) -> Tensor {
        self.forward_with(z, train, false)
    }

    /// [`Head::forward_t`], with BatchNorm on its running statistics even in training when
    /// `frozen_bn` (`model.head_batch_norm: frozen`).
    pub fn forward_with(&self, z: &Tensor, train: bool, frozen_bn: bool) -> Tensor {
        let mut x = z.shallow_clone();
        for b in &self.blocks {
            // (BatchNorm2d falls back to the running statistics on one value per channel: a
            // batch of one image whose grid is down to 1 x 1.)
            x = x.apply(&b.conv).relu().apply_t(&b.bn, train && !frozen_bn);
            if train && self.dropout > 0.0 {
                x = self.channel_dropout(&x);
            }
        }
        x.adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
            .apply(&self.classifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_one_image_on_a_tiny_grid_keeps_the_running_statistics_finite() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let head = Head::new(&vs.root(), 4, 8, 2, HEAD_DROPOUT);
        let z = Tensor::arange(16, (tch::Kind::Float, tch::Device::Cpu)).view([1, 4, 2, 2]) / 16.0;
        let _ = head.forward_t(&z, true);
        for (name, t) in vs.variables() {
            assert!(
                t.isfinite().all().int64_value(&[]) == 1,
                "{name} is not finite after a training step"
            );
        }
        let logits = head.forward_t(&z, false);
        assert!(logits.isfinite().all().int64_value(&[]) == 1);
    }
}
