//! Patch batches back into whole images: the trainer needs every patch of an image at once
//! (the fill pass), while the source sends them band by band, interleaved across images.

use std::collections::HashMap;

use arrow::array::{Array, BinaryArray, Int64Array, StringArray, UInt8Array, UInt32Array};
use arrow::record_batch::RecordBatch;

use super::PatchError;
use super::schema::ImageKey;
use super::spool::{PatchPixels, Spool, SpoolPolicy};

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
                if cells.checked_mul(patch_bytes).is_none() {
                    return Err(PatchError::Malformed(format!(
                        "image '{id}' claims a {gr} x {gc} grid of {m} px patches: too large"
                    )));
                }
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
    use crate::patch::{Foreground, Grid, Raster, band_batch};
    use arrow::array::Float32Array;

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
