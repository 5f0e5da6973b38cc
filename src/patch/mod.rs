//! Patches: grid geometry, and patch rows as Arrow record batches (schema in
//! `schemas/patches.md`).

pub mod batch;
pub mod grid;
pub mod spool;

pub use batch::{Foreground, ImageAssembler, ImagePatches, Raster, patch_schema};
pub use grid::Grid;
pub use spool::{PatchPixels, Spool, SpoolPolicy};

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
