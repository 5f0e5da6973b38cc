//! The heatmap writer of `patchgd predict --heatmaps`: a thread that takes each image's
//! evidence from the trainer as it is computed, appends it to `heatmaps.parquet` (through a
//! local temporary file, a row group at a time) and draws `heatmaps/<image_id>.png` over the
//! image's thumbnail. The channel between them is bounded, so memory holds a few images'
//! evidence, whatever the number or size of the images.

use std::collections::HashMap;
use std::io::Read;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use super::runner::RunError;
use crate::model::grad_cam::ImageEvidence;
use crate::sink::heatmap::{HeatmapPicture, heatmap_png, heatmaps_batch, heatmaps_schema};
use crate::source::thumbnail::thumbnail;
use crate::source::{Failure, ImageEntry, StreamConfig};
use crate::storage::Location;

/// Images of evidence waiting for the writer before the trainer waits for it.
const QUEUE: usize = 2;

/// What the writer needs to place each image's evidence.
pub struct HeatmapJob {
    /// Where the images are listed.
    pub images: Location,
    /// Every listed image, by id (for its object and URL).
    pub entries: HashMap<String, ImageEntry>,
    /// The stream's settings (which level the grid was cut from).
    pub stream: StreamConfig,
    /// Grid stride in the grid level's pixels.
    pub stride: usize,
    /// Where `heatmaps.parquet` and `heatmaps/` go.
    pub output: Location,
}

/// What the writer did: written to `summary.json` under `heatmaps`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeatmapOutcome {
    /// Images whose evidence is in `heatmaps.parquet`.
    pub images: usize,
    /// Rows of `heatmaps.parquet` (cells x classes, summed over images).
    pub rows: usize,
    /// PNGs written under `heatmaps/`.
    pub pictures: usize,
    /// Images whose picture could not be made (their rows are still in the table); each is in
    /// `errors.parquet` with stage `heatmap`.
    #[serde(skip)]
    pub failures: Vec<Failure>,
}

/// Start the writer on its own thread; send evidence into the returned sender, drop it, and
/// join the handle for the outcome.
pub fn spawn(
    job: HeatmapJob,
    rt: tokio::runtime::Handle,
) -> (
    SyncSender<ImageEvidence>,
    JoinHandle<Result<HeatmapOutcome, RunError>>,
) {
    let (tx, rx) = sync_channel(QUEUE);
    let handle = std::thread::spawn(move || write_all(job, rx, rt));
    (tx, handle)
}

fn write_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> RunError {
    RunError::Write {
        what: what.to_string(),
        source: Box::new(e),
    }
}

/// The PNG's object name: the image id (which may hold `/`) under `heatmaps/`.
pub fn picture_name(image_id: &str) -> String {
    format!("heatmaps/{image_id}.png")
}

fn write_all(
    job: HeatmapJob,
    rx: Receiver<ImageEvidence>,
    rt: tokio::runtime::Handle,
) -> Result<HeatmapOutcome, RunError> {
    let file = tempfile::tempfile().map_err(|e| write_err("heatmaps.parquet", e))?;
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(256 * 1024))
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, heatmaps_schema(), Some(props))
        .map_err(|e| write_err("heatmaps.parquet", e))?;
    let mut out = HeatmapOutcome::default();
    for evidence in rx {
        let batch = heatmaps_batch(std::slice::from_ref(&evidence));
        out.rows += batch.num_rows();
        out.images += 1;
        writer
            .write(&batch)
            .map_err(|e| write_err("heatmaps.parquet", e))?;
        match picture(&job, &evidence, &rt) {
            Ok(()) => out.pictures += 1,
            Err(f) => out.failures.push(f),
        }
    }
    let mut file = writer
        .into_inner()
        .map_err(|e| write_err("heatmaps.parquet", e))?;
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut file)
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(|e| write_err("heatmaps.parquet", e))?;
    rt.block_on(job.output.put("heatmaps.parquet", bytes))?;
    Ok(out)
}

/// Draw one image's picture and store it; a failure names the image and what went wrong.
fn picture(
    job: &HeatmapJob,
    evidence: &ImageEvidence,
    rt: &tokio::runtime::Handle,
) -> Result<(), Failure> {
    let entry = job.entries.get(&evidence.image_id).ok_or_else(|| Failure {
        image_id: evidence.image_id.clone(),
        url: String::new(),
        stage: "heatmap".into(),
        message: "predicted but not in the listing".into(),
    })?;
    let fail = |message: String| Failure {
        image_id: entry.image_id.clone(),
        url: entry.url.clone(),
        stage: "heatmap".into(),
        message,
    };
    let thumb = rt
        .block_on(thumbnail(&job.images, entry, &job.stream))
        .map_err(|f| fail(format!("thumbnail: {}", f.message)))?;
    let png = heatmap_png(&HeatmapPicture {
        image_id: &evidence.image_id,
        thumbnail: &thumb,
        rows: evidence.rows,
        cols: evidence.cols,
        stride: job.stride,
        scores: &evidence.scores[evidence.predicted as usize],
        class: evidence.predicted,
        probability: evidence.probability,
    })
    .map_err(|e| fail(e.to_string()))?;
    rt.block_on(job.output.put(&picture_name(&evidence.image_id), png))
        .map_err(|e| fail(format!("writing the picture: {e}")))
}
