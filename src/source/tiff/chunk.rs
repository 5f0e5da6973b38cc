//! Tiles and strips ("chunks"): fetch the ones a band of rows needs by byte range, decode them
//! (none, LZW, Deflate, JPEG with shared tables), and paste them into the band.

use std::io::Read;

use bytes::Bytes;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use super::{Directory, Result, TiffError, TiffFile, compression_name};
use crate::storage::Location;

/// The most bytes one tile or strip may decode to. Sizes come from the file, so they are
/// checked before anything is allocated: a few bytes may claim a strip of a terabyte.
pub const MAX_CHUNK_BYTES: u64 = 256 << 20;

/// Refuse what this reader cannot decode, before any pixel is fetched; the message says which.
pub fn check_supported(dir: &Directory) -> Result<()> {
    let unsupported = |m: String| Err(TiffError::Unsupported(m));
    let chunk_bytes = dir.chunk_width as u64 * dir.chunk_height as u64 * dir.samples.max(1) as u64;
    if chunk_bytes > MAX_CHUNK_BYTES {
        return unsupported(format!(
            "directory {} stores {} x {} pixel {} of {} MiB each; at most {} MiB is decoded at once",
            dir.index,
            dir.chunk_width,
            dir.chunk_height,
            if dir.tiled { "tiles" } else { "strips" },
            chunk_bytes >> 20,
            MAX_CHUNK_BYTES >> 20
        ));
    }
    if !matches!(dir.compression, 1 | 5 | 7 | 8 | 32946) {
        return unsupported(format!(
            "compression {} in directory {}; supported: none, LZW, Deflate, JPEG",
            compression_name(dir.compression),
            dir.index
        ));
    }
    if dir.bits != 8 {
        return unsupported(format!(
            "{} bits per sample in directory {}; only 8 is supported",
            dir.bits, dir.index
        ));
    }
    if dir.planar != 1 {
        return unsupported(format!(
            "separate colour planes (PlanarConfiguration {}) in directory {}",
            dir.planar, dir.index
        ));
    }
    if !matches!(dir.samples, 1 | 3 | 4) {
        return unsupported(format!(
            "{} samples per pixel in directory {}; expected 1, 3 or 4",
            dir.samples, dir.index
        ));
    }
    if !matches!(dir.photometric, 0..=2 | 6) || (dir.photometric == 6 && dir.compression != 7) {
        return unsupported(format!(
            "photometric interpretation {} in directory {}; supported: grey, RGB, JPEG YCbCr",
            dir.photometric, dir.index
        ));
    }
    if !matches!(dir.predictor, 1 | 2) {
        return unsupported(format!(
            "predictor {} in directory {}",
            dir.predictor, dir.index
        ));
    }
    Ok(())
}

/// A decoded chunk: `rows` x `width` x `samples` bytes.
pub struct Chunk {
    pub pixels: Vec<u8>,
    pub width: usize,
    pub rows: usize,
    pub samples: usize,
}

/// Decode chunk `index` of `dir` from its stored bytes.
pub fn decode_chunk(dir: &Directory, level: usize, index: usize, data: &[u8]) -> Result<Chunk> {
    let err = |message: String| TiffError::Decode {
        level,
        index,
        message,
    };
    let width = dir.chunk_width as usize;
    let rows = dir.chunk_rows(index / dir.chunks_across());
    if dir.compression == 7 {
        let (pixels, w, h, samples) = decode_jpeg(dir, data).map_err(err)?;
        if (w, h) == (width, rows) {
            return Ok(Chunk {
                pixels,
                width,
                rows,
                samples,
            });
        }
        if w < width.min(dir.width as usize) || h < rows.min(dir.height as usize) {
            return Err(err(format!("JPEG is {w} x {h}, expected {width} x {rows}")));
        }
        // Larger than the chunk (padded strips): keep the chunk's part.
        let mut out = vec![0u8; width * rows * samples];
        // A tile past the level's edge may be stored cropped: its rows beyond `h` stay zero.
        for y in 0..rows.min(h) {
            let n = width.min(w) * samples;
            out[y * width * samples..y * width * samples + n]
                .copy_from_slice(&pixels[y * w * samples..y * w * samples + n]);
        }
        return Ok(Chunk {
            pixels: out,
            width,
            rows,
            samples,
        });
    }
    let samples = dir.samples as usize;
    let expected = width * rows * samples;
    let mut raw = match dir.compression {
        1 => data.to_vec(),
        5 => lzw_at_most(data, expected).map_err(err)?,
        8 | 32946 => {
            // No more than the chunk holds: a few bytes of Deflate can expand a thousandfold.
            let mut out = Vec::with_capacity(expected);
            flate2::read::ZlibDecoder::new(data)
                .take(expected as u64)
                .read_to_end(&mut out)
                .map_err(|e| err(format!("Deflate: {e}")))?;
            out
        }
        other => {
            return Err(TiffError::Unsupported(format!(
                "compression {}",
                compression_name(other)
            )));
        }
    };
    if raw.len() < expected {
        return Err(err(format!(
            "short tile: {} bytes decoded, expected {expected} ({width} x {rows} x {samples})",
            raw.len()
        )));
    }
    raw.truncate(expected);
    if dir.predictor == 2 {
        for row in raw.chunks_exact_mut(width * samples) {
            for i in samples..row.len() {
                row[i] = row[i].wrapping_add(row[i - samples]);
            }
        }
    }
    if dir.photometric == 0 {
        raw.iter_mut().for_each(|v| *v = 255 - *v);
    }
    Ok(Chunk {
        pixels: raw,
        width,
        rows,
        samples,
    })
}

/// Decode TIFF LZW into at most `limit` bytes (the chunk's size), however far the codes would
/// expand. A stream without an end code ends where its bytes do, as libtiff reads it.
fn lzw_at_most(data: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut decoder = weezl::decode::Decoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8);
    let mut out = vec![0u8; limit];
    let (mut read, mut written) = (0, 0);
    while written < limit {
        let step = decoder.decode_bytes(&data[read..], &mut out[written..]);
        read += step.consumed_in;
        written += step.consumed_out;
        match step.status {
            Ok(weezl::LzwStatus::Ok) if step.consumed_in + step.consumed_out > 0 => {}
            Ok(_) => break,
            Err(e) => return Err(format!("LZW: {e}")),
        }
    }
    out.truncate(written);
    Ok(out)
}

/// Decode a JPEG tile or strip, with the directory's shared tables spliced in. Returns
/// (pixels, width, height, samples) with 1 sample for grey, 3 for colour.
fn decode_jpeg(dir: &Directory, data: &[u8]) -> Result<(Vec<u8>, usize, usize, usize), String> {
    let mut stream = Vec::with_capacity(data.len() + 1024);
    match &dir.jpeg_tables {
        Some(tables) if tables.len() >= 4 => {
            // tables = SOI, DQT/DHT..., EOI; tile = SOI, SOF, SOS...: one stream.
            let t = if tables.ends_with(&[0xFF, 0xD9]) {
                &tables[..tables.len() - 2]
            } else {
                &tables[..]
            };
            stream.extend_from_slice(t);
            stream.extend_from_slice(data.strip_prefix(&[0xFF, 0xD8]).unwrap_or(data));
        }
        _ => stream.extend_from_slice(data),
    }
    let colour = dir.samples >= 3;
    if colour && dir.photometric == 2 {
        // TIFF says the samples are RGB (Aperio): decode without a YCbCr transform, as libtiff
        // does. Decoders take component ids 'R','G','B' to mean exactly that.
        mark_rgb_components(&mut stream);
    }
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(if colour {
            ColorSpace::RGB
        } else {
            ColorSpace::Luma
        })
        // The chunk's size and some padding (strips are stored whole MCUs high): a header
        // that claims more is refused before its pixels are allocated.
        .set_max_width(dir.chunk_width as usize + 64)
        .set_max_height(dir.chunk_height as usize + 64);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(&stream), options);
    let pixels = decoder.decode().map_err(|e| format!("JPEG: {e:?}"))?;
    let info = decoder.info().ok_or("JPEG: no frame header")?;
    let (w, h) = (info.width as usize, info.height as usize);
    let samples = if colour { 3 } else { 1 };
    if pixels.len() < w * h * samples {
        return Err(format!(
            "JPEG: {} bytes decoded for {w} x {h}",
            pixels.len()
        ));
    }
    Ok((pixels, w, h, samples))
}

/// Rename a 3-component frame's component ids to 'R', 'G', 'B' (in the frame header and the
/// first scan header) so that no colour transform is applied.
fn mark_rgb_components(jpeg: &mut [u8]) {
    let mut ids = [0u8; 3];
    let mut p = 2;
    while p + 4 <= jpeg.len() {
        if jpeg[p] != 0xFF {
            return;
        }
        let marker = jpeg[p + 1];
        let len = u16::from_be_bytes([jpeg[p + 2], jpeg[p + 3]]) as usize;
        let body = p + 4;
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof && body + 6 <= jpeg.len() && jpeg[body + 5] == 3 {
            for (i, new) in [b'R', b'G', b'B'].into_iter().enumerate() {
                let at = body + 6 + i * 3;
                if at < jpeg.len() {
                    ids[i] = jpeg[at];
                    jpeg[at] = new;
                }
            }
        } else if marker == 0xDA {
            let ns = jpeg.get(body).copied().unwrap_or(0) as usize;
            for i in 0..ns {
                let at = body + 1 + i * 2;
                if at < jpeg.len()
                    && let Some(k) = ids.iter().position(|&id| id == jpeg[at])
                {
                    jpeg[at] = [b'R', b'G', b'B'][k];
                }
            }
            return;
        }
        p += 2 + len;
    }
}

/// Convert `n` pixels from `from` samples (1 grey, 3 RGB, 4 RGBA) to `to` channels (1 or 3).
pub fn convert_pixels(src: &[u8], from: usize, dst: &mut [u8], to: usize, n: usize) {
    match (from, to) {
        (a, b) if a == b => dst[..n * a].copy_from_slice(&src[..n * a]),
        (1, 3) => {
            for (d, &s) in dst[..n * 3].chunks_exact_mut(3).zip(&src[..n]) {
                d[0] = s;
                d[1] = s;
                d[2] = s;
            }
        }
        (f, 1) => {
            for i in 0..n {
                let p = &src[i * f..];
                dst[i] = ((299 * p[0] as u32 + 587 * p[1] as u32 + 114 * p[2] as u32 + 500) / 1000)
                    as u8;
            }
        }
        (f, 3) => {
            for i in 0..n {
                dst[i * 3..i * 3 + 3].copy_from_slice(&src[i * f..i * f + 3]);
            }
        }
        _ => unreachable!("channels are 1 or 3"),
    }
}

/// A window of a level, in pixels (clipped to the level by the readers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// The stored bytes of the chunks under `region` of `level`, by byte range (one coalesced
/// request for neighbouring chunks).
pub async fn fetch_region(
    loc: &Location,
    file: &TiffFile,
    level: usize,
    region: Region,
) -> Result<Vec<(usize, Bytes)>> {
    let dir = file.level(level)?;
    check_supported(dir)?;
    let (cw, ch) = (dir.chunk_width as usize, dir.chunk_height as usize);
    let across = dir.chunks_across();
    let bottom = (region.y + region.height).min(dir.height as usize);
    let right = (region.x + region.width).min(dir.width as usize);
    if region.y >= bottom || region.x >= right {
        return Ok(Vec::new());
    }
    let mut indices = Vec::new();
    let mut ranges = Vec::new();
    for r in region.y / ch..bottom.div_ceil(ch) {
        for c in region.x / cw..right.div_ceil(cw) {
            let index = r * across + c;
            let (offset, count) = (dir.offsets[index], dir.byte_counts[index]);
            if offset == 0 || count == 0 {
                return Err(TiffError::MissingTile {
                    level,
                    index,
                    row: r,
                    col: c,
                    reason: format!("offset {offset}, byte count {count}"),
                });
            }
            let range = offset..offset.saturating_add(count);
            if range.end > file.size {
                return Err(TiffError::Truncated {
                    what: format!("level {level} tile {index} (row {r}, col {c})"),
                    start: range.start,
                    end: range.end,
                    size: file.size,
                });
            }
            indices.push(index);
            ranges.push(range);
        }
    }
    let bytes = loc.get_ranges(&file.path, &ranges).await?;
    Ok(indices.into_iter().zip(bytes).collect())
}

/// Decode the fetched chunks and paste the parts inside `region` into a `region.width` x
/// `region.height` x `channels` buffer; pixels outside the level stay zero.
pub fn assemble_region(
    dir: &Directory,
    level: usize,
    chunks: &[(usize, Bytes)],
    region: Region,
    channels: usize,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; region.width * region.height * channels];
    let across = dir.chunks_across();
    let bottom = (region.y + region.height).min(dir.height as usize);
    let right = (region.x + region.width).min(dir.width as usize);
    for (index, data) in chunks {
        let chunk = decode_chunk(dir, level, *index, data)?;
        let (r, c) = (index / across, index % across);
        let cx0 = c * dir.chunk_width as usize;
        // Columns of this chunk inside the region and the level.
        let x_from = cx0.max(region.x);
        let x_to = (cx0 + chunk.width).min(right);
        if x_from >= x_to {
            continue;
        }
        for yy in 0..chunk.rows {
            let y = r * dir.chunk_height as usize + yy;
            if y < region.y || y >= bottom {
                continue;
            }
            let src = &chunk.pixels[(yy * chunk.width + x_from - cx0) * chunk.samples..];
            let at = ((y - region.y) * region.width + x_from - region.x) * channels;
            convert_pixels(src, chunk.samples, &mut out[at..], channels, x_to - x_from);
        }
    }
    Ok(out)
}

/// Rows `y0..y0 + h` of `level`, full width (fetch and decode in the calling task; the source
/// stage splits the two so that decoding runs on the blocking pool).
pub async fn read_rows(
    loc: &Location,
    file: &TiffFile,
    level: usize,
    y0: usize,
    h: usize,
    channels: usize,
) -> Result<Vec<u8>> {
    let dir = file.level(level)?;
    let region = Region {
        x: 0,
        y: y0,
        width: dir.width as usize,
        height: h,
    };
    let chunks = fetch_region(loc, file, level, region).await?;
    assemble_region(dir, level, &chunks, region, channels)
}
