//! A window of decoded pixels, and cutting one patch out of it.

use super::grid::Grid;

/// Decoded pixels: interleaved (HWC) u8, the window of columns `left..left + width` and rows
/// `top..top + rows` of an image `image_width` x `image_height` (a whole PNG is one window at
/// (0, 0); a TIFF segment is a few patches of one grid row).
pub struct Raster<'a> {
    pub pixels: &'a [u8],
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub rows: usize,
    pub image_width: usize,
    pub image_height: usize,
    pub channels: usize,
}

impl<'a> Raster<'a> {
    pub fn whole(pixels: &'a [u8], width: usize, height: usize, channels: usize) -> Self {
        Self {
            pixels,
            left: 0,
            top: 0,
            width,
            rows: height,
            image_width: width,
            image_height: height,
            channels,
        }
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
