//! `patchgd inspect`: what an image object is (size, levels, tiles, compression, channels) and
//! how many patches it gives at given settings, from its first bytes only; and `--scan`, which
//! streams every patch through the real source stage to measure it.

use std::fmt::Write as _;

use arrow::array::Array;
use std::io::Cursor;
use std::time::Instant;

use object_store::path::Path;

use super::stream::{HEAD_BYTES, SourceItem, StreamConfig, stream_images};
use super::tiff::{self, TiffFile, compression_name};
use super::{Failure, ImageEntry};
use crate::patch::Grid;
use crate::storage::Location;

/// One level (or other directory) of an image.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelInfo {
    /// Pyramid level, or `None` for a TIFF directory that is not a level (thumbnail, label).
    pub level: Option<usize>,
    pub directory: Option<usize>,
    pub width: u32,
    pub height: u32,
    /// `tiles WxH`, `strips of N rows`, or `whole image` (PNG, JPEG).
    pub layout: String,
    pub compression: String,
    pub channels: u16,
    /// Grid (rows, cols) at the inspected patch size and stride, if the level is big enough.
    pub grid: Option<(usize, usize)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImageInfo {
    pub url: String,
    pub bytes: u64,
    pub format: String,
    pub mpp: Option<f64>,
    pub levels: Vec<LevelInfo>,
}

impl ImageInfo {
    /// A plain-text report, one line per level.
    pub fn render(&self, patch: usize, stride: usize) -> String {
        let mut s = format!("{}\n  {}, {} bytes", self.url, self.format, self.bytes);
        if let Some(mpp) = self.mpp {
            let _ = write!(s, ", {mpp} microns/px at level 0");
        }
        let _ = writeln!(s, "\n  patches of {patch} px at stride {stride}:");
        for l in &self.levels {
            let name = match (l.level, l.directory) {
                (Some(level), Some(d)) => format!("level {level} (dir {d})"),
                (Some(level), None) => format!("level {level}"),
                (None, Some(d)) => format!("other (dir {d})"),
                (None, None) => "other".into(),
            };
            let grid = l.grid.map_or("smaller than a patch".to_string(), |(r, c)| {
                let n = r * c;
                format!("{n} patch{} ({r} x {c})", if n == 1 { "" } else { "es" })
            });
            let _ = writeln!(
                s,
                "  {name:<16} {:>6} x {:<6} {:<18} {:<20} {} ch  {grid}",
                l.width, l.height, l.layout, l.compression, l.channels
            );
        }
        s
    }
}

/// Why an object could not be inspected; each names the object.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("'{url}' is empty (0 bytes)")]
    Empty { url: String },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("'{url}': {source}")]
    Tiff {
        url: String,
        source: tiff::TiffError,
    },
    #[error("'{url}' is not an image: expected PNG, JPEG or TIFF content")]
    NotAnImage { url: String },
    #[error("'{url}': cannot read the {format} header: {source}")]
    Header {
        url: String,
        format: &'static str,
        source: image::ImageError,
    },
}

/// Inspect one object of `size` bytes (from a listing or a HEAD) from its first bytes (one
/// request for most files; a TIFF whose directories lie elsewhere needs a few more).
pub async fn inspect(
    loc: &Location,
    path: &Path,
    size: u64,
    patch: usize,
    stride: usize,
) -> Result<ImageInfo, InspectError> {
    let url = loc.url_of(path);
    if size == 0 {
        return Err(InspectError::Empty { url });
    }
    let head = loc.get_range(path, 0..size.min(HEAD_BYTES)).await?;
    let grid = |w: u32, h: u32| {
        Grid::new(w as usize, h as usize, patch, stride)
            .ok()
            .map(|g| (g.rows, g.cols))
    };
    if tiff::is_tiff(&head) {
        let file = TiffFile::open(loc, path, size, head)
            .await
            .map_err(|source| InspectError::Tiff {
                url: url.clone(),
                source,
            })?;
        let levels = file
            .directories
            .iter()
            .map(|d| LevelInfo {
                level: file.levels.iter().position(|&i| i == d.index),
                directory: Some(d.index),
                width: d.width,
                height: d.height,
                layout: if d.tiled {
                    format!("tiles {}x{}", d.chunk_width, d.chunk_height)
                } else {
                    format!("strips of {} rows", d.chunk_height)
                },
                compression: compression_name(d.compression),
                channels: d.samples,
                grid: grid(d.width, d.height),
            })
            .collect();
        return Ok(ImageInfo {
            url,
            bytes: size,
            format: format!("{}TIFF", if file.bigtiff { "Big" } else { "" }),
            mpp: file.mpp(),
            levels,
        });
    }
    // Guessing reads from memory: it cannot fail.
    let reader = image::ImageReader::new(Cursor::new(&head[..]))
        .with_guessed_format()
        .map_err(|_| InspectError::NotAnImage { url: url.clone() })?;
    let format = match reader.format() {
        Some(image::ImageFormat::Png) => "PNG",
        Some(image::ImageFormat::Jpeg) => "JPEG",
        _ => return Err(InspectError::NotAnImage { url }),
    };
    let decoder = reader
        .into_decoder()
        .map_err(|source| InspectError::Header {
            url: url.clone(),
            format,
            source,
        })?;
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    let channels = image::ImageDecoder::color_type(&decoder).channel_count() as u16;
    Ok(ImageInfo {
        url,
        bytes: size,
        format: format.into(),
        mpp: None,
        levels: vec![LevelInfo {
            level: Some(0),
            directory: None,
            width: w,
            height: h,
            layout: "whole image".into(),
            compression: format.into(),
            channels,
            grid: grid(w, h),
        }],
    })
}

/// What streaming every patch of some images cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScanReport {
    pub images: usize,
    pub failures: Vec<Failure>,
    pub patches: usize,
    /// Patches that passed the foreground filter (carry pixels).
    pub kept: usize,
    pub mean_fg_fraction: f64,
    /// Decoded pixel bytes of the patches that carried pixels.
    pub pixel_bytes: u64,
    pub seconds: f64,
}

/// Stream every patch of `entries` and count what came out.
pub async fn scan_entries(
    loc: &Location,
    entries: Vec<ImageEntry>,
    config: StreamConfig,
) -> ScanReport {
    let start = Instant::now();
    let mut report = ScanReport {
        images: entries.len(),
        ..Default::default()
    };
    let mut rx = stream_images(loc.clone(), entries, config);
    let mut fg_sum = 0.0;
    while let Some(item) = rx.recv().await {
        match item {
            SourceItem::Failed(f) => report.failures.push(f),
            SourceItem::Batch(b) => {
                let batch = &b.batch;
                let fg = batch
                    .column_by_name("fg_fraction")
                    .and_then(|c| c.as_any().downcast_ref::<arrow::array::Float32Array>())
                    .expect("patch schema has fg_fraction");
                fg_sum += fg.values().iter().map(|&v| v as f64).sum::<f64>();
                let pixels = batch
                    .column_by_name("pixels")
                    .and_then(|c| c.as_any().downcast_ref::<arrow::array::BinaryArray>())
                    .expect("patch schema has pixels");
                report.patches += batch.num_rows();
                for i in 0..pixels.len() {
                    if pixels.is_valid(i) {
                        report.kept += 1;
                        report.pixel_bytes += pixels.value_length(i) as u64;
                    }
                }
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.mean_fg_fraction = if report.patches > 0 {
        fg_sum / report.patches as f64
    } else {
        0.0
    };
    report
}
