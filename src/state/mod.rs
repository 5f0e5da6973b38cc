//! State that outlives a step: the latent store (each image's Z) and checkpoints (model,
//! optimizer, schedule, RNG, source position, latents and metrics), written so that a run
//! resumes exactly where it stopped.

pub mod checkpoint;
pub mod latent;
pub mod resume;

pub use latent::{LatentGrid, LatentStore};
