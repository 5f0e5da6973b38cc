//! A small RGB picture of a whole image, for heatmaps to be laid over. For a TIFF pyramid it
//! comes from the coarsest level that is still at least [`THUMBNAIL_SIDE`] px on its longer
//! side, read by byte range a band of tiles at a time, so a gigapixel slide costs a few
//! megabytes, never its full resolution. A PNG or JPEG has one level and is decoded whole.

use super::decode::decode;
use super::segments::choose_level;
use super::stream::{HEAD_BYTES, failure};
use super::tiff::chunk::{Region, assemble_region, fetch_region};
use super::tiff::{TiffFile, is_tiff};
use super::{Failure, ImageEntry, StreamConfig};
use crate::storage::Location;

/// A thumbnail's longer side is at most this many pixels.
pub const THUMBNAIL_SIDE: usize = 768;

/// An RGB thumbnail, and the size of the level the patch grid was cut from (the thumbnail
/// shows all of it, so grid pixel x maps to `x * width / grid_width`).
#[derive(Clone, Debug)]
pub struct Thumbnail {
    pub width: usize,
    pub height: usize,
    /// `width * height * 3` bytes, RGB.
    pub pixels: Vec<u8>,
    pub grid_width: usize,
    pub grid_height: usize,
    /// Where it was read from, for the log: `TIFF level 3 (1024 x 768)`, `PNG`.
    pub source: String,
}

/// Box-filter shrinking by an integer factor, fed rows in order (a band at a time).
struct Shrinker {
    factor: usize,
    width: usize,
    out_width: usize,
    /// Sums and pixel counts of the output row being accumulated.
    sums: Vec<u32>,
    counts: Vec<u32>,
    rows_in: usize,
    out: Vec<u8>,
}

impl Shrinker {
    fn new(width: usize, factor: usize) -> Self {
        let out_width = width.div_ceil(factor);
        Self {
            factor,
            width,
            out_width,
            sums: vec![0; out_width * 3],
            counts: vec![0; out_width],
            rows_in: 0,
            out: Vec::new(),
        }
    }

    /// Add RGB rows of `width` pixels.
    fn push(&mut self, rows: &[u8]) {
        for row in rows.chunks_exact(self.width * 3) {
            for (x, px) in row.chunks_exact(3).enumerate() {
                let o = x / self.factor;
                for (sum, &v) in self.sums[o * 3..o * 3 + 3].iter_mut().zip(px) {
                    *sum += v as u32;
                }
                self.counts[o] += 1;
            }
            self.rows_in += 1;
            if self.rows_in.is_multiple_of(self.factor) {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        for o in 0..self.out_width {
            let n = self.counts[o].max(1);
            for k in 0..3 {
                self.out.push(((self.sums[o * 3 + k] + n / 2) / n) as u8);
            }
        }
        self.sums.fill(0);
        self.counts.fill(0);
    }

    /// The shrunk pixels and their height.
    fn finish(mut self) -> (Vec<u8>, usize) {
        if !self.rows_in.is_multiple_of(self.factor) {
            self.emit();
        }
        let height = self.out.len() / (self.out_width * 3);
        (self.out, height)
    }
}

/// The shrink factor that brings `width` x `height` within [`THUMBNAIL_SIDE`].
fn factor_for(width: usize, height: usize) -> usize {
    width.max(height).div_ceil(THUMBNAIL_SIDE).max(1)
}

/// The thumbnail of one listed image; the grid's level is chosen as the patch stream chooses
/// it (`config.level` or `config.target_mpp`). A failure names the image and says why.
pub async fn thumbnail(
    images: &Location,
    entry: &ImageEntry,
    config: &StreamConfig,
) -> Result<Thumbnail, Failure> {
    let head = images
        .get_range(&entry.path, 0..entry.size.min(HEAD_BYTES))
        .await
        .map_err(|e| failure(entry, "thumbnail", e.to_string()))?;
    if !is_tiff(&head) {
        let bytes = images
            .get(&entry.path)
            .await
            .map_err(|e| failure(entry, "thumbnail", e.to_string()))?;
        let decoded =
            decode(&bytes, 3, None).map_err(|e| failure(entry, "thumbnail", e.to_string()))?;
        let factor = factor_for(decoded.width, decoded.height);
        let mut shrink = Shrinker::new(decoded.width, factor);
        shrink.push(&decoded.pixels);
        let width = shrink.out_width;
        let (pixels, height) = shrink.finish();
        return Ok(Thumbnail {
            width,
            height,
            pixels,
            grid_width: decoded.width,
            grid_height: decoded.height,
            source: "the whole image (PNG or JPEG)".into(),
        });
    }
    let bad = |e: super::tiff::TiffError| failure(entry, "thumbnail", e.to_string());
    let file = TiffFile::open(images, &entry.path, entry.size, head)
        .await
        .map_err(bad)?;
    let (_, grid_dir) = choose_level(&file, entry, config)?;
    // The coarsest level still at least THUMBNAIL_SIDE on its longer side (levels run finest
    // first); the finest when even that is smaller.
    let level = (0..file.levels.len())
        .rev()
        .find(|&l| {
            let d = file.level(l).expect("a listed level");
            d.width.max(d.height) as usize >= THUMBNAIL_SIDE
        })
        .unwrap_or(0);
    let dir = file.level(level).map_err(bad)?;
    let (w, h) = (dir.width as usize, dir.height as usize);
    super::stream::check_declared_size(w, h, 3, false)
        .map_err(|m| failure(entry, "thumbnail", format!("level {level} {m}")))?;
    let mut shrink = Shrinker::new(w, factor_for(w, h));
    let band = dir.chunk_height as usize;
    for y in (0..h).step_by(band.max(1)) {
        let region = Region {
            x: 0,
            y,
            width: w,
            height: band.min(h - y),
        };
        let chunks = fetch_region(images, &file, level, region)
            .await
            .map_err(bad)?;
        let rows = assemble_region(dir, level, &chunks, region, 3).map_err(bad)?;
        shrink.push(&rows);
    }
    let width = shrink.out_width;
    let (pixels, height) = shrink.finish();
    Ok(Thumbnail {
        width,
        height,
        pixels,
        grid_width: grid_dir.width as usize,
        grid_height: grid_dir.height as usize,
        source: format!("TIFF level {level} ({w} x {h})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_averages_each_block_and_keeps_the_ragged_edge() {
        // 5 x 3 RGB, factor 2: blocks of 2 x 2, a last column and a last row of their own.
        let width = 5;
        let px: Vec<u8> = (0..15).flat_map(|i| [i as u8 * 10, 0, 255]).collect();
        let mut s = Shrinker::new(width, 2);
        s.push(&px[..width * 3]);
        s.push(&px[width * 3..]);
        let (out, height) = s.finish();
        assert_eq!((s_width(width, 2), height), (3, 2));
        // Top-left block: pixels 0, 1, 5, 6 -> mean of 0, 10, 50, 60 = 30.
        assert_eq!(&out[0..3], &[30, 0, 255]);
        // Top-right: pixels 4 and 9 (40, 90) -> 65.
        assert_eq!(out[6], 65);
        // Bottom-left: pixels 10, 11 (100, 110) -> 105; bottom-right: pixel 14 alone.
        assert_eq!(out[9], 105);
        assert_eq!(out[15], 140);
    }

    fn s_width(width: usize, factor: usize) -> usize {
        Shrinker::new(width, factor).out_width
    }

    #[test]
    fn the_factor_brings_the_longer_side_within_the_limit() {
        assert_eq!(factor_for(512, 512), 1);
        assert_eq!(factor_for(THUMBNAIL_SIDE + 1, 10), 2);
        assert_eq!(factor_for(100, 32768), 43);
        assert!(32768usize.div_ceil(43) <= THUMBNAIL_SIDE);
    }
}
