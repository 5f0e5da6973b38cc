//! State that outlives a step, as mechanism only: the latent store (each image's Z, in memory
//! or spilled) and the checkpoint protocol (files, then a manifest with their checksums) on any
//! object store. What a pipeline run puts in a checkpoint is `pipeline::checkpoint`'s business;
//! this module depends on `storage` and Arrow, never on the pipeline.

pub mod checkpoint;
pub mod latent;

pub use latent::{LatentGrid, LatentStore};
