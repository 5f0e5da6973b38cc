//! Grid geometry: how an image of W x H pixels is cut into patches of m x m at stride s.
//!
//! `cols = ceil((W - m) / s) + 1` (likewise rows), so the grid covers the whole image; the
//! image is padded with zeros (black) on the right and bottom up to `(cols - 1) * s + m`.
//! Cell (r, c) is the patch whose top-left corner is at x = c * s, y = r * s.

use super::PatchError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub rows: usize,
    pub cols: usize,
    pub patch: usize,
    pub stride: usize,
}

impl Grid {
    pub fn new(
        width: usize,
        height: usize,
        patch: usize,
        stride: usize,
    ) -> Result<Self, PatchError> {
        if patch == 0 || stride == 0 {
            return Err(PatchError::Geometry(format!(
                "patch size {patch} and stride {stride} must be positive"
            )));
        }
        if width < patch || height < patch {
            return Err(PatchError::PatchLargerThanImage {
                width,
                height,
                patch,
            });
        }
        let cells = |extent: usize| (extent - patch).div_ceil(stride) + 1;
        Ok(Self {
            rows: cells(height),
            cols: cells(width),
            patch,
            stride,
        })
    }

    pub fn cells(&self) -> usize {
        self.rows * self.cols
    }

    /// Top-left pixel (x, y) of cell (row, col).
    pub fn origin(&self, row: usize, col: usize) -> (usize, usize) {
        (col * self.stride, row * self.stride)
    }

    /// Cell index in row-major order: the order of Z's flattened cells.
    pub fn index(&self, row: usize, col: usize) -> usize {
        row * self.cols + col
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_covers_image_and_pads() {
        let g = Grid::new(100, 64, 32, 32).unwrap();
        assert_eq!((g.rows, g.cols), (2, 4)); // 100 px need 4 columns: the last is padded
        let g = Grid::new(64, 64, 32, 16).unwrap();
        assert_eq!((g.rows, g.cols), (3, 3));
        assert!(matches!(
            Grid::new(31, 64, 32, 32),
            Err(PatchError::PatchLargerThanImage { .. })
        ));
    }
}
