//! Snapshots: the whole store as an Arrow IPC stream with one row per cell, written in pieces so
//! that a large store is never held in memory twice (what checkpoints write and SQL reads).

use std::io::Read;
use std::sync::Arc;

use arrow::array::{
    Array, FixedSizeListArray, Float32Array, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::{LatentError, LatentGrid, LatentStore, Result};

/// One row per cell: image_id, row, col, vector (D floats), writer_step.
pub fn latent_schema(dim: i32) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("row", DataType::UInt32, false),
        Field::new("col", DataType::UInt32, false),
        Field::new(
            "vector",
            DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, false)), dim),
            false,
        ),
        Field::new("writer_step", DataType::UInt64, false),
    ]))
}

impl LatentStore {
    /// The whole store as an Arrow IPC stream, in pieces (one per 64 images), so that a large
    /// store is never held in memory twice: what checkpoints write.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            store: self,
            ids: self.ids(),
            next: 0,
            writer: None,
            done: false,
        }
    }

    /// Write the snapshot's pieces to `sink`; returns the bytes written.
    pub fn write_snapshot(&self, mut sink: impl FnMut(Vec<u8>) -> Result<()>) -> Result<u64> {
        let mut total = 0;
        for piece in self.snapshot() {
            let piece = piece?;
            total += piece.len() as u64;
            sink(piece)?;
        }
        Ok(total)
    }

    /// Fill an empty store from a snapshot written by [`LatentStore::write_snapshot`].
    pub fn read_snapshot(&mut self, reader: impl Read) -> Result<()> {
        let stream = arrow::ipc::reader::StreamReader::try_new(reader, None)
            .map_err(|e| LatentError::Snapshot(e.to_string()))?;
        for batch in stream {
            let batch = batch.map_err(|e| LatentError::Snapshot(e.to_string()))?;
            for (id, grid) in batch_grids(&batch)? {
                self.put(&id, grid)?;
            }
        }
        Ok(())
    }
}

/// The pieces of a store's Arrow IPC stream (see [`LatentStore::snapshot`]).
pub struct Snapshot<'a> {
    store: &'a LatentStore,
    ids: Vec<String>,
    next: usize,
    writer: Option<arrow::ipc::writer::StreamWriter<Vec<u8>>>,
    done: bool,
}

impl Snapshot<'_> {
    fn step(&mut self) -> Result<Option<Vec<u8>>> {
        let err = |e: arrow::error::ArrowError| LatentError::Snapshot(e.to_string());
        if self.done {
            return Ok(None);
        }
        if self.writer.is_none() {
            let dim = match self.ids.first() {
                Some(id) => self.store.peek(id)?.expect("listed").dim as i32,
                None => 0,
            };
            self.writer = Some(
                arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &latent_schema(dim))
                    .map_err(err)?,
            );
        }
        let writer = self.writer.as_mut().expect("just made");
        if self.next < self.ids.len() {
            let group = &self.ids[self.next..(self.next + 64).min(self.ids.len())];
            self.next += group.len();
            let grids: Vec<(String, LatentGrid)> = group
                .iter()
                .map(|id| Ok((id.clone(), self.store.peek(id)?.expect("listed id exists"))))
                .collect::<Result<_>>()?;
            writer.write(&grids_batch(&grids)?).map_err(err)?;
        } else {
            writer.finish().map_err(err)?;
            self.done = true;
        }
        Ok(Some(std::mem::take(writer.get_mut())))
    }
}

impl Iterator for Snapshot<'_> {
    type Item = Result<Vec<u8>>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(piece) => piece.map(Ok),
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// Rows of consecutive cells of the given grids.
pub(super) fn grids_batch(grids: &[(String, LatentGrid)]) -> Result<RecordBatch> {
    let dim = grids.first().map_or(0, |g| g.1.dim) as i32;
    let (mut ids, mut rows, mut cols, mut steps, mut values) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (id, g) in grids {
        if g.dim as i32 != dim {
            return Err(LatentError::Shape {
                image_id: id.clone(),
                reason: format!("D = {} in a store of D = {dim}", g.dim),
            });
        }
        for cell in 0..g.cells() {
            ids.push(id.as_str());
            rows.push(cell as u32 / g.cols);
            cols.push(cell as u32 % g.cols);
            steps.push(g.steps[cell]);
        }
        values.extend_from_slice(&g.values);
    }
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let vectors =
        FixedSizeListArray::try_new(item, dim, Arc::new(Float32Array::from(values)), None)
            .map_err(|e| LatentError::Snapshot(e.to_string()))?;
    RecordBatch::try_new(
        latent_schema(dim),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(UInt32Array::from(rows)),
            Arc::new(UInt32Array::from(cols)),
            Arc::new(vectors),
            Arc::new(UInt64Array::from(steps)),
        ],
    )
    .map_err(|e| LatentError::Snapshot(e.to_string()))
}

/// Grids back from a batch of cell rows (cells of one image are consecutive, row-major).
pub(super) fn batch_grids(batch: &RecordBatch) -> Result<Vec<(String, LatentGrid)>> {
    let bad = |m: &str| LatentError::Snapshot(m.to_string());
    let ids = batch
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| bad("image_id is not Utf8"))?;
    let rows = batch
        .column(1)
        .as_any()
        .downcast_ref::<UInt32Array>()
        .ok_or_else(|| bad("row is not UInt32"))?;
    let cols = batch
        .column(2)
        .as_any()
        .downcast_ref::<UInt32Array>()
        .ok_or_else(|| bad("col is not UInt32"))?;
    let vectors = batch
        .column(3)
        .as_any()
        .downcast_ref::<FixedSizeListArray>()
        .ok_or_else(|| bad("vector is not a fixed-size list"))?;
    let steps = batch
        .column(4)
        .as_any()
        .downcast_ref::<UInt64Array>()
        .ok_or_else(|| bad("writer_step is not UInt64"))?;
    let dim = vectors.value_length() as usize;
    let flat = vectors
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| bad("vector items are not Float32"))?;
    let mut out: Vec<(String, LatentGrid)> = Vec::new();
    let mut i = 0;
    while i < batch.num_rows() {
        let id = ids.value(i);
        let mut j = i;
        while j < batch.num_rows() && ids.value(j) == id {
            j += 1;
        }
        let n_rows = (i..j).map(|k| rows.value(k)).max().unwrap_or(0) + 1;
        let n_cols = (i..j).map(|k| cols.value(k)).max().unwrap_or(0) + 1;
        let grid = LatentGrid {
            rows: n_rows,
            cols: n_cols,
            dim: dim as u32,
            values: flat.values()[i * dim..j * dim].to_vec(),
            steps: (i..j).map(|k| steps.value(k)).collect(),
        };
        grid.check(id)?;
        out.push((id.to_string(), grid));
        i = j;
    }
    Ok(out)
}
