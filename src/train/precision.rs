//! Mixed precision: fp16 autocast on CUDA with dynamic loss scaling, or bf16 compute copies of
//! the weights (CPU and CUDA) with fp32 master weights.
//!
//! tch 0.24 exposes libtorch's autocast switch but not its dtype, so autocast's mixed type is
//! CUDA's default, fp16; fp16 gradients underflow without loss scaling, hence [`LossScaler`]
//! (the scheme of PyTorch's `GradScaler`: scale the loss, unscale the gradients, skip a step
//! whose gradients are not finite and halve the scale, double it after a run of good steps).
//! bf16 cannot go through autocast, so the model casts its conv and linear weights itself
//! (`Model::set_precision`) and the optimizer updates fp32 masters of them; bf16 has fp32's
//! exponent range, so it needs no loss scaling. In both, master weights, BatchNorm and optimizer
//! moments stay fp32, and checkpoints hold fp32 weights.

use tch::{Kind, Tensor};

use crate::model::LoadError;
pub use crate::model::Precision;

/// Dynamic loss scale.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    /// Good optimizer steps since the scale last changed.
    pub good_steps: u64,
    pub growth_interval: u64,
    /// Optimizer steps skipped because a gradient was inf or NaN.
    pub skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            good_steps: 0,
            growth_interval: 2000,
            skipped: 0,
        }
    }
}

impl LossScaler {
    /// Divide every gradient by the scale; true when all of them are finite.
    pub fn unscale(&self, grads: &[Tensor]) -> bool {
        let mut finite = Vec::with_capacity(grads.len());
        tch::no_grad(|| {
            for g in grads {
                let mut g = g.shallow_clone();
                let _ = g.g_div_scalar_(self.scale);
                finite.push(g.isfinite().all());
            }
        });
        if finite.is_empty() {
            return true;
        }
        // One read for all parameters: a read per tensor would wait for the GPU each time.
        Tensor::stack(&finite, 0).all().int64_value(&[]) != 0
    }

    /// Record a step's outcome: halve on overflow, double after `growth_interval` good steps.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
        }
    }

    /// [scale, good_steps, skipped] as a tensor, for the optimizer's checkpoint state.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&[self.scale, self.good_steps as f64, self.skipped as f64])
    }

    /// The scaler [`LossScaler::to_tensor`] saved.
    pub fn from_tensor(t: &Tensor) -> Result<Self, LoadError> {
        let invalid = |reason: String| LoadError::Invalid {
            name: "scaler".into(),
            reason,
        };
        let v: Vec<f64> = Vec::try_from(t.to_kind(Kind::Double).view([-1]))
            .map_err(|e: tch::TchError| invalid(e.to_string()))?;
        match v.as_slice() {
            [scale, good, skipped] => Ok(Self {
                scale: *scale,
                good_steps: *good as u64,
                skipped: *skipped as u64,
                ..Self::default()
            }),
            _ => Err(invalid(format!("{} values, expected 3", v.len()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unscale_divides_and_detects_overflow() {
        let s = LossScaler {
            scale: 4.0,
            ..Default::default()
        };
        let g = Tensor::from_slice(&[8.0f32, -4.0]);
        assert!(s.unscale(&[g.shallow_clone()]));
        assert_eq!(Vec::<f32>::try_from(&g).unwrap(), vec![2.0, -1.0]);
        let bad = Tensor::from_slice(&[1.0f32, f32::INFINITY]);
        assert!(!s.unscale(&[g, bad]));
    }

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_a_run_of_good_steps() {
        let mut s = LossScaler {
            scale: 8.0,
            growth_interval: 3,
            ..Default::default()
        };
        s.update(false);
        assert_eq!((s.scale, s.skipped), (4.0, 1));
        for _ in 0..2 {
            s.update(true);
        }
        assert_eq!(s.scale, 4.0);
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (8.0, 0));
        let back = LossScaler::from_tensor(&s.to_tensor()).unwrap();
        assert_eq!((back.scale, back.good_steps, back.skipped), (8.0, 0, 1));
    }
}
