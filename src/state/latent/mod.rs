//! The latent store: each image's latent grid Z (rows x cols cells of D floats), every cell
//! tagged with the optimizer step whose weights computed it.
//!
//! Grids live in memory up to a byte budget (this module: the cache); beyond it the least
//! recently used ones spill to files in a local directory ([`spill`]: one file per image, named
//! by an encoding of the image id that cannot leave the directory). A snapshot is an Arrow IPC
//! stream with one row per cell ([`snapshot`], [`latent_schema`]): what checkpoints store and
//! what SQL reads.

mod snapshot;
mod spill;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use arrow::record_batch::RecordBatch;

pub use snapshot::{Snapshot, latent_schema};
pub use spill::file_name;

use snapshot::grids_batch;
use spill::{read_grid, write_grid};

#[derive(Debug, thiserror::Error)]
pub enum LatentError {
    #[error("latent store file '{path}': {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("latent store file '{path}' is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("latent grid of '{image_id}': {reason}")]
    Shape { image_id: String, reason: String },
    #[error("latent snapshot: {0}")]
    Snapshot(String),
}

pub type Result<T, E = LatentError> = std::result::Result<T, E>;

/// One image's Z: `values` is cells x dim (cell (r, c) at r * cols + c), `steps` one per cell.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentGrid {
    pub rows: u32,
    pub cols: u32,
    pub dim: u32,
    pub values: Vec<f32>,
    pub steps: Vec<u64>,
}

impl LatentGrid {
    pub fn cells(&self) -> usize {
        (self.rows * self.cols) as usize
    }
    /// Bytes this grid takes in memory.
    pub fn bytes(&self) -> usize {
        self.values.len() * 4 + self.steps.len() * 8
    }
    fn check(&self, image_id: &str) -> Result<()> {
        let cells = self.cells();
        if self.values.len() != cells * self.dim as usize || self.steps.len() != cells {
            return Err(LatentError::Shape {
                image_id: image_id.into(),
                reason: format!(
                    "{} values and {} steps for {} x {} cells of {}",
                    self.values.len(),
                    self.steps.len(),
                    self.rows,
                    self.cols,
                    self.dim
                ),
            });
        }
        Ok(())
    }
}

struct Resident {
    grid: LatentGrid,
    last_use: u64,
}

/// Grids by image id, in memory within `budget_bytes`, spilling to `dir`.
pub struct LatentStore {
    budget_bytes: usize,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    memory: HashMap<String, Resident>,
    spilled: BTreeSet<String>,
    memory_bytes: usize,
    clock: u64,
    /// Grids written to disk so far (a measure of spilling).
    pub spills: u64,
}

impl LatentStore {
    /// A store that spills to `dir` (created if missing), or to a fresh temporary directory.
    pub fn new(budget_bytes: usize, dir: Option<&Path>) -> Result<Self> {
        let (dir, temp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|source| LatentError::Io {
                    path: d.display().to_string(),
                    source,
                })?;
                (d.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("patchgd-latents-")
                    .tempdir()
                    .map_err(|source| LatentError::Io {
                        path: std::env::temp_dir().display().to_string(),
                        source,
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        Ok(Self {
            budget_bytes,
            dir,
            _temp: temp,
            memory: HashMap::new(),
            spilled: BTreeSet::new(),
            memory_bytes: 0,
            clock: 0,
            spills: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn len(&self) -> usize {
        self.memory.len() + self.spilled.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }
    pub fn spilled(&self) -> usize {
        self.spilled.len()
    }
    pub fn contains(&self, image_id: &str) -> bool {
        self.memory.contains_key(image_id) || self.spilled.contains(image_id)
    }

    /// Every image id, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .memory
            .keys()
            .chain(self.spilled.iter())
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    fn path_of(&self, image_id: &str) -> PathBuf {
        self.dir.join(file_name(image_id))
    }

    /// Store (or replace) an image's grid.
    pub fn put(&mut self, image_id: &str, grid: LatentGrid) -> Result<()> {
        grid.check(image_id)?;
        self.remove(image_id)?;
        self.clock += 1;
        self.memory_bytes += grid.bytes();
        self.memory.insert(
            image_id.to_string(),
            Resident {
                grid,
                last_use: self.clock,
            },
        );
        self.enforce_budget(image_id)
    }

    /// An image's grid (read back from disk if it was spilled; it becomes resident again).
    pub fn get(&mut self, image_id: &str) -> Result<Option<LatentGrid>> {
        self.clock += 1;
        if let Some(r) = self.memory.get_mut(image_id) {
            r.last_use = self.clock;
            return Ok(Some(r.grid.clone()));
        }
        if !self.spilled.contains(image_id) {
            return Ok(None);
        }
        let grid = read_grid(&self.path_of(image_id))?;
        self.spilled.remove(image_id);
        let _ = std::fs::remove_file(self.path_of(image_id));
        self.memory_bytes += grid.bytes();
        self.memory.insert(
            image_id.to_string(),
            Resident {
                grid: grid.clone(),
                last_use: self.clock,
            },
        );
        self.enforce_budget(image_id)?;
        Ok(Some(grid))
    }

    /// Forget an image's grid; true if there was one.
    pub fn remove(&mut self, image_id: &str) -> Result<bool> {
        if let Some(r) = self.memory.remove(image_id) {
            self.memory_bytes -= r.grid.bytes();
            return Ok(true);
        }
        if self.spilled.remove(image_id) {
            let path = self.path_of(image_id);
            std::fs::remove_file(&path).map_err(|source| LatentError::Io {
                path: path.display().to_string(),
                source,
            })?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Spill least recently used grids until the resident ones fit the budget (`keep` stays).
    fn enforce_budget(&mut self, keep: &str) -> Result<()> {
        while self.memory_bytes > self.budget_bytes && self.memory.len() > 1 {
            let victim = self
                .memory
                .iter()
                .filter(|(id, _)| id.as_str() != keep)
                .min_by_key(|(_, r)| r.last_use)
                .map(|(id, _)| id.clone())
                .expect("more than one resident grid");
            let r = self.memory.remove(&victim).expect("victim is resident");
            self.memory_bytes -= r.grid.bytes();
            write_grid(&self.path_of(&victim), &r.grid)?;
            self.spilled.insert(victim);
            self.spills += 1;
        }
        Ok(())
    }

    /// The store as record batches of one row per cell, `images_per_batch` images per batch, in
    /// image id order: the read interface for snapshots and SQL.
    pub fn batches(&self, images_per_batch: usize) -> Result<Vec<RecordBatch>> {
        let ids = self.ids();
        let mut out = Vec::new();
        for group in ids.chunks(images_per_batch.max(1)) {
            let grids: Vec<(String, LatentGrid)> = group
                .iter()
                .map(|id| Ok((id.clone(), self.peek(id)?.expect("listed id exists"))))
                .collect::<Result<_>>()?;
            out.push(grids_batch(&grids)?);
        }
        Ok(out)
    }

    /// Like `get`, without changing what is resident (snapshots must not thrash the cache).
    fn peek(&self, image_id: &str) -> Result<Option<LatentGrid>> {
        if let Some(r) = self.memory.get(image_id) {
            return Ok(Some(r.grid.clone()));
        }
        if self.spilled.contains(image_id) {
            return read_grid(&self.path_of(image_id)).map(Some);
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, UInt32Array};

    fn grid(seed: u32, rows: u32, cols: u32, dim: u32) -> LatentGrid {
        let cells = (rows * cols) as usize;
        LatentGrid {
            rows,
            cols,
            dim,
            values: (0..cells * dim as usize)
                .map(|i| (i as f32 * 0.37 + seed as f32).sin())
                .collect(),
            steps: (0..cells).map(|c| (seed as u64) * 100 + c as u64).collect(),
        }
    }

    #[test]
    fn grids_round_trip_through_memory_disk_and_snapshots() {
        let one = grid(1, 2, 3, 4).bytes();
        let mut store = LatentStore::new(one * 2, None).unwrap();
        for i in 0..5 {
            store.put(&format!("img/{i}"), grid(i, 2, 3, 4)).unwrap();
        }
        // Budget of two grids: three spilled, least recently used first.
        assert_eq!((store.len(), store.spilled()), (5, 3));
        assert!(store.memory_bytes() <= one * 2);
        assert_eq!(store.spills, 3);
        for i in 0..5 {
            assert_eq!(
                store.get(&format!("img/{i}")).unwrap(),
                Some(grid(i, 2, 3, 4))
            );
        }
        assert!(
            store.memory_bytes() <= one * 2,
            "reading back keeps the budget"
        );
        // Snapshot and restore.
        let mut bytes = Vec::new();
        store
            .write_snapshot(|piece| {
                bytes.extend(piece);
                Ok(())
            })
            .unwrap();
        let mut again = LatentStore::new(1 << 20, None).unwrap();
        again.read_snapshot(&bytes[..]).unwrap();
        assert_eq!(again.ids(), store.ids());
        for id in store.ids() {
            assert_eq!(again.get(&id).unwrap(), store.get(&id).unwrap());
        }
        // One row per cell, with the cell's coordinates and writer step.
        let batches = again.batches(10).unwrap();
        assert_eq!(batches[0].num_rows(), 5 * 6);
        let cols = batches[0]
            .column(2)
            .as_any()
            .downcast_ref::<UInt32Array>()
            .unwrap();
        assert_eq!(cols.values()[..6], [0, 1, 2, 0, 1, 2]);
        // Remove (evict) from memory and from disk.
        assert!(store.remove("img/0").unwrap());
        assert!(!store.remove("img/0").unwrap());
        assert_eq!(store.get("img/0").unwrap(), None);
        assert_eq!(store.len(), 4);
    }

    #[test]
    fn image_ids_cannot_escape_the_store_directory() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("store");
        let mut store = LatentStore::new(0, Some(&dir)).unwrap(); // budget 0: everything spills
        let long = "x/".repeat(400);
        let ids = [
            "../../etc/passwd",
            "a/b/../c",
            ".",
            "..",
            "/abs/path",
            "ünïcødé/日本/画像",
            "C:\\windows\\x",
            long.as_str(),
            "plain",
            "sp ace",
        ];
        for (i, id) in ids.iter().enumerate() {
            store.put(id, grid(i as u32, 1, 2, 3)).unwrap();
            store.put("other", grid(99, 1, 1, 3)).unwrap(); // pushes `id` to disk
        }
        assert_eq!(store.spilled(), ids.len());
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(
            files.len(),
            ids.len(),
            "one file per image, all directly in the store dir"
        );
        for f in &files {
            assert!(f.file_type().unwrap().is_file());
            let name = f.file_name().into_string().unwrap();
            assert!(
                !name.contains('/') && !name.starts_with('.') && name.len() < 200,
                "{name}"
            );
        }
        // Nothing was written next to the store directory.
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 1);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                store.get(id).unwrap(),
                Some(grid(i as u32, 1, 2, 3)),
                "{id}"
            );
        }
        assert_ne!(file_name("a/b"), file_name("a%2Fb"));
    }

    #[test]
    fn a_damaged_spill_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LatentStore::new(0, Some(dir.path())).unwrap();
        store.put("a", grid(1, 2, 2, 2)).unwrap();
        store.put("b", grid(2, 2, 2, 2)).unwrap();
        let path = dir.path().join(file_name("a"));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = store.get("a").unwrap_err().to_string();
        assert!(err.contains("a.lat") && err.contains("expected"), "{err}");
    }
}
