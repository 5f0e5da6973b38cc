//! Pipelines: the definition a user writes, and the runner that wires every other module, in
//! stages: prepare ([`prepare`]), start or resume, epochs, outputs ([`runner`]); the
//! checkpoint payload ([`checkpoint`]) and progress reports ([`observer`]); where a new run's
//! weights come from ([`start_weights`]); a run's trace for the PyTorch twin ([`trace`]); a
//! trained model applied to new images ([`predict`]).

pub mod checkpoint;
pub mod data_parallel;
pub mod definition;
pub mod heatmaps;
pub mod observer;
pub mod predict;
pub mod prepare;
pub mod runner;
pub mod setup;
pub mod start_weights;
pub mod summary;
pub mod trace;
mod validate;

pub use definition::{Definition, DefinitionError};
pub use observer::{LogObserver, RunObserver};
pub use predict::{PredictRequest, PredictSummary, predict};
pub use runner::{RunError, RunOptions, RunSummary, run, run_with};
pub use trace::TraceOptions;
