//! A tiled pyramidal TIFF writer (classic or BigTIFF; none, LZW, Deflate or JPEG tiles), used
//! by `patchgd synth --format tiff` to make large test images on the fly.
//!
//! Layout: header, then per level its directory followed by its tiles. A level's tiles are
//! compressed in memory (all cores) before its directory is written, because the directory
//! holds their offsets; the file streams to the object store level by level, so memory is one
//! level's compressed tiles, never the decoded image.

use std::io::Write;

use bytes::Bytes;
use object_store::buffered::BufWriter;
use tokio::io::AsyncWriteExt;

use crate::storage::{Location, StorageError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileCompression {
    None,
    Lzw,
    Deflate,
    Jpeg { quality: u8 },
}

impl TileCompression {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "none" => Self::None,
            "lzw" => Self::Lzw,
            "deflate" => Self::Deflate,
            "jpeg" => Self::Jpeg { quality: 90 },
            _ => return None,
        })
    }
    fn code(self) -> u16 {
        match self {
            Self::None => 1,
            Self::Lzw => 5,
            Self::Deflate => 8,
            Self::Jpeg { .. } => 7,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PyramidSpec {
    /// (width, height) of each level, finest first.
    pub levels: Vec<(u32, u32)>,
    pub tile: u32,
    /// 1 (grey) or 3 (RGB).
    pub channels: u16,
    pub compression: TileCompression,
    pub bigtiff: bool,
    pub description: String,
}

impl PyramidSpec {
    /// Levels halving from `width` x `height` until one tile holds the whole level.
    pub fn halving(width: u32, height: u32, tile: u32) -> Vec<(u32, u32)> {
        let mut levels = vec![(width, height)];
        while let Some(&(w, h)) = levels.last() {
            if w <= tile && h <= tile {
                break;
            }
            levels.push((w.div_ceil(2), h.div_ceil(2)));
        }
        levels
    }
}

/// Compress one tile (tile x tile x channels bytes, zero-padded at the image edge).
pub fn compress_tile(
    pixels: &[u8],
    tile: u32,
    channels: u16,
    compression: TileCompression,
) -> Vec<u8> {
    match compression {
        TileCompression::None => pixels.to_vec(),
        TileCompression::Lzw => {
            weezl::encode::Encoder::with_tiff_size_switch(weezl::BitOrder::Msb, 8)
                .encode(pixels)
                .expect("LZW encoding of an in-memory buffer")
        }
        TileCompression::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(pixels).expect("Deflate into memory");
            e.finish().expect("Deflate into memory")
        }
        TileCompression::Jpeg { quality } => {
            let mut out = Vec::new();
            let color = if channels == 1 {
                image::ExtendedColorType::L8
            } else {
                image::ExtendedColorType::Rgb8
            };
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
                .encode(pixels, tile, tile, color)
                .expect("JPEG encoding of an in-memory tile");
            out
        }
    }
}

/// Write the pyramid to `relative` under `out`. `render(level, tile_x, tile_y)` returns one tile's
/// pixels (tile x tile x channels). Returns the bytes written.
pub async fn write_pyramid<F>(
    out: &Location,
    relative: &str,
    spec: &PyramidSpec,
    render: F,
) -> Result<u64, StorageError>
where
    F: Fn(usize, u32, u32) -> Vec<u8> + Sync,
{
    let path = out.path(relative);
    let url = out.url_of(&path);
    let mut writer = BufWriter::new(out.store.clone(), path);
    let io = |source: object_store::Error| StorageError::Io {
        action: "write",
        url: url.clone(),
        source,
    };
    let big = spec.bigtiff;
    let mut pos: u64 = if big { 16 } else { 8 };
    let mut header = Vec::new();
    if big {
        header.extend_from_slice(b"II");
        header.extend_from_slice(&43u16.to_le_bytes());
        header.extend_from_slice(&8u16.to_le_bytes());
        header.extend_from_slice(&0u16.to_le_bytes());
        header.extend_from_slice(&pos.to_le_bytes());
    } else {
        header.extend_from_slice(b"II");
        header.extend_from_slice(&42u16.to_le_bytes());
        header.extend_from_slice(&(pos as u32).to_le_bytes());
    }
    writer.put(Bytes::from(header)).await.map_err(io)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    for (level, &(width, height)) in spec.levels.iter().enumerate() {
        let across = width.div_ceil(spec.tile);
        let down = height.div_ceil(spec.tile);
        let coords: Vec<(u32, u32)> = (0..down)
            .flat_map(|ty| (0..across).map(move |tx| (tx, ty)))
            .collect();
        let per_thread = coords.len().div_ceil(threads).max(1);
        let tiles: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = coords
                .chunks(per_thread)
                .map(|part| {
                    let render = &render;
                    s.spawn(move || {
                        part.iter()
                            .map(|&(tx, ty)| {
                                let px = render(level, tx, ty);
                                compress_tile(&px, spec.tile, spec.channels, spec.compression)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("tile thread"))
                .collect()
        });
        let last = level + 1 == spec.levels.len();
        let ifd = build_directory(spec, level, width, height, pos, &tiles, last);
        pos += ifd.len() as u64;
        writer.put(Bytes::from(ifd)).await.map_err(io)?;
        for t in tiles {
            pos += t.len() as u64;
            writer.put(Bytes::from(t)).await.map_err(io)?;
        }
    }
    writer.shutdown().await.map_err(|e| {
        io(object_store::Error::Generic {
            store: "TIFF writer",
            source: Box::new(e),
        })
    })?;
    Ok(pos)
}

/// TIFF field types used here.
const ASCII: u16 = 2;
const SHORT: u16 = 3;
const LONG: u16 = 4;
const LONG8: u16 = 16;

/// A directory entry: tag, type, count, and the value's bytes (inline or out of line).
type Field = (u16, u16, u64, Vec<u8>);

/// The tags describing one level (all but the tile offsets and byte counts), sorted by tag.
fn level_entries(spec: &PyramidSpec, level: usize, width: u32, height: u32) -> Vec<Field> {
    let photometric = match (spec.channels, spec.compression) {
        (1, _) => 1u16,
        (_, TileCompression::Jpeg { .. }) => 6,
        _ => 2,
    };
    let mut entries: Vec<Field> = vec![
        (
            254,
            LONG,
            1,
            (if level == 0 { 0u32 } else { 1 }).to_le_bytes().to_vec(),
        ),
        (256, LONG, 1, width.to_le_bytes().to_vec()),
        (257, LONG, 1, height.to_le_bytes().to_vec()),
        (
            258,
            SHORT,
            spec.channels as u64,
            (0..spec.channels)
                .flat_map(|_| 8u16.to_le_bytes())
                .collect(),
        ),
        (
            259,
            SHORT,
            1,
            spec.compression.code().to_le_bytes().to_vec(),
        ),
        (262, SHORT, 1, photometric.to_le_bytes().to_vec()),
        (277, SHORT, 1, spec.channels.to_le_bytes().to_vec()),
        (284, SHORT, 1, 1u16.to_le_bytes().to_vec()),
        (322, LONG, 1, spec.tile.to_le_bytes().to_vec()),
        (323, LONG, 1, spec.tile.to_le_bytes().to_vec()),
    ];
    if level == 0 && !spec.description.is_empty() {
        let mut d = spec.description.clone().into_bytes();
        d.push(0);
        entries.push((270, ASCII, d.len() as u64, d));
    }
    entries.sort_by_key(|e| e.0);
    entries
}

/// The entry count and the entries, little-endian (without the next directory's offset).
fn encode_entries(fields: &[Field], big: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if big {
        out.extend((fields.len() as u64).to_le_bytes());
    } else {
        out.extend((fields.len() as u16).to_le_bytes());
    }
    for (tag, kind, count, value) in fields {
        out.extend(tag.to_le_bytes());
        out.extend(kind.to_le_bytes());
        if big {
            out.extend(count.to_le_bytes());
        } else {
            out.extend((*count as u32).to_le_bytes());
        }
        out.extend(value);
    }
    out
}

/// One directory at `at`, with its out-of-line values right after it and its tiles after those.
fn build_directory(
    spec: &PyramidSpec,
    level: usize,
    width: u32,
    height: u32,
    at: u64,
    tiles: &[Vec<u8>],
    last: bool,
) -> Vec<u8> {
    let big = spec.bigtiff;
    let offset_type = if big { LONG8 } else { LONG };
    let word = |v: u64| -> Vec<u8> {
        if big {
            v.to_le_bytes().to_vec()
        } else {
            (v as u32).to_le_bytes().to_vec()
        }
    };
    let entries = level_entries(spec, level, width, height);
    let n_entries = entries.len() + 2; // + TileOffsets, TileByteCounts
    let (count_len, entry_len, inline) = if big {
        (8u64, 20u64, 8usize)
    } else {
        (2, 12, 4)
    };
    let ifd_len = count_len + n_entries as u64 * entry_len + if big { 8 } else { 4 };
    let tile_count = tiles.len() as u64;
    let word_len = if big { 8 } else { 4 };
    // Out-of-line area: offsets array, counts array, then the other long values.
    let mut extra: Vec<u8> = Vec::new();
    let extra_at = at + ifd_len;
    let value_field = |data: &[u8], extra: &mut Vec<u8>| -> Vec<u8> {
        if data.len() <= inline {
            let mut v = data.to_vec();
            v.resize(inline, 0);
            v
        } else {
            let off = extra_at + extra.len() as u64;
            extra.extend_from_slice(data);
            if extra.len() % 2 == 1 {
                extra.push(0);
            }
            word(off)
        }
    };
    let mut fields: Vec<Field> = Vec::new();
    for (tag, kind, count, data) in &entries {
        fields.push((*tag, *kind, *count, value_field(data, &mut extra)));
    }
    // Tile data starts after the out-of-line area, which still needs the two arrays.
    let arrays_len = if tile_count as usize * word_len <= inline {
        0
    } else {
        2 * tile_count * word_len as u64
    };
    let data_start = extra_at + extra.len() as u64 + arrays_len;
    let mut offsets = Vec::new();
    let mut counts = Vec::new();
    let mut p = data_start;
    for t in tiles {
        offsets.extend(word(p));
        counts.extend(word(t.len() as u64));
        p += t.len() as u64;
    }
    fields.push((
        324,
        offset_type,
        tile_count,
        value_field(&offsets, &mut extra),
    ));
    fields.push((
        325,
        offset_type,
        tile_count,
        value_field(&counts, &mut extra),
    ));
    fields.sort_by_key(|f| f.0);
    let mut out = encode_entries(&fields, big);
    let next = if last { 0 } else { p };
    out.extend(word(next));
    debug_assert_eq!(out.len() as u64, ifd_len);
    out.extend(extra);
    debug_assert_eq!(at + out.len() as u64, data_start);
    out
}
