//! How a run reports while it goes. The library never prints: it tells a [`RunObserver`], and
//! the embedding program decides what to show (the command line draws a progress bar; the
//! default, [`LogObserver`], logs through `tracing`).

#![warn(missing_docs)]

use crate::sink::EpochMetrics;

/// Receives a run's progress. Every method has a default, so an observer implements only what
/// it shows. Called from the thread that runs the pipeline.
pub trait RunObserver: Send + Sync {
    /// A line for people: what the run trains on, a resume, a skipped checkpoint, an epoch's
    /// metrics.
    fn note(&self, line: &str) {
        tracing::info!(target: "patchgd::run", "{line}");
    }
    /// An epoch starts: `label` is "epoch E/N", `images` its training plus validation images.
    fn epoch_started(&self, _label: &str, _images: usize) {}
    /// Images of the current epoch accounted for so far (used or failed).
    fn images_done(&self, _images: usize) {}
    /// An epoch ended with these metrics.
    fn epoch_finished(&self, _metrics: &EpochMetrics) {}
    /// The last epoch ended; outputs are written next.
    fn finished(&self) {}
    /// Asked after every optimizer step: `true` stops the run there, after a checkpoint at
    /// that step, with [`RunError::Stopped`](super::RunError::Stopped); the next run resumes
    /// from it. (A notebook's Ctrl-C; honoured when the run is one process, not data-parallel.)
    fn stop_requested(&self) -> bool {
        false
    }
}

/// Notes as `tracing` events at level INFO (target `patchgd::run`); nothing else.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogObserver;

impl RunObserver for LogObserver {}
