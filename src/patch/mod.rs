//! Patches: grid geometry, cutting patches from decoded pixels with their statistics, patch
//! rows as Arrow record batches, and their reassembly into whole images for the trainer.
//!
//! Imports run one way: `grid` ← `raster` ← `encode` (with `schema`, `stats`); `assemble`
//! needs only `schema` and `spool`.

pub mod assemble;
pub mod encode;
pub mod grid;
pub mod raster;
pub mod schema;
pub mod spool;
pub mod stats;

pub use assemble::{ImageAssembler, ImagePatches};
pub use encode::{Cut, band_batch, segment_batch};
pub use grid::Grid;
pub use raster::{Raster, copy_patch};
pub use schema::{ImageKey, patch_schema};
pub use spool::{PatchPixels, Spool, SpoolPolicy};
pub use stats::{Foreground, patch_stats};

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("patch size {patch} is larger than the image ({width} x {height} px)")]
    PatchLargerThanImage {
        width: usize,
        height: usize,
        patch: usize,
    },
    #[error("bad patch geometry: {0}")]
    Geometry(String),
    #[error("malformed patch batch: {0}")]
    Malformed(String),
    #[error("cannot spool patches to a temporary file: {0}")]
    Spool(String),
}
