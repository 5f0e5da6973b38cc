//! Patch rows as Arrow: one `RecordBatch` per band (one grid row) of one image, so a large image
//! streams band by band; and the assembler that turns bands back into whole patch grids.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, BinaryArray, Int64Array, StringArray, UInt8Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::PatchError;
use super::grid::{Grid, copy_patch};

static PATCH_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("label", DataType::Int64, true),
        Field::new("split", DataType::Utf8, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("col", DataType::UInt32, false),
        Field::new("x", DataType::UInt32, false),
        Field::new("y", DataType::UInt32, false),
        Field::new("grid_rows", DataType::UInt32, false),
        Field::new("grid_cols", DataType::UInt32, false),
        Field::new("size", DataType::UInt32, false),
        Field::new("channels", DataType::UInt8, false),
        Field::new("pixels", DataType::Binary, false),
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
    pub split: String,
}

/// A decoded image: interleaved (HWC) u8 pixels.
pub struct Raster<'a> {
    pub pixels: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

/// The batch of grid row `row`: one Arrow row per patch (r, 0..cols).
pub fn band_batch(key: &ImageKey, grid: &Grid, row: usize, image: &Raster) -> RecordBatch {
    let n = grid.cols;
    let mut pixels = Vec::with_capacity(n * grid.patch * grid.patch * image.channels);
    for col in 0..n {
        copy_patch(
            image.pixels,
            image.width,
            image.height,
            image.channels,
            grid,
            row,
            col,
            &mut pixels,
        );
    }
    let patch_bytes = grid.patch * grid.patch * image.channels;
    let u32s = |f: &dyn Fn(usize) -> usize| {
        Arc::new(UInt32Array::from_iter_values((0..n).map(|c| f(c) as u32)))
    };
    let columns: Vec<Arc<dyn Array>> = vec![
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            &key.image_id,
            n,
        ))),
        Arc::new(Int64Array::from(vec![key.label; n])),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
            &key.split, n,
        ))),
        u32s(&|_| row),
        u32s(&|c| c),
        u32s(&|c| grid.origin(row, c).0),
        u32s(&|c| grid.origin(row, c).1),
        u32s(&|_| grid.rows),
        u32s(&|_| grid.cols),
        u32s(&|_| grid.patch),
        Arc::new(UInt8Array::from(vec![image.channels as u8; n])),
        Arc::new(BinaryArray::from_iter_values(
            pixels.chunks_exact(patch_bytes),
        )),
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
    /// cells x patch x patch x channels bytes (HWC per cell).
    pub pixels: Vec<u8>,
}

impl ImagePatches {
    pub fn cells(&self) -> usize {
        self.grid_rows * self.grid_cols
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
            let entry = self
                .partial
                .entry(id.to_string())
                .or_insert_with(|| Partial {
                    image: ImagePatches {
                        key: ImageKey {
                            image_id: id.to_string(),
                            label: labels.is_valid(i).then(|| labels.value(i)),
                            split: splits.value(i).to_string(),
                        },
                        grid_rows: gr,
                        grid_cols: gc,
                        patch: m,
                        channels: ch,
                        pixels: vec![0; gr * gc * patch_bytes],
                    },
                    seen: vec![false; gr * gc],
                    remaining: gr * gc,
                });
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
            let value = pixels.value(i);
            if value.len() != patch_bytes {
                return Err(PatchError::Malformed(format!(
                    "patch ({r}, {c}) of image '{id}' has {} bytes, expected {patch_bytes}",
                    value.len()
                )));
            }
            let cell = r * gc + c;
            entry.image.pixels[cell * patch_bytes..(cell + 1) * patch_bytes].copy_from_slice(value);
            if !std::mem::replace(&mut entry.seen[cell], true) {
                entry.remaining -= 1;
            }
            if entry.remaining == 0 {
                done.push(self.partial.remove(id).unwrap().image);
            }
        }
        Ok(done)
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
        let img = Raster {
            pixels: &px,
            width: 4,
            height: 4,
            channels: 1,
        };
        let grid = Grid::new(4, 4, 2, 2).unwrap();
        let key = ImageKey {
            image_id: "a/b".into(),
            label: Some(3),
            split: "train".into(),
        };
        let b1 = band_batch(&key, &grid, 1, &img);
        let b0 = band_batch(&key, &grid, 0, &img);
        assert_eq!(b0.num_rows(), 2);
        let mut asm = ImageAssembler::default();
        assert!(asm.push(&b1).unwrap().is_empty());
        assert_eq!(asm.incomplete(), vec!["a/b".to_string()]);
        let done = asm.push(&b0).unwrap();
        assert_eq!(done.len(), 1);
        let im = &done[0];
        assert_eq!(im.key, key);
        // cell (1, 0) is the bottom-left patch: pixels (0,2),(1,2),(0,3),(1,3) -> 8, 9, 12, 13
        assert_eq!(&im.pixels[2 * 4..3 * 4], &[8, 9, 12, 13]);
        assert_eq!(&im.pixels[4..8], &[2, 3, 6, 7]);
        assert!(asm.incomplete().is_empty());
    }
}
