//! TIFF directories (IFDs): reading one by byte ranges, with every size and offset it declares
//! checked against the object before anything is fetched or allocated.

use std::ops::Range;

use bytes::Bytes;

use super::{ByteOrder, Directory, RangeReader, Result, TiffError};

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

/// Where one directory's parts lie: classic TIFF and BigTIFF differ only in these widths.
struct Layout {
    bigtiff: bool,
    /// The entry count.
    count_len: u64,
    entry_len: u64,
    /// Values up to this many bytes are stored in the entry itself.
    inline: u64,
    /// The offset of the next directory.
    next_len: u64,
}

impl Layout {
    fn of(bigtiff: bool) -> Self {
        let (count_len, entry_len, inline, next_len) = if bigtiff {
            (8, 20, 8, 8)
        } else {
            (2, 12, 4, 4)
        };
        Self {
            bigtiff,
            count_len,
            entry_len,
            inline,
            next_len,
        }
    }

    /// An offset or count field: 8 bytes in BigTIFF, 4 in classic TIFF.
    fn word(&self, bo: ByteOrder, b: &[u8]) -> u64 {
        if self.bigtiff {
            bo.u64(b)
        } else {
            bo.u32(b) as u64
        }
    }
}

/// Directory `index` at `offset`: its description, and the offset of the next one (0: none).
pub(super) async fn read_directory(
    reader: &RangeReader<'_>,
    bo: ByteOrder,
    bigtiff: bool,
    offset: u64,
    index: usize,
) -> Result<(Directory, u64)> {
    let (entries, next) = read_entries(reader, bo, &Layout::of(bigtiff), offset, index).await?;
    let dir = directory_of(&entries, bo, index)?;
    check_chunks(&dir)?;
    Ok((dir, next))
}

/// `start + len`, or an error naming what overflowed.
fn end_of(what: &str, start: u64, len: u64) -> Result<u64> {
    start.checked_add(len).ok_or_else(|| {
        TiffError::Malformed(format!("{what} at offset {start}: length {len} overflows"))
    })
}

/// The entries we use (tags in [`WANTED`]) with their values, fetching out-of-line values in
/// one coalesced request, and the next directory's offset.
async fn read_entries(
    reader: &RangeReader<'_>,
    bo: ByteOrder,
    layout: &Layout,
    offset: u64,
    index: usize,
) -> Result<(Vec<Entry>, u64)> {
    let what = format!("directory {index}");
    let end = |start: u64, len: u64| end_of(&what, start, len);
    let c = reader
        .read(offset..end(offset, layout.count_len)?, &what)
        .await?;
    let count = if layout.bigtiff {
        bo.u64(&c)
    } else {
        bo.u16(&c) as u64
    };
    if count == 0 || count > 4096 {
        return Err(TiffError::Malformed(format!(
            "directory {index} at offset {offset} claims {count} entries"
        )));
    }
    let body_start = end(offset, layout.count_len)?;
    let body_len = count * layout.entry_len + layout.next_len;
    let body = reader
        .read(body_start..end(body_start, body_len)?, &what)
        .await?;
    let mut entries = Vec::new();
    let mut remote = Vec::new();
    let entry_len = layout.entry_len as usize;
    for e in body[..count as usize * entry_len].chunks_exact(entry_len) {
        let tag = bo.u16(&e[0..2]);
        if !WANTED.contains(&tag) {
            continue;
        }
        let kind = bo.u16(&e[2..4]);
        let (n, value) = if layout.bigtiff {
            (bo.u64(&e[4..12]), &e[12..])
        } else {
            (bo.u32(&e[4..8]) as u64, &e[8..])
        };
        let Some(size) = type_size(kind).and_then(|s| s.checked_mul(n)) else {
            return Err(TiffError::Malformed(format!(
                "directory {index}: tag {tag} has unknown type {kind}"
            )));
        };
        if size <= layout.inline {
            entries.push(Entry {
                tag,
                kind,
                count: n,
                bytes: Bytes::copy_from_slice(&value[..size as usize]),
            });
        } else {
            let at = layout.word(bo, value);
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
    let next = layout.word(bo, &body[count as usize * entry_len..]);
    Ok((entries, next))
}

/// A directory from its entries: required tags present, sizes that fit 32 bits, defaults for
/// the rest as the TIFF specification gives them.
fn directory_of(entries: &[Entry], bo: ByteOrder, index: usize) -> Result<Directory> {
    let get = |tag: u16| entries.iter().find(|e| e.tag == tag);
    let number = |tag: u16| get(tag).and_then(|e| e.numbers(bo).first().copied());
    let malformed = |what: &str| TiffError::Malformed(format!("directory {index}{what}"));
    let required =
        |tag: u16, name: &str| number(tag).ok_or_else(|| malformed(&format!(" has no {name}")));
    let dimension = |tag: u16, name: &str| {
        let v = required(tag, name)?;
        u32::try_from(v).map_err(|_| malformed(&format!(": {name} {v} is not a 32-bit size")))
    };
    let width = dimension(IMAGE_WIDTH, "ImageWidth")?;
    let height = dimension(IMAGE_LENGTH, "ImageLength")?;
    let samples = number(SAMPLES_PER_PIXEL).unwrap_or(1) as u16;
    let tiled = get(TILE_OFFSETS).is_some();
    let numbers = |tag: u16, name: &str| {
        get(tag)
            .map(|e| e.numbers(bo))
            .ok_or_else(|| malformed(&format!(" has no {name}")))
    };
    let (chunk_width, chunk_height, offsets, byte_counts) = if tiled {
        (
            dimension(TILE_WIDTH, "TileWidth")?,
            dimension(TILE_LENGTH, "TileLength")?,
            get(TILE_OFFSETS).map(|e| e.numbers(bo)).unwrap_or_default(),
            numbers(TILE_BYTE_COUNTS, "TileByteCounts")?,
        )
    } else {
        let rows = number(ROWS_PER_STRIP)
            .unwrap_or(height as u64)
            .min(height as u64) as u32;
        (
            width,
            rows.max(1),
            get(STRIP_OFFSETS)
                .map(|e| e.numbers(bo))
                .ok_or_else(|| malformed(" has neither tiles nor strips"))?,
            numbers(STRIP_BYTE_COUNTS, "StripByteCounts")?,
        )
    };
    if width == 0 || height == 0 {
        return Err(malformed(&format!(" has zero size ({width} x {height})")));
    }
    if chunk_width == 0 || chunk_height == 0 {
        return Err(malformed(" has a zero tile or strip size"));
    }
    Ok(Directory {
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
        byte_counts,
        jpeg_tables: get(JPEG_TABLES).map(|e| e.bytes.clone()),
        subfile_type: number(NEW_SUBFILE_TYPE).unwrap_or(0) as u32,
        description: get(IMAGE_DESCRIPTION).map(|e| {
            String::from_utf8_lossy(&e.bytes)
                .trim_end_matches('\0')
                .to_string()
        }),
    })
}

/// Every tile or strip (per plane) must have an offset and a byte count.
fn check_chunks(dir: &Directory) -> Result<()> {
    let planes = if dir.planar == 2 {
        dir.samples as usize
    } else {
        1
    };
    let expected = dir
        .chunks_across()
        .checked_mul(dir.chunks_down())
        .and_then(|n| n.checked_mul(planes))
        .unwrap_or(usize::MAX);
    if dir.offsets.len() < expected || dir.byte_counts.len() < expected {
        return Err(TiffError::Malformed(format!(
            "directory {}: {} offsets and {} byte counts for {expected} tiles or strips",
            dir.index,
            dir.offsets.len(),
            dir.byte_counts.len()
        )));
    }
    Ok(())
}
