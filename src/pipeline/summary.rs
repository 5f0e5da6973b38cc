//! What a run did: its counts and final figures, written as `summary.json` and returned to the
//! caller. Images seen = used + failed + left out by `select:`.

#![warn(missing_docs)]

use serde::Serialize;

use crate::model::Method;

/// What a run did, written as summary.json and returned to the caller.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// The pipeline's `name`.
    pub name: String,
    /// PatchGD or GD.
    pub method: Method,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Classes the model predicts.
    pub classes: i64,
    /// Epochs the run has trained.
    pub epochs: u64,
    /// Objects under the images URL.
    pub images_seen: usize,
    /// Images trained or evaluated on in the first epoch.
    pub images_used: usize,
    /// Distinct images in the errors table.
    pub images_failed: usize,
    /// Rows of the labels table that match no object under the images URL.
    pub labels_without_image: usize,
    /// Labelled images that the pipeline's `select:` query left out.
    pub images_deselected: usize,
    /// Labelled training images (split `train`).
    pub train_images: usize,
    /// Labelled validation images (split `val`).
    pub val_images: usize,
    /// Validation accuracy after the last epoch.
    pub final_val_accuracy: f64,
    /// Validation quadratic weighted kappa after the last epoch.
    pub final_val_qwk: f64,
    /// Validation loss after the last epoch.
    pub final_val_loss: f64,
    /// Wall time of this process's part of the run.
    pub wall_seconds: f64,
    /// The output URL.
    pub output: String,
    /// Fill-pass cells taken from the latent store instead of encoded (`latent.reuse`), in this
    /// process (a resumed run counts from its resume).
    pub latent_cells_reused: u64,
    /// Image passes (training and evaluation) whose patches waited in a spool file
    /// (`train.spool_above_mib`), in this process.
    pub images_spooled: u64,
    /// Images whose Z the latent store holds at the end.
    pub latent_images: usize,
    /// Data-parallel ranks that trained the model together (1: a single process).
    pub ranks: usize,
    /// Seconds rank 0 spent averaging gradients across the ranks (packing, the collectives,
    /// waiting for slower ranks) in this process; 0 for a single process.
    pub gradient_averaging_seconds: f64,
}
