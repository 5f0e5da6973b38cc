//! Pipelines: the definition a user writes, and the runner that wires every other module.

pub mod definition;
pub mod runner;

pub use definition::{Definition, DefinitionError};
pub use runner::{RunError, RunOptions, RunSummary, run, run_with};
