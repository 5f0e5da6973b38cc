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

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl MnistDigits {
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map_err(|e| format!("cannot read MNIST file '{}': {e}", path.display()))
        };
        let images = read("train-images-idx3-ubyte")?;
        let labels = read("train-labels-idx1-ubyte")?;
        Self::parse(&images, &labels)
            .map_err(|e| format!("MNIST files in '{}': {e}", dir.display()))
    }

    pub fn parse(images: &[u8], labels: &[u8]) -> Result<Self, String> {
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
        if be_u32(labels, 4) as usize != n
            || images.len() != 16 + n * rows * cols
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
