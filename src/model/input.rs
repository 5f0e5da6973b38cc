//! How decoded pixels become the backbone's input (`source.normalize`): x / 255, then
//! (x - mean) / std per channel, as torchvision's `Normalize` does after `ToTensor`. Pretrained
//! weights expect the statistics they were trained with (ImageNet's, for torchvision's), and
//! UltraMNIST trains best with MNIST's, as the reference code uses (docs/method.md, "Input
//! normalisation").

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// A named set of statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// mean 0.5, std 0.5 for every channel: pixels in [-1, 1] (the default).
    MinusOneToOne,
    /// MNIST's statistics, mean 0.1307 and std 0.3081, as the reference code normalises
    /// UltraMNIST: the black background maps to -0.42, near the 0 of the convolutions' zero
    /// padding, and strokes to 2.82. Every UltraMNIST pipeline uses it.
    Mnist,
    /// torchvision's ImageNet statistics (RGB): mean (0.485, 0.456, 0.406), std (0.229, 0.224,
    /// 0.225). Grey data is repeated to RGB before they apply.
    Imagenet,
}

/// `source.normalize`: a preset name, or `{mean: [...], std: [...]}` (one value for every
/// channel, or one per channel).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Normalization {
    Preset(Preset),
    Values { mean: Vec<f64>, std: Vec<f64> },
}

impl Default for Normalization {
    fn default() -> Self {
        Self::Preset(Preset::MinusOneToOne)
    }
}

impl Normalization {
    /// Per-channel (mean, std) on the [0, 1] scale.
    pub fn values(&self) -> (Vec<f64>, Vec<f64>) {
        match self {
            Self::Preset(Preset::MinusOneToOne) => (vec![0.5], vec![0.5]),
            Self::Preset(Preset::Mnist) => (vec![0.1307], vec![0.3081]),
            Self::Preset(Preset::Imagenet) => {
                (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
            }
            Self::Values { mean, std } => (mean.clone(), std.clone()),
        }
    }

    /// Channels the statistics name: 1 (applies to every channel) or their count.
    pub fn channels(&self) -> usize {
        self.values().0.len()
    }

    /// Why these statistics cannot apply to `data_channels` of data, if they cannot.
    pub fn check(&self, data_channels: usize) -> Result<(), String> {
        let (mean, std) = self.values();
        if mean.len() != std.len() || mean.is_empty() {
            return Err(format!(
                "has {} mean and {} std values; expected the same number, 1 or one per channel",
                mean.len(),
                std.len()
            ));
        }
        if let Some(s) = std.iter().find(|s| !(**s > 0.0) || !s.is_finite()) {
            return Err(format!("has std {s}; every std must be a positive number"));
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return Err(format!("has mean {m}; every mean must be a finite number"));
        }
        let n = mean.len();
        if n != 1 && n != data_channels && !(n == 3 && data_channels == 1) {
            return Err(format!(
                "has {n} channels of statistics for {data_channels}-channel data; expected 1 or {data_channels}"
            ));
        }
        Ok(())
    }

    /// Channels of the normalised input for `data_channels` of data: grey data becomes RGB
    /// when the statistics are RGB's.
    pub fn input_channels(&self, data_channels: i64) -> i64 {
        if self.channels() == 3 {
            3
        } else {
            data_channels
        }
    }

    /// u8 N x m x m x c (HWC) -> N x c' x m x m float, on the tensor's device, with the
    /// standard (NCHW) strides of a PyTorch batch.
    pub fn apply(&self, bytes: &Tensor) -> Tensor {
        nchw(self.normalise(bytes))
    }

    fn normalise(&self, bytes: &Tensor) -> Tensor {
        let x = bytes.permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let (mean, std) = self.values();
        let x = if mean.len() == 3 && x.size()[1] == 1 {
            x.expand([-1, 3, -1, -1], false)
        } else {
            x
        };
        let same = |v: &[f64]| v.iter().all(|a| *a == v[0]);
        if same(&mean) && same(&std) {
            // Scalars: x / (255 std) - mean / std, the operations (and the bits) the PyTorch
            // twin computes; with the default (0.5, 0.5) this is x / 127.5 - 1.
            return x
                .g_div_scalar(255.0 * std[0])
                .g_sub_scalar(mean[0] / std[0]);
        }
        let per_channel = |v: Vec<f32>| {
            Tensor::from_slice(&v)
                .view([1, -1, 1, 1])
                .to_device(x.device())
        };
        let scale = per_channel(std.iter().map(|s| (255.0 * s) as f32).collect());
        let shift = per_channel(mean.iter().zip(&std).map(|(m, s)| (m / s) as f32).collect());
        x / scale - shift
    }
}

/// The same values with standard NCHW strides. A tensor permuted from N x H x W x C has
/// channels-last strides; with one channel it even counts as contiguous (a size-1 dimension's
/// stride is ignored), so `contiguous()` keeps them. libtorch's convolutions read the strides
/// and pick their channels-last kernels, which round differently: at the demo's start a
/// backbone's outputs moved by up to 5e-5 and whole runs parted from PyTorch's, whose
/// DataLoader batches are plain NCHW (docs/parity.md, "The paired run").
fn nchw(x: Tensor) -> Tensor {
    let size = x.size();
    x.contiguous().view([-1]).view(size.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixels(values: &[u8], channels: i64) -> Tensor {
        Tensor::from_slice(values).view([1, 1, -1, channels])
    }

    #[test]
    fn input_has_the_standard_strides_of_a_pytorch_batch_whatever_the_channels() {
        for c in [1, 3] {
            let bytes = Tensor::zeros([2, 4, 4, c], (Kind::Uint8, tch::Device::Cpu));
            let x = Normalization::default().apply(&bytes);
            // N x C x H x W, contiguous: strides (C·H·W, H·W, W, 1). A one-channel tensor
            // permuted from HWC would have (16, 1, 4, 1), which libtorch's convolutions treat
            // as channels-last.
            assert_eq!(x.stride(), vec![c * 16, 16, 4, 1], "{c} channels");
        }
    }

    #[test]
    fn the_default_maps_0_and_255_to_minus_one_and_one_exactly() {
        let y = Normalization::default().apply(&pixels(&[0, 255, 51], 1));
        let y: Vec<f32> = Vec::try_from(y.flatten(0, -1)).unwrap();
        assert_eq!(y, vec![-1.0, 1.0, 51.0 / 127.5 - 1.0]);
    }

    #[test]
    fn mnist_maps_black_and_white_to_the_reference_codes_values() {
        let y = Normalization::Preset(Preset::Mnist).apply(&pixels(&[0, 255], 1));
        let y: Vec<f32> = Vec::try_from(y.flatten(0, -1)).unwrap();
        // torchvision: ToTensor (x / 255), then Normalize((0.1307,), (0.3081,)).
        let want = [-0.1307 / 0.3081, (1.0 - 0.1307) / 0.3081];
        for (g, w) in y.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{y:?} vs {want:?}");
        }
        let parsed: Normalization = serde_norway::from_str("mnist").unwrap();
        assert_eq!(parsed, Normalization::Preset(Preset::Mnist));
    }

    #[test]
    fn imagenet_normalises_each_channel_like_torchvision_and_repeats_grey() {
        let rgb = Normalization::Preset(Preset::Imagenet).apply(&pixels(&[255, 0, 128], 3));
        let got: Vec<f32> = Vec::try_from(rgb.flatten(0, -1)).unwrap();
        let want = [
            (1.0 - 0.485) / 0.229,
            (0.0 - 0.456) / 0.224,
            (128.0 / 255.0 - 0.406) / 0.225,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let grey = Normalization::Preset(Preset::Imagenet).apply(&pixels(&[255], 1));
        assert_eq!(grey.size(), vec![1, 3, 1, 1]);
        let got: Vec<f32> = Vec::try_from(grey.flatten(0, -1)).unwrap();
        assert!((got[2] as f64 - (1.0 - 0.406) / 0.225).abs() < 1e-5);
    }

    #[test]
    fn statistics_that_do_not_fit_the_data_are_refused_with_the_reason() {
        let two = Normalization::Values {
            mean: vec![0.5, 0.5],
            std: vec![0.5, 0.5],
        };
        assert!(two.check(3).unwrap_err().contains("2 channels"));
        let zero = Normalization::Values {
            mean: vec![0.5],
            std: vec![0.0],
        };
        assert!(zero.check(1).unwrap_err().contains("positive"));
        assert!(Normalization::Preset(Preset::Imagenet).check(1).is_ok());
        let parsed: Normalization = serde_norway::from_str("imagenet").unwrap();
        assert_eq!(parsed, Normalization::Preset(Preset::Imagenet));
        let parsed: Normalization = serde_norway::from_str("{mean: [0.1], std: [0.2]}").unwrap();
        assert_eq!(parsed.values(), (vec![0.1], vec![0.2]));
    }
}
