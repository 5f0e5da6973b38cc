//! The one BatchNorm every model uses: PyTorch's initial values, and no NaN from a batch that
//! holds one value per channel.
//!
//! Training-mode BatchNorm over one value per channel (one patch whose feature map is down to
//! 1 x 1, say a one-cell image alone in its mini-batch) has no variance: libtorch normalises it
//! to 0 and puts NaN into the running variance (the unbiased estimate divides by n - 1 = 0),
//! after which every prediction is NaN. PyTorch refuses such a batch ("Expected more than 1
//! value per channel when training"); a long run should not die of one odd image, so such a
//! call normalises with the running statistics instead and leaves them untouched.

use tch::Tensor;
use tch::nn::{self, ModuleT};

#[derive(Debug)]
pub struct BatchNorm2d {
    inner: nn::BatchNorm,
}

/// `nn.BatchNorm2d(channels)`: weight 1, bias 0, eps 1e-5, momentum 0.1 (tch's default
/// weight is U(0, 1)).
pub fn batch_norm2d(p: nn::Path, channels: i64) -> BatchNorm2d {
    let cfg = nn::BatchNormConfig {
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    BatchNorm2d {
        inner: nn::batch_norm2d(p, channels, cfg),
    }
}

/// Values per channel a BatchNorm sees in `x` (N x C x H x W): N * H * W.
fn values_per_channel(x: &Tensor) -> i64 {
    let s = x.size();
    s[0] * s[2..].iter().product::<i64>()
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        x.apply_t(&self.inner, train && values_per_channel(x) > 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn finite(t: &Tensor) -> bool {
        t.isfinite().all().int64_value(&[]) == 1
    }

    #[test]
    fn one_value_per_channel_uses_the_running_statistics_and_keeps_them_finite() {
        let vs = nn::VarStore::new(Device::Cpu);
        let bn = batch_norm2d(vs.root() / "bn", 3);
        let one = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).view([1, 3, 1, 1]);
        let y = bn.forward_t(&one, true);
        // Running statistics are still (0, 1): y = x / sqrt(1 + eps).
        assert!(y.allclose(&(&one / (1.0f64 + 1e-5).sqrt()), 1e-6, 1e-6, false));
        for (name, t) in vs.variables() {
            assert!(finite(&t), "{name} is not finite");
        }
        assert_eq!(
            Vec::<f32>::try_from(&bn.inner.running_var).unwrap(),
            vec![1.0; 3]
        );
        // Two values per channel train as usual: the running statistics move.
        let two = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 5.0, 6.0, 7.0]).view([2, 3, 1, 1]);
        let y = bn.forward_t(&two, true);
        assert!(y.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        let var: Vec<f32> = Vec::try_from(&bn.inner.running_var).unwrap();
        // unbiased var of (1, 5) = 8; 0.9 * 1 + 0.1 * 8 = 1.7
        assert!((var[0] - 1.7).abs() < 1e-5, "{var:?}");
    }
}
