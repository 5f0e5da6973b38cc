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

/// A conv layer with its weights drawn as `init` says.
pub fn conv2d(p: nn::Path, shape: Conv, init: ConvInit) -> nn::Conv2D {
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
    nn::conv2d(p, shape.c_in, shape.c_out, shape.kernel, cfg)
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
