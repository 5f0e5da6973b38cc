//! TIFF and SVS: the directories are parsed once, then each grid row is cut into segments of
//! [`SEGMENT_PX`](super::stream::SEGMENT_PX) columns whose tiles are fetched by byte range and
//! decoded on the blocking pool, so memory stays flat in image size.

use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};

use super::stream::{
    BandResult, Bands, Read, StreamConfig, blocking, check_declared_size, cut_of, failed, failure,
    geometry_segment, key_of, panicked, ready_bands, select_cells,
};
use super::tiff::chunk::Region;
use super::tiff::{self, Directory, TiffError, TiffFile};
use super::whole::cut_raster;
use super::{Failure, ImageEntry};
use crate::patch::{Grid, ImageKey, Raster, segment_batch};
use crate::storage::Location;

/// Parse a TIFF's directories, choose the level, and plan one band future per segment of each
/// grid row (or, for a whole-image input, read the level at once).
pub(super) async fn open_tiff(
    images: Location,
    entry: ImageEntry,
    config: Arc<StreamConfig>,
    head: bytes::Bytes,
) -> Bands {
    let file = match TiffFile::open(&images, &entry.path, entry.size, head).await {
        Ok(f) => f,
        Err(e) => return failed(failure(&entry, stage_of(&e), e.to_string())),
    };
    let (level, dir) = match choose_level(&file, &entry, &config) {
        Ok(chosen) => chosen,
        Err(f) => return failed(f),
    };
    let file = Arc::new(file);
    match config.resize_to {
        Some(size) => resized_level(images, file, level, dir, entry, config, size).await,
        None => segment_bands(images, file, level, dir, entry, config),
    }
}

/// The level to read (`source.level`, or the one nearest `target_mpp`), if it can be read and
/// its declared size is within the limits.
pub(super) fn choose_level(
    file: &TiffFile,
    entry: &ImageEntry,
    config: &StreamConfig,
) -> Result<(usize, Directory), Failure> {
    let level = match config.target_mpp {
        Some(mpp) => file.level_for_mpp(mpp).ok_or_else(|| {
            failure(
                entry,
                "decode",
                format!("target_mpp {mpp} given but the TIFF states no MPP; use source.level"),
            )
        })?,
        None => config.level,
    };
    let dir = file
        .level(level)
        .and_then(|d| {
            tiff::chunk::check_supported(d)?;
            Ok(d.clone())
        })
        .map_err(|e| failure(entry, "decode", e.to_string()))?;
    let (width, height) = (dir.width as usize, dir.height as usize);
    check_declared_size(width, height, config.channels, config.resize_to.is_some())
        .map_err(|message| failure(entry, "decode", format!("level {level}: {message}")))?;
    Ok((level, dir))
}

/// Whole-image input (GD): read the level at once, then resize and cut it like a PNG.
async fn resized_level(
    images: Location,
    file: Arc<TiffFile>,
    level: usize,
    dir: Directory,
    entry: ImageEntry,
    config: Arc<StreamConfig>,
    size: u32,
) -> Bands {
    let (width, height) = (dir.width as usize, dir.height as usize);
    let pixels = match tiff::read_rows(&images, &file, level, 0, height, config.channels).await {
        Ok(p) => p,
        Err(e) => return failed(failure(&entry, stage_of(&e), e.to_string())),
    };
    let e = entry.clone();
    let cut = blocking(&entry, move || {
        let img = crate::source::decode::resize(&pixels, width, height, config.channels, size);
        let side = size as usize;
        cut_raster(&e, &img, side, side, &config, level as u32, None)
    })
    .await;
    match cut {
        Ok(bands) => ready_bands(bands.into_iter().map(Ok).collect()),
        Err(f) => failed(f),
    }
}

/// What every segment of one image shares.
struct Image {
    images: Location,
    file: Arc<TiffFile>,
    level: usize,
    dir: Directory,
    grid: Grid,
    key: ImageKey,
    entry: ImageEntry,
    config: Arc<StreamConfig>,
    mask: Option<Vec<bool>>,
}

/// One band future per segment of `SEGMENT_PX` columns of each grid row, made lazily: a 100k px
/// slide has thousands. Segments keep each unit of work (and its memory) the same size
/// whatever the image width.
fn segment_bands(
    images: Location,
    file: Arc<TiffFile>,
    level: usize,
    dir: Directory,
    entry: ImageEntry,
    config: Arc<StreamConfig>,
) -> Bands {
    let (width, height) = (dir.width as usize, dir.height as usize);
    let grid = match Grid::new(width, height, config.patch, config.stride) {
        Ok(g) => g,
        Err(e) => {
            return failed(failure(
                &entry,
                "patch",
                format!("level {level} ({width} x {height}): {e}"),
            ));
        }
    };
    let key = key_of(&entry);
    let mask = match select_cells(&config, &key, &grid, level as u32) {
        Ok(m) => m,
        Err(f) => return failed(failure(&entry, "select", f)),
    };
    if config.read > Read::Geometry && mask.as_ref().is_none_or(|m| m.iter().any(|&c| c)) {
        config.counters.decoded.add(1);
    }
    let per_segment = (config.segment_px / grid.stride).max(1);
    let segments = grid.cols.div_ceil(per_segment);
    let rows = grid.rows;
    let image = Arc::new(Image {
        images,
        file,
        level,
        dir,
        grid,
        key,
        entry,
        config,
        mask,
    });
    futures::stream::iter(0..rows * segments)
        .map(move |i| {
            let (row, segment) = (i / segments, i % segments);
            let cols = segment * per_segment..((segment + 1) * per_segment).min(image.grid.cols);
            let (id, url) = (image.entry.image_id.clone(), image.entry.url.clone());
            AssertUnwindSafe(read_segment(image.clone(), row, cols))
                .catch_unwind()
                .map(move |r| r.unwrap_or_else(|p| Err(panicked(id, url, "reading", p))))
                .boxed()
        })
        .boxed()
}

/// Cells `cols` of grid row `row`: their tiles fetched by range, decoded and cut on the
/// blocking pool (or geometry only, when no pixels are wanted).
async fn read_segment(image: Arc<Image>, row: usize, cols: Range<usize>) -> BandResult {
    let (grid, config) = (&image.grid, &image.config);
    let level = image.level as u32;
    let wanted = image
        .mask
        .as_ref()
        .is_none_or(|m| cols.clone().any(|c| m[grid.index(row, c)]));
    if config.read == Read::Geometry || !wanted {
        let cut = cut_of(config, level, image.mask.as_deref());
        return Ok(geometry_segment(&image.key, grid, row, cols, &cut, config));
    }
    let (width, height) = (image.dir.width as usize, image.dir.height as usize);
    let (x0, y0) = grid.origin(row, cols.start);
    let right = (grid.origin(row, cols.end - 1).0 + grid.patch).min(width);
    let region = Region {
        x: x0,
        y: y0,
        width: right - x0,
        height: grid.patch.min(height - y0),
    };
    let chunks = tiff::chunk::fetch_region(&image.images, &image.file, image.level, region)
        .await
        .map_err(|e| failure(&image.entry, stage_of(&e), e.to_string()))?;
    let entry = image.entry.clone();
    blocking(&entry, move || {
        let config = &image.config;
        let pixels =
            tiff::chunk::assemble_region(&image.dir, image.level, &chunks, region, config.channels)
                .map_err(|err| failure(&image.entry, stage_of(&err), err.to_string()))?;
        let raster = Raster {
            pixels: &pixels,
            left: region.x,
            top: region.y,
            width: region.width,
            rows: region.height,
            image_width: width,
            image_height: height,
            channels: config.channels,
        };
        let cut = cut_of(config, level, image.mask.as_deref());
        Ok(segment_batch(
            &image.key,
            &image.grid,
            row,
            cols,
            Some(&raster),
            &cut,
        ))
    })
    .await
}

/// Error table stage: a failed request is `read`, anything about the content is `decode`.
fn stage_of(e: &TiffError) -> &'static str {
    match e {
        TiffError::Storage(_) => "read",
        _ => "decode",
    }
}
