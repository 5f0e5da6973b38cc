//! TIFF read by byte range: classic and BigTIFF, tiled or stripped, pyramidal (reduced-resolution
//! directories, Aperio SVS). Only the directories are parsed up front; pixels are read one band
//! of tiles at a time ([`read_rows`]), so a 100k-pixel slide never sits in memory whole.
//!
//! Compression: none, LZW, Deflate, JPEG (including shared `JPEGTables`, as in SVS). Anything
//! else (JPEG 2000 in some SVS files, for one) is refused with its name and code.

pub mod chunk;
pub mod write;

use std::collections::HashSet;
use std::ops::Range;

use bytes::Bytes;
use object_store::path::Path;

use crate::storage::{Location, StorageError};
pub use chunk::read_rows;

#[derive(Debug, thiserror::Error)]
pub enum TiffError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "truncated file: {what} at bytes {start}..{end} lies beyond the end of the object ({size} bytes)"
    )]
    Truncated {
        what: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("malformed TIFF: {0}")]
    Malformed(String),
    #[error("unsupported TIFF: {0}")]
    Unsupported(String),
    #[error("level {level}: tile {index} (row {row}, col {col}) is missing: {reason}")]
    MissingTile {
        level: usize,
        index: usize,
        row: usize,
        col: usize,
        reason: String,
    },
    #[error("level {level}: cannot decode tile {index}: {message}")]
    Decode {
        level: usize,
        index: usize,
        message: String,
    },
    #[error("level {level} requested; this image has {levels} level(s) (0..{})", levels - 1)]
    NoSuchLevel { level: usize, levels: usize },
}

pub type Result<T, E = TiffError> = std::result::Result<T, E>;

/// Does this look like a TIFF (classic or BigTIFF, either byte order)?
pub fn is_tiff(head: &[u8]) -> bool {
    head.len() >= 4
        && matches!(
            &head[..4],
            [b'I', b'I', 42, 0] | [b'M', b'M', 0, 42] | [b'I', b'I', 43, 0] | [b'M', b'M', 0, 43]
        )
}

/// One image file directory: an image (a pyramid level, a thumbnail, a label ...).
#[derive(Clone, Debug, PartialEq)]
pub struct Directory {
    /// Position in the file's directory chain.
    pub index: usize,
    pub width: u32,
    pub height: u32,
    pub samples: u16,
    pub bits: u16,
    pub compression: u16,
    pub photometric: u16,
    pub predictor: u16,
    pub planar: u16,
    pub tiled: bool,
    /// Tile size, or (width, rows per strip) for strips.
    pub chunk_width: u32,
    pub chunk_height: u32,
    pub offsets: Vec<u64>,
    pub byte_counts: Vec<u64>,
    pub jpeg_tables: Option<Bytes>,
    pub subfile_type: u32,
    pub description: Option<String>,
}

impl Directory {
    pub fn chunks_across(&self) -> usize {
        (self.width as usize).div_ceil(self.chunk_width as usize)
    }
    pub fn chunks_down(&self) -> usize {
        (self.height as usize).div_ceil(self.chunk_height as usize)
    }
    /// Rows that chunk row `row` really holds (the last strip may be short; tiles never are).
    pub fn chunk_rows(&self, row: usize) -> usize {
        let h = self.chunk_height as usize;
        if self.tiled {
            h
        } else {
            h.min(self.height as usize - row * h)
        }
    }
}

/// Compression names for messages.
pub fn compression_name(code: u16) -> String {
    let name = match code {
        1 => "none",
        2 => "CCITT RLE",
        3 => "CCITT Group 3",
        4 => "CCITT Group 4",
        5 => "LZW",
        6 => "old-style JPEG",
        7 => "JPEG",
        8 | 32946 => "Deflate",
        32773 => "PackBits",
        33003 | 33005 => "JPEG 2000 (Aperio)",
        34712 => "JPEG 2000",
        34887 => "LERC",
        34925 => "LZMA",
        50000 => "Zstandard",
        50001 | 34927 => "WebP",
        50002 => "JPEG XL",
        _ => "unknown",
    };
    format!("{name} ({code})")
}

/// The parsed directory chain of one TIFF object, and which directories form its pyramid.
#[derive(Clone, Debug)]
pub struct TiffFile {
    pub url: String,
    pub path: Path,
    pub size: u64,
    pub bigtiff: bool,
    pub little_endian: bool,
    pub directories: Vec<Directory>,
    /// Directory indices of the pyramid levels, finest first: directory 0, then every later
    /// tiled directory with the same samples and a smaller width (SVS thumbnails, labels and
    /// macro images are stripped and so are not levels).
    pub levels: Vec<usize>,
}

impl TiffFile {
    pub fn level(&self, level: usize) -> Result<&Directory> {
        self.levels
            .get(level)
            .map(|&d| &self.directories[d])
            .ok_or(TiffError::NoSuchLevel {
                level,
                levels: self.levels.len(),
            })
    }

    /// Microns per pixel of level 0, from an Aperio ImageDescription (`MPP = 0.4990`).
    pub fn mpp(&self) -> Option<f64> {
        let desc = self.directories.first()?.description.as_deref()?;
        desc.split('|').find_map(|part| {
            let (k, v) = part.split_once('=')?;
            (k.trim() == "MPP").then(|| v.trim().parse().ok())?
        })
    }

    /// The level whose resolution is closest to `target_mpp` (by ratio).
    pub fn level_for_mpp(&self, target_mpp: f64) -> Option<usize> {
        let base = self.mpp()?;
        let w0 = self.directories[0].width as f64;
        (0..self.levels.len()).min_by(|&a, &b| {
            let err = |l: usize| {
                let mpp = base * w0 / self.directories[self.levels[l]].width as f64;
                (mpp / target_mpp).ln().abs()
            };
            err(a).total_cmp(&err(b))
        })
    }

    /// Parse the header and every directory. `head` is the object's first bytes, already
    /// fetched (directories near the start are then read without another request).
    pub async fn open(loc: &Location, path: &Path, size: u64, head: Bytes) -> Result<Self> {
        let reader = RangeReader {
            loc,
            path,
            size,
            head,
        };
        let h = reader.read(0..8.min(size), "header").await?;
        if !is_tiff(&h) {
            return Err(TiffError::Malformed("not a TIFF header".into()));
        }
        let le = h[0] == b'I';
        let bo = ByteOrder(le);
        let bigtiff = bo.u16(&h[2..4]) == 43;
        let mut next = if bigtiff {
            let h = reader.read(0..16, "BigTIFF header").await?;
            if bo.u16(&h[4..6]) != 8 {
                return Err(TiffError::Malformed("BigTIFF offset size is not 8".into()));
            }
            bo.u64(&h[8..16])
        } else {
            bo.u32(&h[4..8]) as u64
        };
        let mut directories = Vec::new();
        let mut seen = HashSet::new();
        while next != 0 {
            if !seen.insert(next) || directories.len() >= 1024 {
                return Err(TiffError::Malformed(format!(
                    "directory chain loops or is too long at offset {next}"
                )));
            }
            let (dir, following) =
                read_directory(&reader, bo, bigtiff, next, directories.len()).await?;
            directories.push(dir);
            next = following;
        }
        if directories.is_empty() {
            return Err(TiffError::Malformed("no image directory".into()));
        }
        let mut levels = vec![0];
        for (i, d) in directories.iter().enumerate().skip(1) {
            let last = &directories[*levels.last().unwrap()];
            if d.tiled && d.samples == last.samples && d.width < last.width {
                levels.push(i);
            }
        }
        Ok(Self {
            url: loc.url_of(path),
            path: path.clone(),
            size,
            bigtiff,
            little_endian: le,
            directories,
            levels,
        })
    }
}

#[derive(Clone, Copy)]
pub(crate) struct ByteOrder(pub bool);

impl ByteOrder {
    pub fn u16(self, b: &[u8]) -> u16 {
        let a = [b[0], b[1]];
        if self.0 {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    }
    pub fn u32(self, b: &[u8]) -> u32 {
        let a = [b[0], b[1], b[2], b[3]];
        if self.0 {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    }
    pub fn u64(self, b: &[u8]) -> u64 {
        let a: [u8; 8] = b[..8].try_into().unwrap();
        if self.0 {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    }
}

/// Ranged reads of one object, checked against its size, served from the fetched head when
/// they fall inside it.
pub(crate) struct RangeReader<'a> {
    pub loc: &'a Location,
    pub path: &'a Path,
    pub size: u64,
    pub head: Bytes,
}

impl RangeReader<'_> {
    pub fn check(&self, range: &Range<u64>, what: &str) -> Result<()> {
        if range.end > self.size || range.start > range.end {
            return Err(TiffError::Truncated {
                what: what.to_string(),
                start: range.start,
                end: range.end,
                size: self.size,
            });
        }
        Ok(())
    }

    pub async fn read(&self, range: Range<u64>, what: &str) -> Result<Bytes> {
        self.check(&range, what)?;
        if range.end <= self.head.len() as u64 {
            return Ok(self.head.slice(range.start as usize..range.end as usize));
        }
        let bytes = self.loc.get_range(self.path, range.clone()).await?;
        if bytes.len() as u64 != range.end - range.start {
            // A store that answers a range short: as good as a truncated object.
            return Err(TiffError::Truncated {
                what: format!("{what} ({} bytes came back)", bytes.len()),
                start: range.start,
                end: range.end,
                size: self.size,
            });
        }
        Ok(bytes)
    }
}

const IMAGE_WIDTH: u16 = 256;
const IMAGE_LENGTH: u16 = 257;
const BITS_PER_SAMPLE: u16 = 258;
const COMPRESSION: u16 = 259;
const PHOTOMETRIC: u16 = 262;
const IMAGE_DESCRIPTION: u16 = 270;
const STRIP_OFFSETS: u16 = 273;
const SAMPLES_PER_PIXEL: u16 = 277;
const ROWS_PER_STRIP: u16 = 278;
const STRIP_BYTE_COUNTS: u16 = 279;
const PLANAR_CONFIG: u16 = 284;
const PREDICTOR: u16 = 317;
const TILE_WIDTH: u16 = 322;
const TILE_LENGTH: u16 = 323;
const TILE_OFFSETS: u16 = 324;
const TILE_BYTE_COUNTS: u16 = 325;
const JPEG_TABLES: u16 = 347;
const NEW_SUBFILE_TYPE: u16 = 254;

const WANTED: [u16; 18] = [
    IMAGE_WIDTH,
    IMAGE_LENGTH,
    BITS_PER_SAMPLE,
    COMPRESSION,
    PHOTOMETRIC,
    IMAGE_DESCRIPTION,
    STRIP_OFFSETS,
    SAMPLES_PER_PIXEL,
    ROWS_PER_STRIP,
    STRIP_BYTE_COUNTS,
    PLANAR_CONFIG,
    PREDICTOR,
    TILE_WIDTH,
    TILE_LENGTH,
    TILE_OFFSETS,
    TILE_BYTE_COUNTS,
    JPEG_TABLES,
    NEW_SUBFILE_TYPE,
];

fn type_size(t: u16) -> Option<u64> {
    Some(match t {
        1 | 2 | 6 | 7 => 1,
        3 | 8 => 2,
        4 | 9 | 11 | 13 => 4,
        5 | 10 | 12 | 16 | 17 | 18 => 8,
        _ => return None,
    })
}

/// One entry's raw value bytes and type.
struct Entry {
    tag: u16,
    kind: u16,
    count: u64,
    bytes: Bytes,
}

impl Entry {
    /// The entry's integers; a value whose bytes came back short yields only the whole ones.
    fn numbers(&self, bo: ByteOrder) -> Vec<u64> {
        let n = self.count as usize;
        let each = |size: usize, f: &dyn Fn(&[u8]) -> u64| -> Vec<u64> {
            self.bytes.chunks_exact(size).take(n).map(f).collect()
        };
        match self.kind {
            1 | 6 | 7 => each(1, &|b| b[0] as u64),
            3 | 8 => each(2, &|b| bo.u16(b) as u64),
            4 | 9 | 13 => each(4, &|b| bo.u32(b) as u64),
            16..=18 => each(8, &|b| bo.u64(b)),
            _ => Vec::new(),
        }
    }
}

async fn read_directory(
    reader: &RangeReader<'_>,
    bo: ByteOrder,
    bigtiff: bool,
    offset: u64,
    index: usize,
) -> Result<(Directory, u64)> {
    let what = format!("directory {index}");
    let (count_len, entry_len, inline, next_len) = if bigtiff {
        (8u64, 20u64, 8u64, 8u64)
    } else {
        (2, 12, 4, 4)
    };
    let end = |start: u64, len: u64| {
        start.checked_add(len).ok_or_else(|| {
            TiffError::Malformed(format!("{what} at offset {start}: length {len} overflows"))
        })
    };
    let c = reader.read(offset..end(offset, count_len)?, &what).await?;
    let count = if bigtiff {
        bo.u64(&c)
    } else {
        bo.u16(&c) as u64
    };
    if count == 0 || count > 4096 {
        return Err(TiffError::Malformed(format!(
            "directory {index} at offset {offset} claims {count} entries"
        )));
    }
    let body_start = end(offset, count_len)?;
    let body = reader
        .read(
            body_start..end(body_start, count * entry_len + next_len)?,
            &what,
        )
        .await?;
    let mut entries = Vec::new();
    let mut remote = Vec::new();
    for i in 0..count as usize {
        let e = &body[i * entry_len as usize..(i + 1) * entry_len as usize];
        let tag = bo.u16(&e[0..2]);
        if !WANTED.contains(&tag) {
            continue;
        }
        let kind = bo.u16(&e[2..4]);
        let n = if bigtiff {
            bo.u64(&e[4..12])
        } else {
            bo.u32(&e[4..8]) as u64
        };
        let Some(size) = type_size(kind).and_then(|s| s.checked_mul(n)) else {
            return Err(TiffError::Malformed(format!(
                "directory {index}: tag {tag} has unknown type {kind}"
            )));
        };
        let value = &e[if bigtiff { 12 } else { 8 }..];
        if size <= inline {
            entries.push(Entry {
                tag,
                kind,
                count: n,
                bytes: Bytes::copy_from_slice(&value[..size as usize]),
            });
        } else {
            let at = if bigtiff {
                bo.u64(value)
            } else {
                bo.u32(value) as u64
            };
            let range = at..end(at, size)?;
            reader.check(&range, &format!("{what} tag {tag}"))?;
            remote.push((tag, kind, n, range));
        }
    }
    // Out-of-line values (offset arrays, tables, description) in one coalesced request.
    let ranges: Vec<Range<u64>> = remote.iter().map(|r| r.3.clone()).collect();
    let all_in_head = ranges.iter().all(|r| r.end <= reader.head.len() as u64);
    let fetched = if all_in_head {
        ranges
            .iter()
            .map(|r| reader.head.slice(r.start as usize..r.end as usize))
            .collect()
    } else {
        reader.loc.get_ranges(reader.path, &ranges).await?
    };
    for ((tag, kind, count, _), bytes) in remote.into_iter().zip(fetched) {
        entries.push(Entry {
            tag,
            kind,
            count,
            bytes,
        });
    }
    let next_at = (count * entry_len) as usize;
    let next = if bigtiff {
        bo.u64(&body[next_at..])
    } else {
        bo.u32(&body[next_at..]) as u64
    };
    let get = |tag: u16| entries.iter().find(|e| e.tag == tag);
    let number = |tag: u16| get(tag).and_then(|e| e.numbers(bo).first().copied());
    let required = |tag: u16, name: &str| {
        number(tag).ok_or_else(|| TiffError::Malformed(format!("directory {index} has no {name}")))
    };
    let dimension = |tag: u16, name: &str| {
        let v = required(tag, name)?;
        u32::try_from(v).map_err(|_| {
            TiffError::Malformed(format!(
                "directory {index}: {name} {v} is not a 32-bit size"
            ))
        })
    };
    let width = dimension(IMAGE_WIDTH, "ImageWidth")?;
    let height = dimension(IMAGE_LENGTH, "ImageLength")?;
    let samples = number(SAMPLES_PER_PIXEL).unwrap_or(1) as u16;
    let tiled = get(TILE_OFFSETS).is_some();
    let (chunk_width, chunk_height, offsets, counts) = if tiled {
        (
            dimension(TILE_WIDTH, "TileWidth")?,
            dimension(TILE_LENGTH, "TileLength")?,
            get(TILE_OFFSETS).map(|e| e.numbers(bo)).unwrap_or_default(),
            get(TILE_BYTE_COUNTS)
                .map(|e| e.numbers(bo))
                .ok_or_else(|| {
                    TiffError::Malformed(format!("directory {index} has no TileByteCounts"))
                })?,
        )
    } else {
        let rows = number(ROWS_PER_STRIP)
            .unwrap_or(height as u64)
            .min(height as u64) as u32;
        (
            width,
            rows.max(1),
            get(STRIP_OFFSETS).map(|e| e.numbers(bo)).ok_or_else(|| {
                TiffError::Malformed(format!("directory {index} has neither tiles nor strips"))
            })?,
            get(STRIP_BYTE_COUNTS)
                .map(|e| e.numbers(bo))
                .ok_or_else(|| {
                    TiffError::Malformed(format!("directory {index} has no StripByteCounts"))
                })?,
        )
    };
    let dir = Directory {
        index,
        width,
        height,
        samples,
        bits: number(BITS_PER_SAMPLE).unwrap_or(1) as u16,
        compression: number(COMPRESSION).unwrap_or(1) as u16,
        photometric: number(PHOTOMETRIC).unwrap_or(if samples >= 3 { 2 } else { 1 }) as u16,
        predictor: number(PREDICTOR).unwrap_or(1) as u16,
        planar: number(PLANAR_CONFIG).unwrap_or(1) as u16,
        tiled,
        chunk_width,
        chunk_height,
        offsets,
        byte_counts: counts,
        jpeg_tables: get(JPEG_TABLES).map(|e| e.bytes.clone()),
        subfile_type: number(NEW_SUBFILE_TYPE).unwrap_or(0) as u32,
        description: get(IMAGE_DESCRIPTION).map(|e| {
            String::from_utf8_lossy(&e.bytes)
                .trim_end_matches('\0')
                .to_string()
        }),
    };
    if width == 0 || height == 0 {
        return Err(TiffError::Malformed(format!(
            "directory {index} has zero size ({width} x {height})"
        )));
    }
    if chunk_width == 0 || chunk_height == 0 {
        return Err(TiffError::Malformed(format!(
            "directory {index} has a zero tile or strip size"
        )));
    }
    let planes = if dir.planar == 2 { samples as usize } else { 1 };
    let expected = dir
        .chunks_across()
        .checked_mul(dir.chunks_down())
        .and_then(|n| n.checked_mul(planes))
        .unwrap_or(usize::MAX);
    if dir.offsets.len() < expected || dir.byte_counts.len() < expected {
        return Err(TiffError::Malformed(format!(
            "directory {index}: {} offsets and {} byte counts for {expected} tiles or strips",
            dir.offsets.len(),
            dir.byte_counts.len()
        )));
    }
    Ok((dir, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(index: usize, width: u32, description: Option<&str>) -> Directory {
        Directory {
            index,
            width,
            height: width,
            samples: 3,
            bits: 8,
            compression: 7,
            photometric: 2,
            predictor: 1,
            planar: 1,
            tiled: true,
            chunk_width: 256,
            chunk_height: 256,
            offsets: Vec::new(),
            byte_counts: Vec::new(),
            jpeg_tables: None,
            subfile_type: 0,
            description: description.map(str::to_string),
        }
    }

    #[test]
    fn target_mpp_picks_the_nearest_level_by_ratio() {
        let desc = "Aperio Image Library v12.0.15 |AppMag = 20|MPP = 0.5|Filename = x";
        let file = TiffFile {
            url: "memory://t/x.svs".into(),
            path: Path::from("x.svs"),
            size: 0,
            bigtiff: false,
            little_endian: true,
            directories: vec![
                dir(0, 8000, Some(desc)),
                dir(1, 2000, None),
                dir(2, 500, None),
            ],
            levels: vec![0, 1, 2],
        };
        assert_eq!(file.mpp(), Some(0.5));
        // Levels are 0.5, 2 and 8 microns per pixel.
        assert_eq!(file.level_for_mpp(0.25), Some(0));
        assert_eq!(file.level_for_mpp(1.5), Some(1));
        assert_eq!(file.level_for_mpp(5.0), Some(2));
        let mut no_mpp = file.clone();
        no_mpp.directories[0].description = None;
        assert_eq!(no_mpp.level_for_mpp(1.0), None);
        assert!(matches!(
            file.level(3),
            Err(TiffError::NoSuchLevel {
                level: 3,
                levels: 3
            })
        ));
    }

    #[test]
    fn headers_are_recognised_in_both_byte_orders_and_both_sizes() {
        assert!(is_tiff(b"II*\0rest"));
        assert!(is_tiff(b"MM\0*rest"));
        assert!(is_tiff(b"II+\0rest"));
        assert!(!is_tiff(b"\x89PNG\r\n"));
        assert!(!is_tiff(b"II"));
    }
}
