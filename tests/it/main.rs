//! One integration test binary (each binary relinks libtorch and datafusion), one module per area.

mod architecture;
mod bench;
mod checkpoints;
mod cluster;
mod common;
#[cfg(feature = "mpi")]
mod distributed;
mod heatmaps;
mod patchgd_step;
mod pipeline_files;
mod predict;
mod pretrained;
mod s3;
mod source;
mod sql;
mod stores;
mod synth;
mod tiff;
mod training;
mod twin;
