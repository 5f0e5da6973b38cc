//! torchvision's ResNet-18 and ResNet-50 trunks (everything before `fc`), with torchvision's
//! variable names (`conv1`, `layer1.0.bn2`, `layer2.0.downsample.0`, …) and initialisation
//! (convs N(0, √2/√fan_out), BatchNorm 1 and 0, `zero_init_residual=False`), so that a
//! torchvision state dict's trunk tensors line up one to one.

use tch::nn::{self, ModuleT};

use super::init::{Conv, Conv2d, ConvInit, conv2d};
use super::norm::batch_norm2d;

fn conv(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> Conv2d {
    conv2d(
        p,
        Conv::new(c_in, c_out, kernel).stride(stride),
        ConvInit::KaimingNormalFanOut,
    )
}

/// conv1x1 + BatchNorm on the shortcut when the block changes shape.
fn downsample(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> Option<nn::SequentialT> {
    (stride != 1 || c_in != c_out).then(|| {
        nn::seq_t()
            .add(conv(&p / "0", c_in, c_out, 1, stride))
            .add(batch_norm2d(&p / "1", c_out))
    })
}

/// torchvision's `BasicBlock` (expansion 1).
fn basic_block(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> impl ModuleT + use<> {
    let conv1 = conv(&p / "conv1", c_in, c_out, 3, stride);
    let bn1 = batch_norm2d(&p / "bn1", c_out);
    let conv2 = conv(&p / "conv2", c_out, c_out, 3, 1);
    let bn2 = batch_norm2d(&p / "bn2", c_out);
    let shortcut = downsample(&p / "downsample", c_in, c_out, stride);
    nn::func_t(move |x, train| {
        let y = x
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .apply(&conv2)
            .apply_t(&bn2, train);
        let identity = match &shortcut {
            Some(s) => x.apply_t(s, train),
            None => x.shallow_clone(),
        };
        (identity + y).relu()
    })
}

/// torchvision's `Bottleneck` (expansion 4, stride on the 3x3 conv: "ResNet v1.5").
fn bottleneck(p: nn::Path, c_in: i64, width: i64, stride: i64) -> impl ModuleT + use<> {
    let c_out = width * 4;
    let conv1 = conv(&p / "conv1", c_in, width, 1, 1);
    let bn1 = batch_norm2d(&p / "bn1", width);
    let conv2 = conv(&p / "conv2", width, width, 3, stride);
    let bn2 = batch_norm2d(&p / "bn2", width);
    let conv3 = conv(&p / "conv3", width, c_out, 1, 1);
    let bn3 = batch_norm2d(&p / "bn3", c_out);
    let shortcut = downsample(&p / "downsample", c_in, c_out, stride);
    nn::func_t(move |x, train| {
        let y = x
            .apply(&conv1)
            .apply_t(&bn1, train)
            .relu()
            .apply(&conv2)
            .apply_t(&bn2, train)
            .relu()
            .apply(&conv3)
            .apply_t(&bn3, train);
        let identity = match &shortcut {
            Some(s) => x.apply_t(s, train),
            None => x.shallow_clone(),
        };
        (identity + y).relu()
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Depth {
    /// BasicBlocks 2-2-2-2, 512 features.
    R18,
    /// Bottlenecks 3-4-6-3, 2048 features.
    R50,
}

impl Depth {
    /// Width of the pooled feature vector.
    pub fn features(self) -> i64 {
        match self {
            Depth::R18 => 512,
            Depth::R50 => 2048,
        }
    }
}

/// The trunk: RGB N x 3 x H x W -> N x features (after global average pooling).
pub fn trunk(p: &nn::Path, depth: Depth) -> nn::SequentialT {
    let mut seq = nn::seq_t()
        .add(conv(p / "conv1", 3, 64, 7, 2))
        .add(batch_norm2d(p / "bn1", 64))
        .add_fn(|x| x.relu().max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false));
    let counts = match depth {
        Depth::R18 => [2, 2, 2, 2],
        Depth::R50 => [3, 4, 6, 3],
    };
    let mut c_in = 64;
    for (i, (&count, width)) in counts.iter().zip([64, 128, 256, 512]).enumerate() {
        let layer = p / format!("layer{}", i + 1);
        for b in 0..count {
            let stride = if i > 0 && b == 0 { 2 } else { 1 };
            let block = &layer / b.to_string();
            seq = match depth {
                Depth::R18 => seq.add(basic_block(block, c_in, width, stride)),
                Depth::R50 => seq.add(bottleneck(block, c_in, width, stride)),
            };
            c_in = match depth {
                Depth::R18 => width,
                Depth::R50 => width * 4,
            };
        }
    }
    seq.add_fn(|x| x.adaptive_avg_pool2d([1, 1]).flatten(1, -1))
}
