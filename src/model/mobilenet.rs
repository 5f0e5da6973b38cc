//! torchvision's MobileNetV2 trunk (`features` and the global average pool, width 1.0), with
//! torchvision's variable names (`features.0.0`, `features.3.conv.1.1`, …) and initialisation
//! (convs N(0, √2/√fan_out), BatchNorm 1 and 0). torchvision's `classifier` (Dropout + Linear to
//! 1000 classes) is replaced by the backbone's projection to D, as for the ResNets.

use tch::nn::{self, ModuleT};

use super::init::{Conv, ConvInit, conv2d};
use super::norm::batch_norm2d;

/// Features after the trunk.
pub const FEATURES: i64 = 1280;

/// torchvision's `Conv2dNormActivation`: conv (no bias) + BatchNorm + ReLU6, "same" padding.
fn conv_bn_relu6(p: nn::Path, shape: Conv) -> nn::SequentialT {
    nn::seq_t()
        .add(conv2d(&p / "0", shape, ConvInit::KaimingNormalFanOut))
        .add(batch_norm2d(&p / "1", shape.c_out))
        .add_fn(|x| x.relu6())
}

/// torchvision's `InvertedResidual`: expand (1x1, unless the ratio is 1), depthwise 3x3,
/// project (1x1, linear); a residual connection when the shape is kept.
fn inverted_residual(
    p: nn::Path,
    c_in: i64,
    c_out: i64,
    stride: i64,
    expand: i64,
) -> impl ModuleT + use<> {
    let hidden = c_in * expand;
    let p = &p / "conv";
    let mut seq = nn::seq_t();
    let mut i = 0;
    if expand != 1 {
        seq = seq.add(conv_bn_relu6(&p / i, Conv::new(c_in, hidden, 1)));
        i += 1;
    }
    let depthwise = Conv::new(hidden, hidden, 3).stride(stride).groups(hidden);
    seq = seq
        .add(conv_bn_relu6(&p / i, depthwise))
        .add(conv2d(
            &p / (i + 1),
            Conv::new(hidden, c_out, 1),
            ConvInit::KaimingNormalFanOut,
        ))
        .add(batch_norm2d(&p / (i + 2), c_out));
    let residual = stride == 1 && c_in == c_out;
    nn::func_t(move |x, train| {
        let y = x.apply_t(&seq, train);
        if residual { x + y } else { y }
    })
}

/// (expansion t, channels c, repeats n, first stride s), as in the paper and torchvision.
const SETTINGS: [(i64, i64, i64, i64); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// The trunk: RGB N x 3 x H x W -> N x 1280.
pub fn trunk(p: &nn::Path) -> nn::SequentialT {
    let f = p / "features";
    let mut c_in = 32;
    let mut seq = nn::seq_t().add(conv_bn_relu6(&f / 0, Conv::new(3, c_in, 3).stride(2)));
    let mut index = 1;
    for (t, c, n, s) in SETTINGS {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            seq = seq.add(inverted_residual(&f / index, c_in, c, stride, t));
            c_in = c;
            index += 1;
        }
    }
    seq.add(conv_bn_relu6(&f / index, Conv::new(c_in, FEATURES, 1)))
        .add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}
