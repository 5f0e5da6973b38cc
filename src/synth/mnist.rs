//! Real MNIST digits from the standard IDX files, for the paper's recipe (`--mnist DIR`).
//! DIR holds `train-images-idx3-ubyte` and `train-labels-idx1-ubyte` (uncompressed).

use std::path::Path;

/// Digit images grouped by class: `by_digit[d]` holds 28 x 28 grey images of digit d.
#[derive(Debug)]
pub struct MnistDigits {
    pub rows: usize,
    pub cols: usize,
    pub by_digit: Vec<Vec<Vec<u8>>>,
}

/// Why MNIST digits could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum MnistError {
    #[error("cannot read MNIST file '{path}': {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("MNIST files{}: {reason}", dir.as_ref().map(|d| format!(" in '{d}'")).unwrap_or_default())]
    Invalid { dir: Option<String>, reason: String },
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl MnistDigits {
    pub fn load(dir: &Path) -> Result<Self, MnistError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| MnistError::Read { path, source })
        };
        let images = read("train-images-idx3-ubyte")?;
        let labels = read("train-labels-idx1-ubyte")?;
        Self::parse(&images, &labels).map_err(|e| match e {
            MnistError::Invalid { reason, .. } => MnistError::Invalid {
                dir: Some(dir.display().to_string()),
                reason,
            },
            other => other,
        })
    }

    /// The digits of an IDX3 images file and its IDX1 labels.
    pub fn parse(images: &[u8], labels: &[u8]) -> Result<Self, MnistError> {
        Self::parse_idx(images, labels).map_err(|reason| MnistError::Invalid { dir: None, reason })
    }

    fn parse_idx(images: &[u8], labels: &[u8]) -> Result<Self, String> {
        if images.len() < 16 || be_u32(images, 0) != 0x0000_0803 {
            return Err("train-images-idx3-ubyte: not an IDX3 u8 file (magic 0x00000803)".into());
        }
        if labels.len() < 8 || be_u32(labels, 0) != 0x0000_0801 {
            return Err("train-labels-idx1-ubyte: not an IDX1 u8 file (magic 0x00000801)".into());
        }
        let (n, rows, cols) = (
            be_u32(images, 4) as usize,
            be_u32(images, 8) as usize,
            be_u32(images, 12) as usize,
        );
        let pixels = n.checked_mul(rows).and_then(|p| p.checked_mul(cols));
        if be_u32(labels, 4) as usize != n
            || pixels.and_then(|p| p.checked_add(16)) != Some(images.len())
            || labels.len() != 8 + n
        {
            return Err(format!(
                "image and label files disagree or are truncated ({n} images of {rows} x {cols})"
            ));
        }
        let mut by_digit = vec![Vec::new(); 10];
        for i in 0..n {
            let d = labels[8 + i] as usize;
            if d > 9 {
                return Err(format!("label {d} at index {i} is not a digit"));
            }
            by_digit[d].push(images[16 + i * rows * cols..16 + (i + 1) * rows * cols].to_vec());
        }
        if let Some(d) = (0..10).find(|&d| by_digit[d].is_empty()) {
            return Err(format!("no sample of digit {d}"));
        }
        Ok(Self {
            rows,
            cols,
            by_digit,
        })
    }
}
