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
//! [`pipeline::run`] runs it. [`synth`] generates the UltraMNIST benchmark.

#[cfg(feature = "cli")]
pub mod bench;
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
