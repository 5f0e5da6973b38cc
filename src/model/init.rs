//! Layer constructors that start where PyTorch starts.
//!
//! tch's `nn` defaults are not PyTorch's: tch draws conv and linear weights Kaiming-uniform with
//! ReLU gain (bound √6/√fan_in, 2.45× PyTorch's), conv biases as 0, and BatchNorm weights
//! uniform in [0, 1]. In front of a BatchNorm, weights 2.45× too large act like a ~6× smaller
//! learning rate, and the port learned measurably slower than PyTorch (docs/parity.md). Every
//! layer of every model is therefore built here, with the distribution PyTorch (or torchvision,
//! for its backbones) gives it:
//!
//! | layer | weight | bias |
//! |---|---|---|
//! | `nn.Conv2d`, `nn.Linear` (PyTorch default) | U(±1/√fan_in) | U(±1/√fan_in) |
//! | torchvision ResNet / MobileNetV2 conv | N(0, √(2/fan_out)) | none (0 for MobileNetV2) |
//! | `nn.BatchNorm2d` | 1 | 0 |
//!
//! fan_in = in_channels / groups × k × k, fan_out = out_channels × k × k, as PyTorch computes
//! them from the weight's shape.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// How a conv layer's weight is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvInit {
    /// PyTorch's `nn.Conv2d` default: `kaiming_uniform_(a=√5)`, i.e. U(±1/√fan_in); the bias,
    /// if any, U(±1/√fan_in) too.
    TorchDefault,
    /// torchvision's ResNet and MobileNetV2: `kaiming_normal_(mode="fan_out")` with ReLU gain,
    /// N(0, √2/√fan_out); the bias, if any, 0.
    KaimingNormalFanOut,
}

/// U(±1/√fan_in): what `kaiming_uniform_(a=√5)` comes to (gain √(1/3), bound √3·gain/√fan).
const TORCH_DEFAULT_WEIGHT: Init = Init::Kaiming {
    dist: nn::init::NormalOrUniform::Uniform,
    fan: nn::init::FanInOut::FanIn,
    non_linearity: nn::init::NonLinearity::ExplicitGain(0.577_350_269_189_625_8),
};

const KAIMING_NORMAL_FAN_OUT: Init = Init::Kaiming {
    dist: nn::init::NormalOrUniform::Normal,
    fan: nn::init::FanInOut::FanOut,
    non_linearity: nn::init::NonLinearity::ReLU,
};

fn uniform_bias(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Shape of a square conv: what every conv in our models is.
#[derive(Clone, Copy, Debug)]
pub struct Conv {
    pub c_in: i64,
    pub c_out: i64,
    pub kernel: i64,
    pub stride: i64,
    pub padding: i64,
    pub groups: i64,
    pub bias: bool,
}

impl Conv {
    /// A k x k conv with "same" padding, stride 1, no groups, no bias.
    pub fn new(c_in: i64, c_out: i64, kernel: i64) -> Self {
        Self {
            c_in,
            c_out,
            kernel,
            stride: 1,
            padding: (kernel - 1) / 2,
            groups: 1,
            bias: false,
        }
    }
    pub fn stride(self, stride: i64) -> Self {
        Self { stride, ..self }
    }
    pub fn groups(self, groups: i64) -> Self {
        Self { groups, ..self }
    }
    pub fn bias(self) -> Self {
        Self { bias: true, ..self }
    }
    pub fn padding(self, padding: i64) -> Self {
        Self { padding, ..self }
    }
}

/// A conv layer: tch's `nn::Conv2D`, except for the one input shape that oneDNN's bf16 kernels
/// get wrong.
///
/// On some CPUs with native bf16 (measured: an AMD EPYC with AVX-512 BF16, libtorch 2.11), the
/// backward pass of a bf16 convolution with a kernel wider than 1 and stride > 1, over an input
/// one pixel wide, returns garbage weight gradients: NaN in about one call in ten, otherwise
/// values up to 1e37 (every other shape agrees with libtorch's own kernels to bf16 rounding).
/// PatchGD meets that shape whenever a feature map shrinks to one pixel before a stride-2 conv:
/// the head on small grids, a ResNet's last stage on small patches. Such a conv runs in fp32
/// (cast in, cast back), which costs nothing at that size; everything else is tch's conv.
#[derive(Debug)]
pub struct Conv2d {
    inner: nn::Conv2D,
    stride: i64,
    padding: i64,
    groups: i64,
    kernel: i64,
}

impl Conv2d {
    /// Whether `x` has the shape oneDNN's bf16 backward gets wrong (see the type's comment).
    fn needs_f32(&self, x: &Tensor) -> bool {
        if x.kind() != Kind::BFloat16 || self.stride == 1 || self.kernel == 1 {
            return false;
        }
        let size = x.size();
        size.len() == 4 && (size[2] == 1 || size[3] == 1)
    }
}

impl nn::Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Tensor {
        if !self.needs_f32(x) {
            return self.inner.forward(x);
        }
        let c = &self.inner;
        x.to_kind(Kind::Float)
            .conv2d(
                &c.ws.to_kind(Kind::Float),
                c.bs.as_ref().map(|b| b.to_kind(Kind::Float)),
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                self.groups,
            )
            .to_kind(Kind::BFloat16)
    }
}

/// A conv layer with its weights drawn as `init` says.
pub fn conv2d(p: nn::Path, shape: Conv, init: ConvInit) -> Conv2d {
    let fan_in = shape.c_in / shape.groups * shape.kernel * shape.kernel;
    let (ws_init, bs_init) = match init {
        ConvInit::TorchDefault => (TORCH_DEFAULT_WEIGHT, uniform_bias(fan_in)),
        ConvInit::KaimingNormalFanOut => (KAIMING_NORMAL_FAN_OUT, Init::Const(0.0)),
    };
    let cfg = nn::ConvConfig {
        stride: shape.stride,
        padding: shape.padding,
        groups: shape.groups,
        bias: shape.bias,
        ws_init,
        bs_init,
        ..Default::default()
    };
    Conv2d {
        inner: nn::conv2d(p, shape.c_in, shape.c_out, shape.kernel, cfg),
        stride: shape.stride,
        padding: shape.padding,
        groups: shape.groups,
        kernel: shape.kernel,
    }
}

/// `nn.Linear` as PyTorch initialises it: weight and bias U(±1/√in).
pub fn linear(p: nn::Path, c_in: i64, c_out: i64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: TORCH_DEFAULT_WEIGHT,
        bs_init: Some(uniform_bias(c_in)),
        bias: true,
    };
    nn::linear(p, c_in, c_out, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Module;

    /// A bf16 conv's weight gradient over inputs one pixel wide or high, stride 2, against the
    /// same conv in fp32 (libtorch's CPU fp32 kernels are right on every CPU): within bf16
    /// rounding, on every repetition. On a CPU whose oneDNN bf16 kernel has the bug [`Conv2d`]
    /// routes around, the plain bf16 path fails this within a few repetitions.
    #[test]
    fn a_bf16_conv_over_a_one_pixel_wide_input_has_the_fp32_gradient_to_rounding() {
        let layer = |bf16: bool| {
            tch::manual_seed(3);
            let mut vs = nn::VarStore::new(tch::Device::Cpu);
            let conv = conv2d(
                vs.root() / "c",
                Conv::new(16, 16, 3).stride(2).bias(),
                ConvInit::TorchDefault,
            );
            if bf16 {
                vs.bfloat16();
            }
            (vs, conv)
        };
        let ((_a, exact), (_b, half)) = (layer(false), layer(true));
        tch::manual_seed(4);
        for (h, w) in [(1, 1), (2, 1), (3, 1), (1, 3)] {
            for _ in 0..30 {
                let x = Tensor::randn([8, 16, h, w], (Kind::Float, tch::Device::Cpu));
                let y = exact.forward(&x);
                let dy = Tensor::randn(y.size().as_slice(), (Kind::Float, tch::Device::Cpu));
                (y * &dy).sum(Kind::Float).backward();
                let y = half.forward(&x.to_kind(Kind::BFloat16));
                (y * dy.to_kind(Kind::BFloat16)).sum(Kind::Float).backward();
                let want = exact.inner.ws.grad();
                let got = half.inner.ws.grad().to_kind(Kind::Float);
                let scale = want.abs().max().double_value(&[]);
                let err = (&got - &want).abs().max().double_value(&[]);
                assert!(
                    err.is_finite() && err <= 0.05 * scale,
                    "{h} x {w}: bf16 weight gradient off by {err:e} (scale {scale:e})"
                );
                let _ = exact.inner.ws.grad().zero_();
                let _ = half.inner.ws.grad().zero_();
            }
        }
    }
}
