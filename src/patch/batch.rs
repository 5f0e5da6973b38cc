//! Patch rows as Arrow: one `RecordBatch` per band (one grid row) of one image, so a large image
//! streams band by band; and the assembler that turns bands back into whole patch grids.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    Array, BinaryArray, Float32Array, Int64Array, StringArray, UInt8Array, UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::PatchError;
use super::grid::{Grid, copy_patch};
use super::spool::{PatchPixels, Spool, SpoolPolicy};

static PATCH_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("label", DataType::Int64, true),
        Field::new("split", DataType::Utf8, true),
        Field::new("row", DataType::UInt32, false),
        Field::new("col", DataType::UInt32, false),
        Field::new("x", DataType::UInt32, false),
        Field::new("y", DataType::UInt32, false),
        Field::new("level", DataType::UInt32, false),
        Field::new("grid_rows", DataType::UInt32, false),
        Field::new("grid_cols", DataType::UInt32, false),
        Field::new("size", DataType::UInt32, false),
        Field::new("channels", DataType::UInt8, false),
        Field::new("mean", DataType::Float32, true),
        Field::new("std", DataType::Float32, true),
        Field::new("fg_fraction", DataType::Float32, true),
        Field::new("pixels", DataType::Binary, true),
    ]))
});

/// The schema of every patch batch (documented in schemas/patches.md).
pub fn patch_schema() -> SchemaRef {
    PATCH_SCHEMA.clone()
}

/// What a patch batch says about the image it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageKey {
    pub image_id: String,
    pub label: Option<i64>,
    pub split: Option<String>,
}

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

/// Which pixels count as foreground: those on the far side of `threshold` from the background
/// (grey level, the mean of the channels). Slides have a light background (glass); UltraMNIST a
/// dark one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Foreground {
    pub threshold: u8,
    pub light_background: bool,
    /// Patches whose foreground fraction is below this keep their metadata row but not their
    /// pixels (null): they are neither buffered nor encoded; their latent cells stay zero.
    pub min_fraction: f32,
}

impl Default for Foreground {
    fn default() -> Self {
        Self {
            threshold: 220,
            light_background: true,
            min_fraction: 0.0,
        }
    }
}

/// Mean and standard deviation of every sample, and the foreground fraction of the pixels, over
/// the part of the patch inside the image (`valid_w` x `valid_h`; zero padding is not counted).
/// A pixel's grey level is the integer mean of its channels; the comparison is done on the
/// channel sum (no division per pixel: this runs over every decoded pixel).
pub fn patch_stats(
    patch: &[u8],
    m: usize,
    channels: usize,
    valid_w: usize,
    valid_h: usize,
    fg: &Foreground,
) -> (f32, f32, f32) {
    let ch = channels as u32;
    let t = fg.threshold as u32;
    // light: floor(sum / ch) < t  <=>  sum < t * ch
    // dark:  floor(sum / ch) > t  <=>  sum >= (t + 1) * ch
    let (light, limit) = if fg.light_background {
        (true, t * ch)
    } else {
        (false, (t + 1) * ch)
    };
    let (mut sum, mut sq, mut fg_pixels) = (0u64, 0u64, 0u64);
    for y in 0..valid_h {
        let row = &patch[y * m * channels..(y * m + valid_w) * channels];
        // Per-row u32 sums cannot overflow: 255^2 x 66,000 samples < 2^32.
        debug_assert!(row.len() <= 66_000);
        // Wrapping arithmetic: no overflow-check branches in the dev profile, so it vectorises.
        let (mut s, mut q) = (0u32, 0u32);
        for &v in row {
            let v = v as u32;
            s = s.wrapping_add(v);
            q = q.wrapping_add(v.wrapping_mul(v));
        }
        sum += s as u64;
        sq += q as u64;
        let mut count = 0u32;
        let hit = |s: u32| (if light { s < limit } else { s >= limit }) as u32;
        match channels {
            1 => {
                for &v in row {
                    count = count.wrapping_add(hit(v as u32));
                }
            }
            3 => {
                for px in row.chunks_exact(3) {
                    let s = (px[0] as u32)
                        .wrapping_add(px[1] as u32)
                        .wrapping_add(px[2] as u32);
                    count = count.wrapping_add(hit(s));
                }
            }
            _ => {
                for px in row.chunks_exact(channels) {
                    let s = px.iter().fold(0u32, |a, &v| a.wrapping_add(v as u32));
                    count = count.wrapping_add(hit(s));
                }
            }
        }
        fg_pixels += count as u64;
    }
    let pixels = (valid_w * valid_h) as f64;
    if pixels == 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let n = pixels * channels as f64;
    let mean = sum as f64 / n;
    let var = (sq as f64 / n - mean * mean).max(0.0);
    (
        mean as f32,
        var.sqrt() as f32,
        (fg_pixels as f64 / pixels) as f32,
    )
}

/// The batch of grid row `row`: one Arrow row per patch (r, 0..cols), with statistics; patches
/// below `fg.min_fraction` carry null pixels.
pub fn band_batch(
    key: &ImageKey,
    grid: &Grid,
    row: usize,
    image: &Raster,
    level: u32,
    fg: &Foreground,
) -> RecordBatch {
    let cut = Cut {
        level,
        channels: image.channels,
        foreground: *fg,
        pixels: true,
        selected: None,
    };
    segment_batch(key, grid, row, 0..grid.cols, Some(image), &cut)
}

/// How patches are cut from a raster: which level they come from, the foreground filter, and
/// which cells keep their pixels.
#[derive(Clone, Copy, Debug)]
pub struct Cut<'a> {
    pub level: u32,
    /// Channels of the patches (also stated by geometry-only rows).
    pub channels: usize,
    pub foreground: Foreground,
    /// Keep pixels at all (false when a query needs only statistics).
    pub pixels: bool,
    /// Per grid cell (row-major): false cells get null pixels. `None` selects every cell.
    pub selected: Option<&'a [bool]>,
}

/// The batch of patches (row, cols) — a segment of one grid row — cut from a raster that covers
/// them. Without a raster (nothing of it was read) the rows carry geometry only: statistics and
/// pixels are null.
pub fn segment_batch(
    key: &ImageKey,
    grid: &Grid,
    row: usize,
    cols: std::ops::Range<usize>,
    image: Option<&Raster>,
    cut: &Cut,
) -> RecordBatch {
    let first = cols.start;
    let n = cols.len();
    let m = grid.patch;
    let channels = cut.channels;
    let patch_bytes = m * m * channels;
    // Patches are cut straight into the Arrow value buffer (no copy per patch); a filtered
    // patch's bytes are truncated away again and its row is null.
    let mut values: Vec<u8> = Vec::with_capacity(if cut.pixels { n * patch_bytes } else { 0 });
    let mut offsets: Vec<i32> = Vec::with_capacity(n + 1);
    let mut valid = Vec::with_capacity(n);
    offsets.push(0);
    let (mut means, mut stds, mut fgs) = (Vec::new(), Vec::new(), Vec::new());
    let mut scratch = Vec::new();
    for col in cols {
        let Some(image) = image else {
            valid.push(false);
            offsets.push(0);
            continue;
        };
        let start = values.len();
        let buf = if cut.pixels {
            &mut values
        } else {
            &mut scratch
        };
        let start_in_buf = if cut.pixels { start } else { 0 };
        buf.truncate(start_in_buf);
        copy_patch(image, grid, row, col, buf);
        let (x0, y0) = grid.origin(row, col);
        let valid_w = image.image_width.saturating_sub(x0).min(m);
        let valid_h = image.image_height.saturating_sub(y0).min(m);
        let (mean, std, f) = patch_stats(
            &buf[start_in_buf..],
            m,
            image.channels,
            valid_w,
            valid_h,
            &cut.foreground,
        );
        means.push(mean);
        stds.push(std);
        fgs.push(f);
        let selected = cut.selected.is_none_or(|s| s[grid.index(row, col)]);
        let keep = cut.pixels && selected && f >= cut.foreground.min_fraction;
        if !keep {
            values.truncate(start);
        }
        valid.push(keep);
        offsets.push(i32::try_from(values.len()).expect("a patch batch holds under 2 GiB"));
    }
    let pixels = BinaryArray::new(
        arrow::buffer::OffsetBuffer::new(offsets.into()),
        values.into(),
        (!valid.iter().all(|&v| v)).then(|| arrow::buffer::NullBuffer::from(valid)),
    );
    let stat = |v: Vec<f32>| -> Arc<dyn Array> {
        if image.is_some() {
            Arc::new(Float32Array::from(v))
        } else {
            Arc::new(Float32Array::new_null(n))
        }
    };
    let u32s = |f: &dyn Fn(usize) -> usize| {
        Arc::new(UInt32Array::from_iter_values((0..n).map(|c| f(c) as u32)))
    };
    let columns: Vec<Arc<dyn Array>> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            &key.image_id,
            n,
        ))),
        Arc::new(Int64Array::from(vec![key.label; n])),
        Arc::new(StringArray::from(vec![key.split.as_deref(); n])),
        u32s(&|_| row),
        u32s(&|c| first + c),
        u32s(&|c| grid.origin(row, first + c).0),
        u32s(&|c| grid.origin(row, first + c).1),
        u32s(&|_| cut.level as usize),
        u32s(&|_| grid.rows),
        u32s(&|_| grid.cols),
        u32s(&|_| grid.patch),
        Arc::new(UInt8Array::from(vec![channels as u8; n])),
        stat(means),
        stat(stds),
        stat(fgs),
        Arc::new(pixels),
    ];
    RecordBatch::try_new(patch_schema(), columns).expect("band batch matches the patch schema")
}

/// All patches of one image, in row-major cell order: cell (r, c) at index r * cols + c.
#[derive(Clone, Debug)]
pub struct ImagePatches {
    pub key: ImageKey,
    pub grid_rows: usize,
    pub grid_cols: usize,
    pub patch: usize,
    pub channels: usize,
    /// cells x patch x patch x channels bytes (HWC per cell); zero for absent cells. In memory,
    /// or in a spool file when the image is larger than the assembler's spool threshold.
    pub pixels: PatchPixels,
    /// Cells whose pixels arrived; false where the foreground filter dropped them.
    pub present: Vec<bool>,
}

impl ImagePatches {
    pub fn cells(&self) -> usize {
        self.grid_rows * self.grid_cols
    }

    pub fn all_present(&self) -> bool {
        self.present.iter().all(|&p| p)
    }

    pub fn patch_bytes(&self) -> usize {
        self.patch * self.patch * self.channels
    }
}

struct Partial {
    image: ImagePatches,
    seen: Vec<bool>,
    remaining: usize,
}

/// Collects patch batches (in any order, interleaved across images) into whole images.
#[derive(Default)]
pub struct ImageAssembler {
    partial: HashMap<String, Partial>,
    spool: SpoolPolicy,
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T, PatchError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            PatchError::Malformed(format!("column '{name}' is missing or has the wrong type"))
        })
}

impl ImageAssembler {
    /// An assembler that spools images larger than `policy.above_bytes` to temporary files.
    pub fn with_spool(policy: SpoolPolicy) -> Self {
        Self {
            partial: HashMap::new(),
            spool: policy,
        }
    }

    /// Adds a batch; returns the images it completed.
    pub fn push(&mut self, batch: &RecordBatch) -> Result<Vec<ImagePatches>, PatchError> {
        let ids = column::<StringArray>(batch, "image_id")?;
        let labels = column::<Int64Array>(batch, "label")?;
        let splits = column::<StringArray>(batch, "split")?;
        let rows = column::<UInt32Array>(batch, "row")?;
        let cols = column::<UInt32Array>(batch, "col")?;
        let grid_rows = column::<UInt32Array>(batch, "grid_rows")?;
        let grid_cols = column::<UInt32Array>(batch, "grid_cols")?;
        let sizes = column::<UInt32Array>(batch, "size")?;
        let channels = column::<UInt8Array>(batch, "channels")?;
        let pixels = column::<BinaryArray>(batch, "pixels")?;
        let mut done = Vec::new();
        for i in 0..batch.num_rows() {
            let id = ids.value(i);
            let (gr, gc, m, ch) = (
                grid_rows.value(i) as usize,
                grid_cols.value(i) as usize,
                sizes.value(i) as usize,
                channels.value(i) as usize,
            );
            let patch_bytes = m * m * ch;
            if !self.partial.contains_key(id) {
                let cells = gr * gc;
                let pixels = if cells * patch_bytes > self.spool.above_bytes {
                    let spool = Spool::new(cells, patch_bytes).map_err(|e| {
                        PatchError::Spool(format!(
                            "image '{id}' ({} MiB of patches): {e}",
                            (cells * patch_bytes) >> 20
                        ))
                    })?;
                    PatchPixels::Spooled(spool)
                } else {
                    PatchPixels::Memory(vec![0; cells * patch_bytes])
                };
                let image = ImagePatches {
                    key: ImageKey {
                        image_id: id.to_string(),
                        label: labels.is_valid(i).then(|| labels.value(i)),
                        split: splits.is_valid(i).then(|| splits.value(i).to_string()),
                    },
                    grid_rows: gr,
                    grid_cols: gc,
                    patch: m,
                    channels: ch,
                    pixels,
                    present: vec![false; cells],
                };
                let partial = Partial {
                    image,
                    seen: vec![false; cells],
                    remaining: cells,
                };
                self.partial.insert(id.to_string(), partial);
            }
            let entry = self.partial.get_mut(id).expect("inserted above");
            let (r, c) = (rows.value(i) as usize, cols.value(i) as usize);
            let img = &entry.image;
            if (img.grid_rows, img.grid_cols, img.patch, img.channels) != (gr, gc, m, ch)
                || r >= gr
                || c >= gc
            {
                return Err(PatchError::Malformed(format!(
                    "patch ({r}, {c}) of image '{id}' does not fit its grid"
                )));
            }
            let cell = r * gc + c;
            if pixels.is_valid(i) {
                let value = pixels.value(i);
                if value.len() != patch_bytes {
                    return Err(PatchError::Malformed(format!(
                        "patch ({r}, {c}) of image '{id}' has {} bytes, expected {patch_bytes}",
                        value.len()
                    )));
                }
                match &mut entry.image.pixels {
                    PatchPixels::Memory(v) => {
                        v[cell * patch_bytes..(cell + 1) * patch_bytes].copy_from_slice(value)
                    }
                    PatchPixels::Spooled(s) => s.write_cell(cell, value).map_err(|e| {
                        PatchError::Spool(format!("image '{id}', patch ({r}, {c}): {e}"))
                    })?,
                }
                entry.image.present[cell] = true;
            }
            if !std::mem::replace(&mut entry.seen[cell], true) {
                entry.remaining -= 1;
            }
            if entry.remaining == 0 {
                done.push(self.partial.remove(id).unwrap().image);
            }
        }
        Ok(done)
    }

    /// Forget an image's partial patches (its source failed after some bands arrived).
    pub fn discard(&mut self, image_id: &str) {
        self.partial.remove(image_id);
    }

    /// Images that started but never completed (a source that stopped mid-image).
    pub fn incomplete(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.partial.keys().cloned().collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_reassemble_into_the_cells_they_came_from() {
        // 4 x 4 grey image cut into 2 x 2 patches: 2 x 2 grid; pixel value = y * 4 + x.
        let px: Vec<u8> = (0..16).collect();
        let img = Raster::whole(&px, 4, 4, 1);
        let grid = Grid::new(4, 4, 2, 2).unwrap();
        let key = ImageKey {
            image_id: "a/b".into(),
            label: Some(3),
            split: Some("train".into()),
        };
        let b1 = band_batch(&key, &grid, 1, &img, 0, &Foreground::default());
        let b0 = band_batch(&key, &grid, 0, &img, 0, &Foreground::default());
        assert_eq!(b0.num_rows(), 2);
        let mut asm = ImageAssembler::default();
        assert!(asm.push(&b1).unwrap().is_empty());
        assert_eq!(asm.incomplete(), vec!["a/b".to_string()]);
        let done = asm.push(&b0).unwrap();
        assert_eq!(done.len(), 1);
        let im = &done[0];
        assert_eq!(im.key, key);
        // cell (1, 0) is the bottom-left patch: pixels (0,2),(1,2),(0,3),(1,3) -> 8, 9, 12, 13
        assert_eq!(&im.pixels.memory().unwrap()[2 * 4..3 * 4], &[8, 9, 12, 13]);
        assert_eq!(&im.pixels.memory().unwrap()[4..8], &[2, 3, 6, 7]);
        assert!(asm.incomplete().is_empty());
    }

    #[test]
    fn an_image_above_the_spool_threshold_is_spooled_with_the_same_cells() {
        let px: Vec<u8> = (0..16).collect();
        let img = Raster::whole(&px, 4, 4, 1);
        let grid = Grid::new(4, 4, 2, 2).unwrap();
        let key = ImageKey {
            image_id: "s".into(),
            label: Some(0),
            split: None,
        };
        // 4 cells of 4 bytes = 16 bytes: a threshold of 15 spools it, 16 keeps it in memory.
        for (above, spooled) in [(15, true), (16, false)] {
            let mut asm = ImageAssembler::with_spool(SpoolPolicy { above_bytes: above });
            asm.push(&band_batch(&key, &grid, 0, &img, 0, &Foreground::default()))
                .unwrap();
            let done = asm
                .push(&band_batch(&key, &grid, 1, &img, 0, &Foreground::default()))
                .unwrap();
            let im = &done[0];
            assert_eq!(im.pixels.is_spooled(), spooled);
            let mut cell = [0u8; 4];
            im.pixels.read_cell(2, &mut cell).unwrap();
            assert_eq!(cell, [8, 9, 12, 13]);
            im.pixels.read_cell(1, &mut cell).unwrap();
            assert_eq!(cell, [2, 3, 6, 7]);
        }
    }

    #[test]
    fn stats_skip_padding_and_the_filter_drops_pixels_but_keeps_rows() {
        let px = [250u8, 10, 250, 250, 10, 250]; // 3 x 2 grey
        let img = Raster::whole(&px, 3, 2, 1);
        let grid = Grid::new(3, 2, 2, 2).unwrap(); // 1 x 2 cells, the second padded
        let key = ImageKey {
            image_id: "s".into(),
            label: None,
            split: Some("val".into()),
        };
        let fg = Foreground {
            threshold: 220,
            light_background: true,
            min_fraction: 0.25,
        };
        let b = band_batch(&key, &grid, 0, &img, 2, &fg);
        let f32s = |name: &str| {
            b.column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<Float32Array>()
                .unwrap()
                .values()
                .to_vec()
        };
        assert_eq!(f32s("mean"), vec![130.0, 250.0]); // padding not counted
        assert_eq!(f32s("std"), vec![120.0, 0.0]);
        assert_eq!(f32s("fg_fraction"), vec![0.5, 0.0]);
        let pixels = b.column_by_name("pixels").unwrap();
        assert_eq!((pixels.is_valid(0), pixels.is_valid(1)), (true, false));
        let done = ImageAssembler::default().push(&b).unwrap();
        assert_eq!(done[0].present, vec![true, false]);
        assert_eq!(&done[0].pixels.memory().unwrap()[4..], &[0, 0, 0, 0]);
    }
}
