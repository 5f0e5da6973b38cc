//! A mini-batch of same-sized images and how its patches reach the backbone.
//!
//! Patches are kept as decoded (u8, HWC) and turned into normalised float input one chunk at a
//! time, so a batch costs its pixel bytes, not four times them. Where the pixels live:
//! - all images in memory: one u8 tensor on the model's device. On CUDA it is staged in pinned
//!   host memory and copied with `non_blocking`, so the trainer thread does not wait for the copy;
//! - any image spooled (larger than the spool threshold): patches stay on the host and each
//!   chunk's cells are read from the spool files when the backbone needs them, which keeps
//!   memory flat in image size;
//! - already-normalised float input (tests and benchmarks that build batches directly).
//!
//! Normalisation (`source.normalize`, [`Normalization`]) happens on the device, per chunk.

use std::cell::RefCell;

use tch::{Device, Tensor};

use crate::model::Normalization;
use crate::patch::{ImagePatches, PatchPixels};

enum Pixels {
    /// B x K x m x m x c u8 on the device.
    Resident(Tensor),
    /// One per image, on the host; some spooled.
    Host(Vec<(String, PatchPixels)>),
    /// B x K x c x m x m float, normalised.
    Input(Tensor),
}

/// A mini-batch of same-sized images: B images of K = rows x cols patches of c x m x m.
pub struct GridBatch {
    pixels: Pixels,
    pub labels: Tensor,
    pub rows: i64,
    pub cols: i64,
    /// B x K, image-major: whether a cell's patch is present; `None` when all are. Absent
    /// cells (the foreground filter dropped them) are never encoded and stay zero in Z.
    present: Option<Vec<bool>>,
    b: i64,
    channels: i64,
    patch: i64,
    device: Device,
    /// How pixels become input (`source.normalize`).
    normalization: Normalization,
    /// The first spool read that failed: its patch reads as zeros until the step checks this
    /// ([`GridBatch::check_reads`]) before any weight changes.
    read_error: RefCell<Option<PatchReadError>>,
}

/// A spooled patch could not be read back from its temporary file (a disk error).
#[derive(Debug, thiserror::Error)]
#[error("cannot read patch {cell} of image '{image_id}' back from its spool file: {source}")]
pub struct PatchReadError {
    pub image_id: String,
    pub cell: usize,
    #[source]
    pub source: std::io::Error,
}

/// Host bytes -> device tensor; through pinned memory and a non-blocking copy on CUDA.
fn upload(host: Tensor, device: Device) -> Tensor {
    if device.is_cuda() {
        host.pin_memory(device)
            .to_device_(device, host.kind(), true, false)
    } else {
        host
    }
}

impl GridBatch {
    /// Stack same-shaped images into a batch for `device`.
    pub fn from_images(images: &[ImagePatches], device: Device) -> Self {
        let first = &images[0];
        let (k, m, c) = (first.cells(), first.patch, first.channels);
        for im in images {
            assert_eq!(
                (im.grid_rows, im.grid_cols, im.patch, im.channels),
                (first.grid_rows, first.grid_cols, m, c)
            );
        }
        let b = images.len();
        let pixels = if images.iter().any(|im| im.pixels.is_spooled()) {
            Pixels::Host(
                images
                    .iter()
                    .map(|im| (im.key.image_id.clone(), im.pixels.clone()))
                    .collect(),
            )
        } else {
            let mut bytes = Vec::with_capacity(b * k * first.patch_bytes());
            for im in images {
                bytes.extend_from_slice(im.pixels.memory().expect("not spooled"));
            }
            let host =
                Tensor::from_slice(&bytes).view([b as i64, k as i64, m as i64, m as i64, c as i64]);
            Pixels::Resident(upload(host, device))
        };
        let labels: Vec<i64> = images.iter().map(|im| im.key.label.unwrap_or(-1)).collect();
        let present = (!images.iter().all(|im| im.all_present())).then(|| {
            images
                .iter()
                .flat_map(|im| im.present.iter().copied())
                .collect::<Vec<bool>>()
        });
        Self {
            pixels,
            labels: upload(Tensor::from_slice(&labels), device),
            rows: first.grid_rows as i64,
            cols: first.grid_cols as i64,
            present,
            b: b as i64,
            channels: c as i64,
            patch: m as i64,
            device,
            normalization: Normalization::default(),
            read_error: RefCell::new(None),
        }
    }

    /// A batch of already-normalised input, B x K x c x m x m (with gradient, if it has one);
    /// `present` (B x K, image-major) marks the cells that have a patch, `None`: all do.
    pub fn from_input(
        input: Tensor,
        labels: Tensor,
        rows: i64,
        cols: i64,
        present: Option<Vec<bool>>,
    ) -> Self {
        let size = input.size();
        assert_eq!(size[1], rows * cols, "K = rows x cols");
        if let Some(p) = &present {
            assert_eq!(
                p.len() as i64,
                size[0] * size[1],
                "one flag per cell of every image"
            );
        }
        Self {
            device: input.device(),
            b: size[0],
            channels: size[2],
            patch: size[3],
            pixels: Pixels::Input(input),
            labels,
            rows,
            cols,
            present,
            normalization: Normalization::default(),
            read_error: RefCell::new(None),
        }
    }

    /// The whole batch as normalised input, B x K x c x m x m (for tests and small batches).
    pub fn input(&self) -> Tensor {
        let all: Vec<i64> = (0..self.b * self.cells()).collect();
        match &self.pixels {
            Pixels::Input(t) => t.shallow_clone(),
            _ => self.patches(&all).view([
                self.b,
                self.cells(),
                self.normalization.input_channels(self.channels),
                self.patch,
                self.patch,
            ]),
        }
    }

    /// Patches at flat indices (image * K + cell) as normalised input, N x c x m x m on the
    /// device. Only these are read (spool) or converted (resident).
    pub fn patches(&self, flat: &[i64]) -> Tensor {
        let (m, c) = (self.patch, self.channels);
        let k = self.cells();
        // A run of consecutive cells (the fill pass without a mask) is a view, not a gather,
        // and needs no index tensor on the device.
        let consecutive = !flat.is_empty() && flat.windows(2).all(|w| w[1] == w[0] + 1);
        let take = |t: Tensor| {
            if consecutive {
                t.narrow(0, flat[0], flat.len() as i64)
            } else {
                t.index_select(0, &Tensor::from_slice(flat).to_device(self.device))
            }
        };
        match &self.pixels {
            Pixels::Input(t) => take(t.view([self.b * k, c, m, m])),
            Pixels::Resident(t) => self
                .normalization
                .apply(&take(t.view([self.b * k, m, m, c]))),
            Pixels::Host(images) => {
                let patch_bytes = (m * m * c) as usize;
                let mut bytes = vec![0u8; flat.len() * patch_bytes];
                for (i, &f) in flat.iter().enumerate() {
                    let (id, px) = &images[(f / k) as usize];
                    let cell = (f % k) as usize;
                    let out = &mut bytes[i * patch_bytes..][..patch_bytes];
                    if let Err(source) = px.read_cell(cell, out) {
                        out.fill(0);
                        self.read_error.borrow_mut().get_or_insert(PatchReadError {
                            image_id: id.clone(),
                            cell,
                            source,
                        });
                    }
                }
                let host = Tensor::from_slice(&bytes).view([flat.len() as i64, m, m, c]);
                self.normalization.apply(&upload(host, self.device))
            }
        }
    }

    /// Pixels become input with these statistics instead of the default [-1, 1].
    pub fn with_normalization(mut self, normalization: Normalization) -> Self {
        self.normalization = normalization;
        self
    }

    /// Whether every patch read so far came back; the first failure otherwise (once).
    pub fn check_reads(&self) -> Result<(), PatchReadError> {
        match self.read_error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The patches at `cells` of every image, image-major: (B * n) x c x m x m.
    pub fn cells_of_all(&self, cells: &[i64]) -> Tensor {
        self.patches(&self.flat_cells(cells))
    }

    /// Flat indices (image * K + cell) of `cells` in every image, image-major: the order in
    /// which an inner iteration, and the fill pass of a training step, encode them.
    pub fn flat_cells(&self, cells: &[i64]) -> Vec<i64> {
        let k = self.cells();
        (0..self.b)
            .flat_map(|i| cells.iter().map(move |&c| i * k + c))
            .collect()
    }

    /// Whether the cell at flat index `flat` has a patch.
    pub fn is_present(&self, flat: i64) -> bool {
        self.present.as_ref().is_none_or(|p| p[flat as usize])
    }

    pub fn device(&self) -> Device {
        self.device
    }
    pub fn batch_size(&self) -> i64 {
        self.b
    }
    pub fn cells(&self) -> i64 {
        self.rows * self.cols
    }
    /// Present patches over the whole batch (what a fill pass encodes).
    pub fn present_cells(&self) -> i64 {
        match &self.present {
            Some(p) => p.iter().filter(|&&x| x).count() as i64,
            None => self.batch_size() * self.cells(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patch::{ImageKey, Spool};

    #[test]
    fn a_spooled_patch_that_cannot_be_read_back_is_reported_not_a_panic() {
        let (m, c, cells) = (2, 1, 4);
        let image = |id: &str, pixels| ImagePatches {
            key: ImageKey {
                image_id: id.into(),
                label: Some(0),
                split: None,
            },
            grid_rows: 2,
            grid_cols: 2,
            patch: m,
            channels: c,
            pixels,
            present: vec![true; cells],
        };
        let good = image("good", PatchPixels::Memory(vec![7; cells * m * m * c]));
        let spool = Spool::unreadable(cells, m * m * c).unwrap();
        let bad = image("bad", PatchPixels::Spooled(spool));
        let batch = GridBatch::from_images(&[good, bad], Device::Cpu);
        // Cell 1 of the first image reads; cell 2 of the second (flat 4 + 2) does not.
        let patches = batch.patches(&[1, 6]);
        assert_eq!(patches.size(), [2, 1, 2, 2]);
        let err = batch.check_reads().unwrap_err();
        assert_eq!((err.image_id.as_str(), err.cell), ("bad", 2));
        assert!(err.to_string().contains("image 'bad'"), "{err}");
        // Reported once: the next check starts clean.
        assert!(batch.check_reads().is_ok());
    }
}
