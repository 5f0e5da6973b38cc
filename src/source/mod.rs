//! The source: list images under a URL, join the labels table, decode, and cut patches into a
//! byte-bounded stream of Arrow record batches.

pub mod catalog;
pub mod decode;
pub mod inspect;
pub mod listing;
mod png_rows;
mod segments;
pub mod stream;
pub mod thumbnail;
pub mod tiff;
mod whole;

pub use catalog::{Catalog, ImageEntry, Split};
pub use listing::{Listing, list_images};
pub use stream::{PatchBatch, SourceItem, StreamConfig, stream_images};

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("labels table '{url}': {reason}")]
    Labels { url: String, reason: String },
    #[error("no images under '{url}'")]
    Empty { url: String },
}

pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// An image that could not be used, and why. Written to the run's errors table and counted:
/// images seen = images used + failures.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub image_id: String,
    pub url: String,
    /// Where it failed: `listing`, `labels`, `read`, `decode`, `patch` or `select`.
    pub stage: String,
    pub message: String,
}
