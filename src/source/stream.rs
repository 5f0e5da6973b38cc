//! The async source stage: fetch → decode (blocking pool, `decode_workers` in parallel) → patch
//! bands, sent downstream through a buffer bounded in bytes (a semaphore of KiB permits that a
//! batch holds until the consumer drops it).

use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::decode::decode;
use super::{Failure, ImageEntry};
use crate::patch::batch::{ImageKey, Raster, band_batch};
use crate::patch::{Grid, patch_schema};
use crate::storage::Location;

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub patch: usize,
    pub stride: usize,
    /// 1 (grey) or 3 (RGB): images are converted to this.
    pub channels: usize,
    /// Resize every image to this square size first (the GD baseline); `None` keeps it.
    pub resize_to: Option<u32>,
    /// Images decoded in parallel.
    pub decode_workers: usize,
    /// Bytes of patch batches that may wait between the source and its consumer.
    pub buffer_bytes: usize,
}

/// A patch batch that holds its share of the byte budget until dropped.
pub struct PatchBatch {
    pub batch: RecordBatch,
    _permit: OwnedSemaphorePermit,
}

pub enum SourceItem {
    Batch(PatchBatch),
    Failed(Failure),
}

const PERMIT_BYTES: usize = 1024;

/// Streams the patches of `entries` in the given order. Failures arrive in the same channel, so
/// that a consumer accounts for every image: each entry yields its bands or one failure.
pub fn stream_images(
    images: Location,
    entries: Vec<ImageEntry>,
    config: StreamConfig,
) -> mpsc::Receiver<SourceItem> {
    let (tx, rx) = mpsc::channel(64);
    let max_permits = (config.buffer_bytes / PERMIT_BYTES).max(1);
    let budget = Arc::new(Semaphore::new(max_permits));
    tokio::spawn(async move {
        let workers = config.decode_workers.max(1);
        let mut decoded = futures::stream::iter(entries)
            .map(|entry| {
                let images = images.clone();
                let config = config.clone();
                async move {
                    let bytes = match images.get(&entry.path).await {
                        Ok(b) => b,
                        Err(e) => return Err(failure(&entry, "read", e.to_string())),
                    };
                    tokio::task::spawn_blocking(move || cut(&entry, &bytes, &config))
                        .await
                        .unwrap_or_else(|e| {
                            Err(Failure {
                                image_id: String::new(),
                                url: String::new(),
                                stage: "decode".into(),
                                message: format!("decoder panicked: {e}"),
                            })
                        })
                }
            })
            .buffered(workers);
        while let Some(result) = decoded.next().await {
            match result {
                Ok(bands) => {
                    for batch in bands {
                        let bytes = batch.get_array_memory_size();
                        let permits = (bytes / PERMIT_BYTES).clamp(1, max_permits) as u32;
                        let permit = budget
                            .clone()
                            .acquire_many_owned(permits)
                            .await
                            .expect("budget is never closed");
                        if tx
                            .send(SourceItem::Batch(PatchBatch {
                                batch,
                                _permit: permit,
                            }))
                            .await
                            .is_err()
                        {
                            return; // consumer gone
                        }
                    }
                }
                Err(f) => {
                    if tx.send(SourceItem::Failed(f)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn failure(entry: &ImageEntry, stage: &str, message: String) -> Failure {
    Failure {
        image_id: entry.image_id.clone(),
        url: entry.url.clone(),
        stage: stage.into(),
        message,
    }
}

/// Decode one image and cut it into band batches.
fn cut(
    entry: &ImageEntry,
    bytes: &[u8],
    config: &StreamConfig,
) -> Result<Vec<RecordBatch>, Failure> {
    let img = decode(bytes, config.channels, config.resize_to)
        .map_err(|m| failure(entry, "decode", m))?;
    let grid = Grid::new(img.width, img.height, config.patch, config.stride)
        .map_err(|e| failure(entry, "patch", e.to_string()))?;
    let key = ImageKey {
        image_id: entry.image_id.clone(),
        label: Some(entry.label),
        split: entry.split.as_str().into(),
    };
    let raster = Raster {
        pixels: &img.pixels,
        width: img.width,
        height: img.height,
        channels: img.channels,
    };
    Ok((0..grid.rows)
        .map(|row| band_batch(&key, &grid, row, &raster))
        .collect())
}

/// The same patches as a DataFusion stream, for other engines; failures are collected aside.
pub fn into_record_batch_stream(
    rx: mpsc::Receiver<SourceItem>,
    failures: Arc<Mutex<Vec<Failure>>>,
) -> SendableRecordBatchStream {
    let stream = futures::stream::unfold(rx, move |mut rx| {
        let failures = failures.clone();
        async move {
            loop {
                match rx.recv().await? {
                    SourceItem::Batch(b) => return Some((Ok(b.batch), rx)),
                    SourceItem::Failed(f) => failures.lock().unwrap().push(f),
                }
            }
        }
    });
    Box::pin(RecordBatchStreamAdapter::new(patch_schema(), stream))
}
