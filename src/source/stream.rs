//! The async source stage: fetch → decode (blocking pool, `decode_workers` in parallel) → patch
//! bands, sent downstream through a buffer bounded in bytes (a semaphore of KiB permits that a
//! batch holds until the consumer drops it).

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::physical_plan::metrics::Count;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::tiff;
use super::{Failure, ImageEntry};
use crate::patch::{Cut, Foreground, ImageKey, segment_batch};
use crate::patch::{Grid, patch_schema};
use crate::storage::Location;

/// What a consumer needs from each patch; less is cheaper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Read {
    /// Position and grid only: image headers are read, pixels are never decoded.
    Geometry,
    /// Also `mean`, `std`, `fg_fraction`: pixels are decoded but not kept (pixels are null).
    Statistics,
    /// Everything, pixels included (training).
    Pixels,
}

/// Decides per image, once its grid is known, which cells are wanted: `None` = all, or one flag
/// per cell in row-major order. Cells not wanted are not decoded where the format allows it
/// (TIFF segments, whole PNG/JPEG images); their rows carry geometry only.
#[derive(Clone)]
pub struct CellSelector(pub Arc<SelectCells>);

/// (image, its grid at the chosen level, the level) → a flag per cell, or `None` for all.
pub type SelectCells =
    dyn Fn(&ImageKey, &Grid, u32) -> Result<Option<Vec<bool>>, SelectError> + Send + Sync;

/// Why a selector could not choose an image's cells (the filter's own error, kept as the
/// source); it becomes that image's failure, stage `select`.
pub type SelectError = Box<dyn std::error::Error + Send + Sync>;

impl std::fmt::Debug for CellSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CellSelector")
    }
}

/// What the source did, counted as it happens (shown by EXPLAIN ANALYZE of a patches scan).
#[derive(Clone, Debug, Default)]
pub struct SourceCounters {
    /// Images whose first bytes were read.
    pub opened: Count,
    /// Images whose pixels were decoded (all or some of them).
    pub decoded: Count,
}

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub patch: usize,
    pub stride: usize,
    /// 1 (grey) or 3 (RGB): images are converted to this.
    pub channels: usize,
    /// Resize every image to this square size first (the GD baseline); `None` keeps it.
    pub resize_to: Option<u32>,
    /// Images (PNG/JPEG) or bands of tiles (TIFF) decoded in parallel.
    pub decode_workers: usize,
    /// Bytes of patch batches that may wait between the source and its consumer.
    pub buffer_bytes: usize,
    /// Pyramid level to read (TIFF); PNG and JPEG have only level 0.
    pub level: usize,
    /// Instead of `level`: the TIFF level closest to this resolution (microns per pixel).
    pub target_mpp: Option<f64>,
    /// Patch statistics and the foreground filter.
    pub foreground: Foreground,
    /// TIFF work is cut into segments of a grid row this many pixels wide ([`SEGMENT_PX`]).
    pub segment_px: usize,
    /// A PNG larger than this decoded is read row by row, one band at a time
    /// ([`PNG_ROWS_ABOVE_BYTES`]); smaller ones are decoded whole, several images at once.
    pub png_rows_above_bytes: u64,
    /// Geometry, statistics or pixels.
    pub read: Read,
    /// Which cells to read; `None` reads all.
    pub select: Option<CellSelector>,
    /// Leave out the rows of cells not selected (a query's filter drops them anyway); training
    /// keeps them, with null pixels, so that every image's grid is complete.
    pub drop_unselected: bool,
    pub counters: SourceCounters,
}

impl StreamConfig {
    pub fn new(patch: usize, channels: usize) -> Self {
        Self {
            patch,
            stride: patch,
            channels,
            resize_to: None,
            decode_workers: 2,
            buffer_bytes: 64 << 20,
            level: 0,
            target_mpp: None,
            foreground: Foreground::default(),
            segment_px: SEGMENT_PX,
            png_rows_above_bytes: PNG_ROWS_ABOVE_BYTES,
            read: Read::Pixels,
            select: None,
            drop_unselected: false,
            counters: SourceCounters::default(),
        }
    }
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
/// PNGs up to this size decoded (64 MiB: about 4,700 px square RGB) are decoded whole, as the
/// decode workers can then work on several at once; the bands of a PNG read row by row take
/// turns. Above it, memory matters more than that parallelism.
pub const PNG_ROWS_ABOVE_BYTES: u64 = 64 << 20;
/// Width of one unit of TIFF work: the patches of a grid row are cut in segments this wide.
pub const SEGMENT_PX: usize = 4096;
/// The first request for every object: enough for a PNG/JPEG thumbnail or a TIFF's directories.
pub const HEAD_BYTES: u64 = 64 << 10;

pub(super) type BandResult = Result<RecordBatch, Failure>;
pub(super) type BandFuture = BoxFuture<'static, BandResult>;

/// Streams the patches of `entries` in the given order. Failures arrive in the same channel, so
/// that a consumer accounts for every image: each entry yields its bands or one failure (bands
/// that arrived before an image failed mid-way are to be discarded by the consumer).
///
/// Two ordered, parallel stages: opening an image (first request; a PNG or JPEG is fetched and
/// decoded whole here, a TIFF's directories are parsed), then its bands (TIFF: the tiles of one
/// grid row, fetched by range and decoded on the blocking pool). Each runs `decode_workers`
/// ahead, and finished batches wait in a buffer bounded in bytes.
pub fn stream_images(
    images: Location,
    entries: Vec<ImageEntry>,
    config: StreamConfig,
) -> mpsc::Receiver<SourceItem> {
    let (tx, rx) = mpsc::channel(64);
    let max_permits = (config.buffer_bytes / PERMIT_BYTES).max(1);
    let budget = Arc::new(Semaphore::new(max_permits));
    let config = Arc::new(config);
    tokio::spawn(async move {
        let mut bands = band_stream(images, entries, config);
        let mut failed = HashSet::new();
        while let Some(result) = bands.next().await {
            let item = match result {
                Ok(batch) if batch.num_rows() == 0 => continue,
                Ok(batch) => {
                    let id = image_id_of(&batch);
                    if failed.contains(id) {
                        continue; // the rest of an image that already failed
                    }
                    let bytes = batch.get_array_memory_size();
                    let permits = (bytes / PERMIT_BYTES).clamp(1, max_permits) as u32;
                    let permit = budget
                        .clone()
                        .acquire_many_owned(permits)
                        .await
                        .expect("budget is never closed");
                    SourceItem::Batch(PatchBatch {
                        batch,
                        _permit: permit,
                    })
                }
                Err(f) => {
                    if !failed.insert(f.image_id.clone()) {
                        continue; // one failure per image
                    }
                    SourceItem::Failed(f)
                }
            };
            if tx.send(item).await.is_err() {
                return; // consumer gone
            }
        }
    });
    rx
}

/// The two ordered stages as one boxed stream of band results.
fn band_stream(
    images: Location,
    entries: Vec<ImageEntry>,
    config: Arc<StreamConfig>,
) -> BoxStream<'static, BandResult> {
    let workers = config.decode_workers.max(1);
    let opened: BoxStream<'static, Bands> = futures::stream::iter(entries)
        .map(move |entry| {
            let (id, url) = (entry.image_id.clone(), entry.url.clone());
            // Header parsing runs here, not on the blocking pool: a panic in it must still
            // become this image's failure, not end the stream.
            AssertUnwindSafe(open_image(images.clone(), entry, config.clone()))
                .catch_unwind()
                .map(move |r| r.unwrap_or_else(|p| failed(panicked(id, url, "opening", p))))
        })
        .buffered(workers)
        .boxed();
    opened.flatten().buffered(workers).boxed()
}

/// A panic caught in a source task, as the image's failure (a bug to report, never a lost image).
pub(super) fn panicked(
    image_id: String,
    url: String,
    during: &str,
    payload: Box<dyn std::any::Any + Send>,
) -> Failure {
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    Failure {
        image_id,
        url,
        stage: "decode".into(),
        message: format!("internal error while {during} the image (a bug): {message}"),
    }
}

fn image_id_of(batch: &RecordBatch) -> &str {
    batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()
        .expect("image_id is the first column")
        .value(0)
}

pub(super) fn failure(entry: &ImageEntry, stage: &str, message: String) -> Failure {
    Failure {
        image_id: entry.image_id.clone(),
        url: entry.url.clone(),
        stage: stage.into(),
        message,
    }
}

/// One image's band futures, made lazily.
pub(super) type Bands = BoxStream<'static, BandFuture>;

pub(super) fn failed(f: Failure) -> Bands {
    ready_bands(vec![Err(f)])
}

pub(super) fn ready_bands(results: Vec<BandResult>) -> Bands {
    futures::stream::iter(results)
        .map(|r| futures::future::ready(r).boxed())
        .boxed()
}

/// Run `work` on the blocking pool; a panic becomes the image's failure.
pub(super) async fn blocking<T: Send + 'static>(
    entry: &ImageEntry,
    work: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(failure(entry, "decode", format!("decoder panicked: {e}"))))
}

/// First request for one image; returns its band futures (or one failure).
async fn open_image(images: Location, entry: ImageEntry, config: Arc<StreamConfig>) -> Bands {
    config.counters.opened.add(1);
    if entry.size == 0 {
        return failed(failure(&entry, "decode", "empty object (0 bytes)".into()));
    }
    let head = match images
        .get_range(&entry.path, 0..entry.size.min(HEAD_BYTES))
        .await
    {
        Ok(b) => b,
        Err(e) => return failed(failure(&entry, "read", e.to_string())),
    };
    if tiff::is_tiff(&head) {
        return super::segments::open_tiff(images, entry, config, head).await;
    }
    if !looks_like_png_or_jpeg(&head) {
        let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return failed(failure(
            &entry,
            "decode",
            format!(
                "not an image: content starts with bytes {}; expected PNG, JPEG or TIFF",
                shown.join(" ")
            ),
        ));
    }
    super::whole::open_whole(images, entry, config, head).await
}

/// The most pixels an image (a TIFF level) may declare: 2^34, a 131,072 px square. Sizes come
/// from the file, so a few bytes can claim a terabyte; this is checked before any allocation.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 34;
/// The most bytes an image read whole may decode to (the GD baseline reads a TIFF level whole
/// before resizing it): the `image` crate's default limit for PNG and JPEG, 512 MiB.
pub const MAX_WHOLE_IMAGE_BYTES: u64 = 512 << 20;

/// Refuse a declared size that could not be allocated, naming it and the limit; an image
/// `decoded_whole` must also fit [`MAX_WHOLE_IMAGE_BYTES`].
pub(super) fn check_declared_size(
    width: usize,
    height: usize,
    channels: usize,
    decoded_whole: bool,
) -> Result<(), String> {
    let pixels = width as u64 * height as u64;
    if pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "declares {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS} pixels an image may have"
        ));
    }
    let whole = pixels * channels as u64;
    if decoded_whole && whole > MAX_WHOLE_IMAGE_BYTES {
        return Err(format!(
            "declares {width} x {height} pixels: {} MiB decoded whole at {channels} channel(s), more than the {} MiB allowed (PNG and JPEG are decoded whole, and so is a TIFF level for the GD baseline); use a tiled TIFF, or a smaller level",
            whole >> 20,
            MAX_WHOLE_IMAGE_BYTES >> 20
        ));
    }
    Ok(())
}

pub(super) fn select_cells(
    config: &StreamConfig,
    key: &ImageKey,
    grid: &Grid,
    level: u32,
) -> Result<Option<Vec<bool>>, String> {
    match &config.select {
        None => Ok(None),
        // The failure record keeps the message (a row of the errors table).
        Some(select) => select.0(key, grid, level).map_err(|e| e.to_string()),
    }
}

pub(super) fn cut_of<'a>(
    config: &StreamConfig,
    level: u32,
    selected: Option<&'a [bool]>,
) -> Cut<'a> {
    Cut {
        level,
        channels: config.channels,
        foreground: config.foreground,
        pixels: config.read == Read::Pixels,
        selected,
    }
}

/// Rows of a segment that nothing was read for; empty when none of its cells is selected and
/// the consumer drops unselected rows.
pub(super) fn geometry_segment(
    key: &ImageKey,
    grid: &Grid,
    row: usize,
    cols: std::ops::Range<usize>,
    cut: &Cut,
    config: &StreamConfig,
) -> RecordBatch {
    let any = |cols: &std::ops::Range<usize>| {
        cut.selected
            .is_none_or(|s| cols.clone().any(|c| s[grid.index(row, c)]))
    };
    if config.drop_unselected && !any(&cols) {
        return RecordBatch::new_empty(patch_schema());
    }
    segment_batch(key, grid, row, cols, None, cut)
}

fn looks_like_png_or_jpeg(head: &[u8]) -> bool {
    head.starts_with(b"\x89PNG\r\n\x1a\n") || head.starts_with(&[0xFF, 0xD8, 0xFF])
}

pub(super) fn key_of(entry: &ImageEntry) -> ImageKey {
    ImageKey {
        image_id: entry.image_id.clone(),
        label: entry.label,
        split: entry.split.map(|s| s.as_str().to_string()),
    }
}
