//! Where an assembled image's patch pixels wait between the fill pass and the inner iterations.
//!
//! PatchGD reads every patch twice per outer step (fill, then once more with gradient), so an
//! image's patches must be kept until its step ends. Small images stay in memory; an image whose
//! pixels exceed the spool threshold goes to an unnamed temporary file (deleted by the OS when
//! the last handle closes, crash included), written and read one patch at a time. That keeps the
//! trainer's memory flat in image size: what is resident is one chunk of patches, not the image.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Cells x patch bytes, addressed by cell; cells never written read as zeros.
#[derive(Clone, Debug)]
pub struct Spool {
    file: Arc<File>,
    patch_bytes: usize,
    cells: usize,
}

impl Spool {
    /// An empty spool of `cells` patches, in the system temporary directory (`$TMPDIR`).
    pub fn new(cells: usize, patch_bytes: usize) -> io::Result<Self> {
        let file = tempfile::tempfile()?;
        // Sparse: absent cells cost no disk and read back as zeros.
        file.set_len((cells * patch_bytes) as u64)?;
        Ok(Self {
            file: Arc::new(file),
            patch_bytes,
            cells,
        })
    }

    /// A spool whose reads fail (a write-only file): how tests stand in for a disk error.
    #[cfg(test)]
    pub(crate) fn unreadable(cells: usize, patch_bytes: usize) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(tempfile::NamedTempFile::new()?.path())?;
        Ok(Self {
            file: Arc::new(file),
            patch_bytes,
            cells,
        })
    }

    pub fn write_cell(&self, cell: usize, bytes: &[u8]) -> io::Result<()> {
        assert!(cell < self.cells && bytes.len() == self.patch_bytes);
        self.file
            .write_all_at(bytes, (cell * self.patch_bytes) as u64)
    }

    pub fn read_cell(&self, cell: usize, out: &mut [u8]) -> io::Result<()> {
        assert!(cell < self.cells && out.len() == self.patch_bytes);
        self.file
            .read_exact_at(out, (cell * self.patch_bytes) as u64)
    }
}

/// An image's patch pixels (cells x patch x patch x channels, HWC per cell, zero where absent).
#[derive(Clone, Debug)]
pub enum PatchPixels {
    Memory(Vec<u8>),
    Spooled(Spool),
}

impl PatchPixels {
    /// Copy cell `cell` (of `patch_bytes`) into `out`.
    pub fn read_cell(&self, cell: usize, out: &mut [u8]) -> io::Result<()> {
        match self {
            Self::Memory(v) => {
                let n = out.len();
                out.copy_from_slice(&v[cell * n..(cell + 1) * n]);
                Ok(())
            }
            Self::Spooled(s) => s.read_cell(cell, out),
        }
    }

    /// The bytes, when they are in memory.
    pub fn memory(&self) -> Option<&[u8]> {
        match self {
            Self::Memory(v) => Some(v),
            Self::Spooled(_) => None,
        }
    }

    pub fn is_spooled(&self) -> bool {
        matches!(self, Self::Spooled(_))
    }
}

/// When an image goes to a spool file instead of memory.
#[derive(Clone, Debug)]
pub struct SpoolPolicy {
    /// Images with more patch bytes than this are spooled.
    pub above_bytes: usize,
}

impl Default for SpoolPolicy {
    /// Never spool (tests and tools that hold small images).
    fn default() -> Self {
        Self {
            above_bytes: usize::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_read_back_what_was_written_and_unwritten_cells_are_zero() {
        let s = Spool::new(4, 3).unwrap();
        s.write_cell(2, &[7, 8, 9]).unwrap();
        s.write_cell(0, &[1, 2, 3]).unwrap();
        let mut out = [0xffu8; 3];
        for (cell, want) in [
            (0, [1, 2, 3]),
            (1, [0, 0, 0]),
            (2, [7, 8, 9]),
            (3, [0, 0, 0]),
        ] {
            s.read_cell(cell, &mut out).unwrap();
            assert_eq!(out, want, "cell {cell}");
        }
        let p = PatchPixels::Spooled(s);
        p.read_cell(2, &mut out).unwrap();
        assert_eq!(out, [7, 8, 9]);
        assert!(p.is_spooled());
    }
}
