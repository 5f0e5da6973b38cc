//! Sinks: what a run writes under its output URL (metrics, predictions, errors, weights, plot).

pub mod heatmap;
pub mod plot;
pub mod tables;
pub mod weights;

pub use tables::EpochMetrics;
