//! TIFF read by byte range: classic and BigTIFF, tiled or stripped, pyramidal (reduced-resolution
//! directories, Aperio SVS). Only the directories are parsed up front; pixels are read one band
//! of tiles at a time ([`read_rows`]), so a 100k-pixel slide never sits in memory whole.
//!
//! Compression: none, LZW, Deflate, JPEG (including shared `JPEGTables`, as in SVS). Anything
//! else (JPEG 2000 in some SVS files, for one) is refused with its name and code.

pub mod chunk;
mod directory;
pub mod write;

use std::collections::HashSet;
use std::ops::Range;

use bytes::Bytes;
use object_store::path::Path;

use crate::storage::{Location, StorageError};
pub use chunk::read_rows;
use directory::read_directory;

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
        // The magic alone is not a header: it goes on to the first directory's offset.
        let h = reader.read(0..8, "header").await?;
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

    /// Found by `scripts/fuzz` (tiff_directory): the magic and two more bytes, where the first
    /// directory's offset should be, made the parser index past the end of the header.
    #[tokio::test]
    async fn a_header_cut_short_after_the_magic_is_a_truncation_error() {
        let loc = Location::parse("memory://tiff-unit/short").unwrap();
        for bytes in [&b"II*\0\x08I"[..], b"MM\0*", b"II+\0\x08\0\0\0\x10"] {
            loc.put("x.tif", Bytes::copy_from_slice(bytes))
                .await
                .unwrap();
            let path = loc.path("x.tif");
            let head = Bytes::copy_from_slice(bytes);
            let Err(err) = TiffFile::open(&loc, &path, bytes.len() as u64, head).await else {
                panic!("{bytes:?}: a short header must be an error");
            };
            assert!(
                matches!(err, TiffError::Truncated { .. }),
                "{bytes:?}: {err}"
            );
        }
    }
}
