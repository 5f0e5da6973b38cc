//! The settings of a generated data set, in one place for both places they come from: a
//! pipeline file's `synth:` section and `patchgd synth ultramnist` flags (flags override the
//! file). Checked once, here.

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};

use super::ImageFormat;
use crate::source::tiff::write::TileCompression;

/// How `patchgd synth ultramnist` generates a data set (pipeline key `synth:`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthSpec {
    /// Where the data set goes: images under OUT/images, labels in OUT/labels.csv.
    pub out: String,
    /// Canvas side in pixels.
    pub size: u32,
    /// Number of classes: labels (digit sums) 0..classes-1.
    pub classes: u32,
    /// Training images.
    pub train: usize,
    /// Validation images.
    pub val: usize,
    /// Seed of the layouts (the same seed writes the same bytes).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `png`, or `tiff` (tiled pyramidal, for large canvases).
    #[serde(default = "default_format")]
    pub format: String,
    /// TIFF tile size.
    #[serde(default = "default_tile")]
    pub tile: u32,
    /// TIFF tile compression: jpeg, deflate, lzw or none.
    #[serde(default = "default_compression")]
    pub compression: String,
}

fn default_seed() -> u64 {
    42
}
fn default_format() -> String {
    "png".into()
}
fn default_tile() -> u32 {
    256
}
fn default_compression() -> String {
    "jpeg".into()
}

/// A setting of a [`SynthSpec`] that is missing or out of range.
#[derive(Debug, thiserror::Error)]
#[error("{key} {reason}")]
pub struct SynthError {
    /// The key without the `synth.` prefix (`classes`, `tile`, ...): the flag's name too.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// Settings given one by one (command-line flags) over an optional base (a pipeline file).
#[derive(Clone, Debug, Default)]
pub struct SynthOverrides {
    /// See [`SynthSpec::out`].
    pub out: Option<String>,
    /// See [`SynthSpec::size`].
    pub size: Option<u32>,
    /// See [`SynthSpec::classes`].
    pub classes: Option<u32>,
    /// See [`SynthSpec::train`].
    pub train: Option<usize>,
    /// See [`SynthSpec::val`].
    pub val: Option<usize>,
    /// See [`SynthSpec::seed`].
    pub seed: Option<u64>,
    /// See [`SynthSpec::format`].
    pub format: Option<String>,
    /// See [`SynthSpec::tile`].
    pub tile: Option<u32>,
    /// See [`SynthSpec::compression`].
    pub compression: Option<String>,
}

impl SynthOverrides {
    /// These settings over `base`; a key neither gives is an error naming it (`out`, `size`,
    /// `classes`, `train` and `val` have no default).
    pub fn over(self, base: Option<SynthSpec>) -> Result<SynthSpec, SynthError> {
        let required = |key: &'static str| SynthError {
            key,
            reason: "is required".into(),
        };
        let b = base.as_ref();
        let spec = SynthSpec {
            out: self
                .out
                .or(b.map(|b| b.out.clone()))
                .ok_or_else(|| required("out"))?,
            size: self
                .size
                .or(b.map(|b| b.size))
                .ok_or_else(|| required("size"))?,
            classes: self
                .classes
                .or(b.map(|b| b.classes))
                .ok_or_else(|| required("classes"))?,
            train: self
                .train
                .or(b.map(|b| b.train))
                .ok_or_else(|| required("train"))?,
            val: self
                .val
                .or(b.map(|b| b.val))
                .ok_or_else(|| required("val"))?,
            seed: self.seed.or(b.map(|b| b.seed)).unwrap_or_else(default_seed),
            format: self
                .format
                .or(b.map(|b| b.format.clone()))
                .unwrap_or_else(default_format),
            tile: self.tile.or(b.map(|b| b.tile)).unwrap_or_else(default_tile),
            compression: self
                .compression
                .or(b.map(|b| b.compression.clone()))
                .unwrap_or_else(default_compression),
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl SynthSpec {
    /// Every setting in range, or the first that is not.
    pub fn validate(&self) -> Result<(), SynthError> {
        self.image_format().map(|_| ())
    }

    /// The image format these settings describe, once they are checked.
    pub fn image_format(&self) -> Result<ImageFormat, SynthError> {
        let bad = |key: &'static str, reason: String| Err(SynthError { key, reason });
        if !(2..=46).contains(&self.classes) {
            let c = self.classes;
            return bad(
                "classes",
                format!("is {c}; allowed: 2 to 46 (sums of at most five digits)"),
            );
        }
        if self.size < 28 {
            return bad("size", format!("is {}; must be at least 28 px", self.size));
        }
        if self.tile < 16 || !self.tile.is_multiple_of(16) {
            return bad(
                "tile",
                format!("is {}; must be a multiple of 16 px", self.tile),
            );
        }
        let Some(compression) = TileCompression::parse(&self.compression) else {
            return bad(
                "compression",
                format!(
                    "is '{}'; allowed: jpeg, deflate, lzw, none",
                    self.compression
                ),
            );
        };
        match self.format.as_str() {
            "png" => Ok(ImageFormat::Png),
            "tiff" | "tif" => Ok(ImageFormat::Tiff {
                tile: self.tile,
                compression,
                bigtiff: false,
            }),
            other => bad("format", format!("is '{other}'; allowed: png, tiff")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> SynthSpec {
        SynthOverrides {
            out: Some("data/u".into()),
            size: Some(512),
            classes: Some(10),
            train: Some(8),
            val: Some(4),
            ..Default::default()
        }
        .over(None)
        .unwrap()
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let spec = SynthOverrides {
            size: Some(1024),
            format: Some("tiff".into()),
            ..Default::default()
        }
        .over(Some(base()))
        .unwrap();
        assert_eq!((spec.size, spec.classes, spec.seed), (1024, 10, 42));
        assert!(matches!(
            spec.image_format().unwrap(),
            ImageFormat::Tiff { tile: 256, .. }
        ));
    }

    #[test]
    fn a_missing_or_bad_setting_is_named() {
        let err = SynthOverrides::default().over(None).unwrap_err();
        assert_eq!(err.key, "out");
        for (overrides, key) in [
            (
                SynthOverrides {
                    classes: Some(47),
                    ..Default::default()
                },
                "classes",
            ),
            (
                SynthOverrides {
                    tile: Some(20),
                    ..Default::default()
                },
                "tile",
            ),
            (
                SynthOverrides {
                    format: Some("gif".into()),
                    ..Default::default()
                },
                "format",
            ),
            (
                SynthOverrides {
                    compression: Some("zstd".into()),
                    ..Default::default()
                },
                "compression",
            ),
            (
                SynthOverrides {
                    size: Some(27),
                    ..Default::default()
                },
                "size",
            ),
        ] {
            assert_eq!(overrides.over(Some(base())).unwrap_err().key, key);
        }
    }
}
