//! PNG and JPEG: one request for the whole object, cut into one band per grid row. A PNG is
//! decoded row by row as its bands are asked for (memory: the compressed object and one band);
//! a JPEG, an interlaced PNG and an image to be resized are decoded whole, within
//! [`MAX_WHOLE_IMAGE_BYTES`](super::stream::MAX_WHOLE_IMAGE_BYTES).

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use bytes::Bytes;

use futures::{FutureExt, StreamExt};
use tokio::sync::oneshot;

use super::decode::decode;
use super::png_rows::{self, PngRows};
use super::stream::{
    Bands, MAX_WHOLE_IMAGE_BYTES, Read, StreamConfig, blocking, check_declared_size, cut_of,
    failed, failure, geometry_segment, key_of, ready_bands, select_cells,
};
use super::{Failure, ImageEntry};
use crate::patch::{Grid, Raster, patch_schema, segment_batch};
use crate::storage::Location;

/// A PNG or JPEG: decoded whole on the blocking pool, then cut into bands. Geometry comes from
/// the header alone where that is all the consumer needs.
pub(super) async fn open_whole(
    images: Location,
    entry: ImageEntry,
    config: Arc<StreamConfig>,
    head: Bytes,
) -> Bands {
    if config.level > 0 || config.target_mpp.is_some() {
        return failed(failure(
            &entry,
            "decode",
            format!(
                "PNG and JPEG images have one level; source.level {} / target_mpp needs a pyramidal TIFF",
                config.level
            ),
        ));
    }
    let by_rows = png_rows::streams_by_rows(&head)
        && config.resize_to.is_none()
        && header_dimensions(&head).is_some_and(|(w, h)| {
            (w as u64 * h as u64).saturating_mul(config.channels as u64)
                > config.png_rows_above_bytes
        });
    // The size the header declares, checked before the rest is fetched or anything decoded.
    if let Some((width, height)) = header_dimensions(&head) {
        let checked = check_declared_size(width, height, config.channels, !by_rows)
            .and_then(|()| check_band(width, height, &config, by_rows));
        if let Err(message) = checked {
            return failed(failure(&entry, "decode", message));
        }
    }
    // Geometry from the header alone, where that is all the consumer needs.
    let mut selected = None;
    if config.read == Read::Geometry || config.select.is_some() {
        let dims = match config.resize_to {
            Some(s) => Some((s as usize, s as usize)),
            None => header_dimensions(&head),
        };
        if let Some((width, height)) = dims {
            let grid = match Grid::new(width, height, config.patch, config.stride) {
                Ok(g) => g,
                Err(e) => return failed(failure(&entry, "patch", e.to_string())),
            };
            let key = key_of(&entry);
            let mask = match select_cells(&config, &key, &grid, 0) {
                Ok(m) => m,
                Err(f) => return failed(failure(&entry, "select", f)),
            };
            let wanted = mask.as_ref().is_none_or(|m| m.iter().any(|&c| c));
            if config.read == Read::Geometry || !wanted {
                let cut = cut_of(&config, 0, mask.as_deref());
                let bands = (0..grid.rows)
                    .map(|row| {
                        Ok(geometry_segment(
                            &key,
                            &grid,
                            row,
                            0..grid.cols,
                            &cut,
                            &config,
                        ))
                    })
                    .collect();
                return ready_bands(bands);
            }
            selected = mask;
        }
    }
    let bytes = if (head.len() as u64) < entry.size {
        match images
            .get_range(&entry.path, head.len() as u64..entry.size)
            .await
        {
            Ok(rest) => Bytes::from([head, rest].concat()),
            Err(e) => return failed(failure(&entry, "read", e.to_string())),
        }
    } else {
        head
    };
    config.counters.decoded.add(1);
    if by_rows && let Some((width, height)) = header_dimensions(&bytes) {
        return match Grid::new(width, height, config.patch, config.stride) {
            Ok(grid) => png_bands(entry, bytes, config, selected, grid.rows),
            Err(e) => failed(failure(&entry, "patch", e.to_string())),
        };
    }
    let e = entry.clone();
    match blocking(&entry, move || {
        cut_whole(&e, &bytes, &config, selected.as_deref())
    })
    .await
    {
        Ok(bands) => ready_bands(bands.into_iter().map(Ok).collect()),
        Err(f) => failed(f),
    }
}

/// A band (one grid row of patches across the image) must fit what a whole image may take
/// decoded: that is what a PNG read row by row holds at once.
fn check_band(
    width: usize,
    height: usize,
    config: &StreamConfig,
    by_rows: bool,
) -> Result<(), String> {
    let band = (width as u64)
        .saturating_mul(config.patch.min(height) as u64)
        .saturating_mul(config.channels as u64);
    if by_rows && band > MAX_WHOLE_IMAGE_BYTES {
        return Err(format!(
            "declares {width} x {height} pixels: one band of {} px patches across it would take {} MiB decoded, more than {} MiB",
            config.patch,
            band >> 20,
            MAX_WHOLE_IMAGE_BYTES >> 20
        ));
    }
    Ok(())
}

/// A PNG's `rows` bands (one per grid row), decoded row by row on the blocking pool. Each
/// band's future does its own work when polled, as a TIFF segment's does, so that the stream's
/// `buffered` stage decodes several images at once; the bands of one image take turns, each
/// handing the decoder to the next through a channel (a failure is handed on too, so every
/// later band reports it, and the stream keeps one).
fn png_bands(
    entry: ImageEntry,
    bytes: Bytes,
    config: Arc<StreamConfig>,
    selected: Option<Vec<bool>>,
    rows: usize,
) -> Bands {
    type Turn = Result<PngBands, Failure>;
    let (first, mut previous) = oneshot::channel::<Turn>();
    let _ = first.send(Ok(PngBands {
        bytes,
        opened: None,
        selected,
        next: 0,
    }));
    let entry = Arc::new(entry);
    futures::stream::iter(0..rows)
        .map(move |_| {
            let (hand_on, next) = oneshot::channel::<Turn>();
            let mine = std::mem::replace(&mut previous, next);
            let (entry, config) = (entry.clone(), config.clone());
            async move {
                let mut state = match mine.await {
                    Ok(Ok(state)) => state,
                    Ok(Err(f)) => {
                        let _ = hand_on.send(Err(f.clone()));
                        return Err(f);
                    }
                    Err(_) => {
                        let f = failure(&entry, "decode", "the previous band was dropped".into());
                        let _ = hand_on.send(Err(f.clone()));
                        return Err(f);
                    }
                };
                let e = entry.clone();
                let step = blocking(&entry, move || {
                    let batch = state.next_band(&e, &config)?;
                    Ok((batch, state))
                })
                .await;
                match step {
                    Ok((batch, state)) => {
                        let _ = hand_on.send(Ok(state));
                        Ok(batch)
                    }
                    Err(f) => {
                        let _ = hand_on.send(Err(f.clone()));
                        Err(f)
                    }
                }
            }
            .boxed()
        })
        .boxed()
}

/// Where a PNG read row by row has got to.
struct PngBands {
    bytes: Bytes,
    /// The decoder and the image's grid, from the first band on.
    opened: Option<(PngRows, Grid)>,
    selected: Option<Vec<bool>>,
    /// The grid row the next call cuts.
    next: usize,
}

impl PngBands {
    /// Cut the next grid row (opening the PNG on the first call).
    fn next_band(
        &mut self,
        entry: &ImageEntry,
        config: &StreamConfig,
    ) -> Result<RecordBatch, Failure> {
        let key = key_of(entry);
        let (png, grid) = match &mut self.opened {
            Some(opened) => opened,
            None => {
                let png = PngRows::open(self.bytes.clone(), config.channels)
                    .map_err(|m| failure(entry, "decode", m))?;
                let grid = Grid::new(png.width, png.height, config.patch, config.stride)
                    .map_err(|e| failure(entry, "patch", e.to_string()))?;
                if self.selected.is_none() && config.select.is_some() {
                    self.selected = select_cells(config, &key, &grid, 0)
                        .map_err(|m| failure(entry, "select", m))?;
                }
                self.opened.insert((png, grid))
            }
        };
        let row = self.next;
        self.next += 1;
        let selected = self.selected.as_deref();
        if row >= grid.rows
            || config.drop_unselected
                && selected.is_some_and(|s| (0..grid.cols).all(|c| !s[grid.index(row, c)]))
        {
            return Ok(RecordBatch::new_empty(patch_schema()));
        }
        let top = grid.origin(row, 0).1;
        let (width, height) = (png.width, png.height);
        let pixels = png
            .rows(top, grid.patch)
            .map_err(|m| failure(entry, "decode", m))?;
        let raster = Raster {
            pixels,
            left: 0,
            top,
            width,
            rows: pixels.len() / (width * config.channels),
            image_width: width,
            image_height: height,
            channels: config.channels,
        };
        let cut = cut_of(config, 0, selected);
        Ok(segment_batch(
            &key,
            grid,
            row,
            0..grid.cols,
            Some(&raster),
            &cut,
        ))
    }
}

/// Width and height from a PNG or JPEG header, if the first bytes hold it.
fn header_dimensions(head: &[u8]) -> Option<(usize, usize)> {
    // A PNG states its size in the first chunk, IHDR, at a fixed place: read it there, so that
    // even a file cut short after its header is checked.
    if head.len() >= 24 && head.starts_with(b"\x89PNG\r\n\x1a\n") && &head[12..16] == b"IHDR" {
        let be =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        return Some((be(16) as usize, be(20) as usize));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(head))
        .with_guessed_format()
        .ok()?;
    let (w, h) = reader.into_dimensions().ok()?;
    Some((w as usize, h as usize))
}

/// Decode a whole PNG/JPEG and cut it into band batches.
fn cut_whole(
    entry: &ImageEntry,
    bytes: &[u8],
    config: &StreamConfig,
    selected: Option<&[bool]>,
) -> Result<Vec<RecordBatch>, Failure> {
    let img = decode(bytes, config.channels, config.resize_to)
        .map_err(|e| failure(entry, "decode", e.to_string()))?;
    cut_raster(
        entry,
        &img.pixels,
        img.width,
        img.height,
        config,
        0,
        selected,
    )
}

pub(super) fn cut_raster(
    entry: &ImageEntry,
    pixels: &[u8],
    width: usize,
    height: usize,
    config: &StreamConfig,
    level: u32,
    selected: Option<&[bool]>,
) -> Result<Vec<RecordBatch>, Failure> {
    let grid = Grid::new(width, height, config.patch, config.stride)
        .map_err(|e| failure(entry, "patch", e.to_string()))?;
    let raster = Raster::whole(pixels, width, height, config.channels);
    let key = key_of(entry);
    // Not chosen before decoding (the header did not give the size): choose now.
    let computed;
    let selected = match selected {
        None if config.select.is_some() => {
            computed = select_cells(config, &key, &grid, level)
                .map_err(|m| failure(entry, "select", m))?;
            computed.as_deref()
        }
        given => given,
    };
    let cut = cut_of(config, level, selected);
    Ok((0..grid.rows)
        .map(|row| {
            if config.drop_unselected
                && selected.is_some_and(|s| (0..grid.cols).all(|c| !s[grid.index(row, c)]))
            {
                return RecordBatch::new_empty(patch_schema());
            }
            segment_batch(&key, &grid, row, 0..grid.cols, Some(&raster), &cut)
        })
        .collect())
}
