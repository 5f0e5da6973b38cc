//! Which slices of the images a scan partition reads, carried as data.
//!
//! A scan node (`PatchesExec`, `ImagesExec`) has one child: an in-memory source with one
//! partition per slice, each holding that slice's index. Partition `p` of the scan reads the
//! slices its child's partition `p` holds. Locally that is slice `p`. On a Ballista cluster the
//! scheduler restricts each task's plan to the task's partitions by rewriting the in-memory
//! source (which it knows how to slice), so every slice is read by exactly one task: a scan
//! that kept the slice list to itself would be run whole by every task.

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, RecordBatch, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::{Result, internal_err};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use futures::TryStreamExt;

static SLICE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![Field::new(
        "slice",
        DataType::UInt32,
        false,
    )]))
});

/// An in-memory source of `n` partitions, partition `k` holding the slice index `k`.
pub fn slice_source(n: usize) -> Result<Arc<dyn ExecutionPlan>> {
    let partitions = (0..n as u32)
        .map(|k| {
            RecordBatch::try_new(
                SLICE_SCHEMA.clone(),
                vec![Arc::new(UInt32Array::from(vec![k]))],
            )
            .map(|b| vec![b])
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MemorySourceConfig::try_new_exec(
        &partitions,
        SLICE_SCHEMA.clone(),
        None,
    )?)
}

/// The slice indices partition `partition` of `input` holds, each below `slices`.
pub async fn slices_of(
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    context: Arc<TaskContext>,
    slices: usize,
) -> Result<Vec<usize>> {
    let batches: Vec<RecordBatch> = input.execute(partition, context)?.try_collect().await?;
    let mut out = Vec::new();
    for b in &batches {
        let Some(column) = b
            .column_by_name("slice")
            .and_then(|c| c.as_any().downcast_ref::<UInt32Array>())
        else {
            return internal_err!("a scan's slice source has no UInt32 'slice' column");
        };
        for k in column.iter().flatten() {
            if k as usize >= slices {
                return internal_err!("slice {k} of a scan of {slices} slices");
            }
            out.push(k as usize);
        }
    }
    Ok(out)
}
