//! TIFF and SVS: the directories are parsed once, then each grid row is cut into segments of
//! [`SEGMENT_PX`](super::stream::SEGMENT_PX) columns whose tiles are fetched by byte range and
//! decoded on the blocking pool, so memory stays flat in image size.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};

use super::ImageEntry;
use super::stream::{
    Bands, Read, StreamConfig, blocking, check_declared_size, cut_of, failed, failure,
    geometry_segment, key_of, panicked, ready_bands, select_cells,
};
use super::tiff::chunk::Region;
use super::tiff::{self, TiffError, TiffFile};
use super::whole::cut_raster;
use crate::patch::{Grid, Raster, segment_batch};
use crate::storage::Location;

/// Parse a TIFF's directories, choose the level, and plan one band future per grid row.
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
    let level = match config.target_mpp {
        Some(mpp) => match file.level_for_mpp(mpp) {
            Some(l) => l,
            None => {
                return failed(failure(
                    &entry,
                    "decode",
                    format!("target_mpp {mpp} given but the TIFF states no MPP; use source.level"),
                ));
            }
        },
        None => config.level,
    };
    let dir = match file.level(level).and_then(|d| {
        tiff::chunk::check_supported(d)?;
        Ok(d.clone())
    }) {
        Ok(d) => d,
        Err(e) => return failed(failure(&entry, "decode", e.to_string())),
    };
    let (width, height) = (dir.width as usize, dir.height as usize);
    if let Err(message) =
        check_declared_size(width, height, config.channels, config.resize_to.is_some())
    {
        return failed(failure(
            &entry,
            "decode",
            format!("level {level}: {message}"),
        ));
    }
    let file = Arc::new(file);
    if let Some(size) = config.resize_to {
        // Whole-image input (GD): read the level at once, then resize like a PNG.
        let result = tiff::read_rows(&images, &file, level, 0, height, config.channels).await;
        return match result {
            Err(e) => failed(failure(&entry, stage_of(&e), e.to_string())),
            Ok(pixels) => {
                let e = entry.clone();
                let cut = blocking(&entry, move || {
                    let img = crate::source::decode::resize(
                        &pixels,
                        width,
                        height,
                        config.channels,
                        size,
                    );
                    cut_raster(
                        &e,
                        &img,
                        size as usize,
                        size as usize,
                        &config,
                        level as u32,
                        None,
                    )
                })
                .await;
                match cut {
                    Ok(bands) => ready_bands(bands.into_iter().map(Ok).collect()),
                    Err(f) => failed(f),
                }
            }
        };
    }
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
    let key = Arc::new(key_of(&entry));
    let mask = match select_cells(&config, &key, &grid, level as u32) {
        Ok(m) => m.map(Arc::new),
        Err(f) => return failed(failure(&entry, "select", f)),
    };
    if config.read > Read::Geometry && mask.as_ref().is_none_or(|m| m.iter().any(|&c| c)) {
        config.counters.decoded.add(1);
    }
    let entry = Arc::new(entry);
    let dir = Arc::new(dir);
    // Segments of SEGMENT_PX columns keep each unit of work (and its memory) the same size
    // whatever the image width. Made lazily: a 100k px slide has thousands.
    let per_segment = (config.segment_px / grid.stride).max(1);
    let segments = grid.cols.div_ceil(per_segment);
    futures::stream::iter(0..grid.rows * segments)
        .map(move |i| {
            let (row, segment) = (i / segments, i % segments);
            let cols = segment * per_segment..((segment + 1) * per_segment).min(grid.cols);
            let (images, file, config, key, entry, dir, mask) = (
                images.clone(),
                file.clone(),
                config.clone(),
                key.clone(),
                entry.clone(),
                dir.clone(),
                mask.clone(),
            );
            let (id, url) = (entry.image_id.clone(), entry.url.clone());
            AssertUnwindSafe(async move {
                let wanted = mask
                    .as_ref()
                    .is_none_or(|m| cols.clone().any(|c| m[grid.index(row, c)]));
                if config.read == Read::Geometry || !wanted {
                    let cut = cut_of(&config, level as u32, mask.as_deref().map(|m| &m[..]));
                    return Ok(geometry_segment(&key, &grid, row, cols, &cut, &config));
                }
                let (x0, y0) = grid.origin(row, cols.start);
                let right = (grid.origin(row, cols.end - 1).0 + grid.patch).min(width);
                let region = Region {
                    x: x0,
                    y: y0,
                    width: right - x0,
                    height: grid.patch.min(height - y0),
                };
                let chunks = tiff::chunk::fetch_region(&images, &file, level, region)
                    .await
                    .map_err(|e| failure(&entry, stage_of(&e), e.to_string()))?;
                let e = entry.clone();
                blocking(&entry, move || {
                    let pixels =
                        tiff::chunk::assemble_region(&dir, level, &chunks, region, config.channels)
                            .map_err(|err| failure(&e, stage_of(&err), err.to_string()))?;
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
                    let cut = cut_of(&config, level as u32, mask.as_deref().map(|m| &m[..]));
                    Ok(segment_batch(&key, &grid, row, cols, Some(&raster), &cut))
                })
                .await
            })
            .catch_unwind()
            .map(move |r| r.unwrap_or_else(|p| Err(panicked(id, url, "reading", p))))
            .boxed()
        })
        .boxed()
}

/// Error table stage: a failed request is `read`, anything about the content is `decode`.
fn stage_of(e: &TiffError) -> &'static str {
    match e {
        TiffError::Storage(_) => "read",
        _ => "decode",
    }
}
