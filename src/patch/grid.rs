//! Grid geometry: how an image of W x H pixels is cut into patches of m x m at stride s.
//!
//! `cols = ceil((W - m) / s) + 1` (likewise rows), so the grid covers the whole image; the
//! image is padded with zeros (black) on the right and bottom up to `(cols - 1) * s + m`.
//! Cell (r, c) is the patch whose top-left corner is at x = c * s, y = r * s.

use super::PatchError;
use super::batch::Raster;

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

/// Copy patch (row, col) of `image` into `out`, zero-padding outside the image. The raster's
/// window must cover the patch's part of the image.
pub fn copy_patch(image: &Raster, grid: &Grid, row: usize, col: usize, out: &mut Vec<u8>) {
    let (m, ch) = (grid.patch, image.channels);
    let (x0, y0) = grid.origin(row, col);
    let start = out.len();
    out.resize(start + m * m * ch, 0);
    let inside_w = image.image_width.saturating_sub(x0).min(m);
    debug_assert!(x0 >= image.left && x0 + inside_w <= image.left + image.width);
    for dy in 0..m {
        let y = y0 + dy;
        if y < image.top {
            continue;
        }
        if y >= image.image_height || y >= image.top + image.rows {
            break;
        }
        let src = ((y - image.top) * image.width + x0 - image.left) * ch;
        let dst = start + dy * m * ch;
        out[dst..dst + inside_w * ch].copy_from_slice(&image.pixels[src..src + inside_w * ch]);
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

    #[test]
    fn copy_patch_takes_the_right_pixels_and_pads_with_zero() {
        // 3 x 2 grey image, values = index + 1; 2 x 2 patches at stride 2 -> 2 cols x 1 row.
        let px: Vec<u8> = (1..=6).collect();
        let g = Grid::new(3, 2, 2, 2).unwrap();
        assert_eq!((g.rows, g.cols), (1, 2));
        let mut out = Vec::new();
        let img = Raster::whole(&px, 3, 2, 1);
        copy_patch(&img, &g, 0, 1, &mut out);
        assert_eq!(out, vec![3, 0, 6, 0]);
        out.clear();
        copy_patch(&img, &g, 0, 0, &mut out);
        assert_eq!(out, vec![1, 2, 4, 5]);
    }
}
