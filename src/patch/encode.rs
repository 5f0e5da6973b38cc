//! Patches into Arrow: one `RecordBatch` per band (a grid row, or a segment of one) of one
//! image, so that a large image streams band by band.

use std::sync::Arc;

use arrow::array::{
    Array, BinaryArray, Float32Array, Int64Array, StringArray, UInt8Array, UInt32Array,
};
use arrow::record_batch::RecordBatch;

use super::grid::Grid;
use super::raster::{Raster, copy_patch};
use super::schema::{ImageKey, patch_schema};
use super::stats::{Foreground, patch_stats};

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
