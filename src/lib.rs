//! # patchgd
//!
//! Train convolutional networks on very large images with Patch Gradient Descent (PatchGD),
//! as a streaming dataflow pipeline.
//!
//! ```text
//! object store (s3:// gs:// az:// http(s):// file:// memory://)                [storage]
//!   │  images table: list objects + labels (CSV/Parquet) → one row per image   [source::catalog]
//!   ▼
//! decode: PNG, JPEG whole; TIFF/SVS one band of tiles at a time, by byte range
//!                                           ── blocking pool, parallel   [source::decode, tiff]
//!   ▼
//! patch batches: Arrow RecordBatch, one row per patch, one batch per grid row   [patch]
//!   │  (image_id, label, split, row, col, x, y, level, …, mean, std, fg_fraction, pixels)
//!   │                                       ── bounded in bytes                 [source::stream]
//!   ▼
//! schedule: per image, a fill pass, then ζ chunks of a seeded permutation      [train::schedule]
//!   ▼
//! PatchGD stage (tch, one dedicated thread): backbone + head + owned Adam      [train, model]
//!   ▼
//! sinks: metrics (Parquet, CSV), predictions, errors · weights (safetensors) · plot   [sink]
//! ```
//!
//! A pipeline definition ([`pipeline::Definition`], a YAML file) names the source, patching,
//! model, method (`patchgd` or the `gd` baseline) and training parameters;
//! [`pipeline::run`] runs it in stages (prepare, start or resume, epochs, outputs: see
//! [`pipeline::runner`]). [`synth`] generates the UltraMNIST benchmark; [`sql`] registers the
//! images, patches and run tables in any DataFusion `SessionContext`.
//!
//! Modules import one way (docs/architecture.md, checked by `tests/it/architecture.rs`):
//! `storage`, `rng` and `patch` import no other; `state` only `storage`; `source` `patch` and
//! `storage`; `train` the model, patches, source items and the latent store; `pipeline` may use
//! everything.
//!
//! # Embedding
//!
//! The command line (`patchgd` binary, its SQL shell, progress bar and benchmarks) is the
//! default `cli` feature. A platform depends on the library alone:
//!
//! ```toml
//! patchgd = { version = "0.1", default-features = false }
//! ```
//!
//! and runs a pipeline with its own progress reporting:
//!
//! ```no_run
//! use std::sync::Arc;
//! use patchgd::pipeline::{Definition, RunObserver, RunOptions, run_with};
//!
//! struct Quiet;
//! impl RunObserver for Quiet {}
//!
//! let def = Definition::from_file(std::path::Path::new("pipelines/ultramnist.yaml"))?;
//! let options = RunOptions { observer: Some(Arc::new(Quiet)), ..Default::default() };
//! let summary = run_with(&def, &options)?;
//! assert_eq!(summary.images_seen, summary.images_used + summary.images_failed + summary.images_deselected);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Without an observer, progress goes to `tracing` (target `patchgd::run`). The library never
//! prints; errors name the object, key or file they are about and keep their cause as
//! `source()`.

#[cfg(feature = "cli")]
pub mod bench;
pub mod dist;
pub mod model;
pub mod patch;
pub mod pipeline;
pub mod rng;
pub mod sink;
pub mod source;
pub mod sql;
pub mod state;
pub mod storage;
pub mod synth;
#[cfg(feature = "cli")]
pub mod testkit;
pub mod train;
