//! The spill format: one file per image grid, `MAGIC`, then the grid's shape, step tags and
//! floats, little-endian, checked on read so that a damaged file is a clear error.

use std::io::Write;
use std::path::Path;

use super::{LatentError, LatentGrid, Result};

/// A file name for an image id: bytes outside `[A-Za-z0-9_-]` become `%XX` (so no `/`, no `.`,
/// no `..`), long ids are shortened with a hash; always one plain name inside the directory.
pub fn file_name(image_id: &str) -> String {
    let mut name = String::with_capacity(image_id.len() + 8);
    for b in image_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    if name.len() > 180 {
        // FNV-1a over the whole id keeps distinct long ids distinct.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in image_id.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        name.truncate(150);
        name.push_str(&format!("~{h:016x}"));
    }
    name.push_str(".lat");
    name
}

const MAGIC: &[u8; 8] = b"PGDLAT01";

pub(super) fn write_grid(path: &Path, g: &LatentGrid) -> Result<()> {
    let io = |source| LatentError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut bytes = Vec::with_capacity(20 + g.bytes());
    bytes.extend_from_slice(MAGIC);
    for v in [g.rows, g.cols, g.dim] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    for s in &g.steps {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    for v in &g.values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(&bytes).map_err(io)
}

pub(super) fn read_grid(path: &Path) -> Result<LatentGrid> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LatentError::Io {
        path: shown.clone(),
        source,
    })?;
    let corrupt = |reason: String| LatentError::Corrupt {
        path: shown.clone(),
        reason,
    };
    if bytes.len() < 20 || &bytes[..8] != MAGIC {
        return Err(corrupt("no latent grid header".into()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let (rows, cols, dim) = (u32_at(8), u32_at(12), u32_at(16));
    let cells = (rows * cols) as usize;
    let expected = 20 + cells * 8 + cells * dim as usize * 4;
    if bytes.len() != expected {
        return Err(corrupt(format!(
            "{} bytes, expected {expected}",
            bytes.len()
        )));
    }
    let steps = bytes[20..20 + cells * 8]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let values = bytes[20 + cells * 8..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(LatentGrid {
        rows,
        cols,
        dim,
        values,
        steps,
    })
}
