//! `patchgd.sql(query, ...)`: patchgd's SQL surface (the `patchgd sql` command) from Python,
//! in patchgd's own DataFusion session; the result comes back as Arrow.

use arrow::record_batch::RecordBatchIterator;
use patchgd::sql::{query, register, session_with_partitions};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors::{self, guard};
use crate::patches::{ArrowStream, Reporter};
use crate::tables::sources;

/// Runs one read-only query over the images under `images` (tables `images`, `patches`) and
/// the run directory `run` (`metrics`, `predictions`, `errors`, `heatmaps`, `latents`), as
/// `patchgd sql --images ... --run ...` does.
#[pyfunction]
#[pyo3(signature = (query_text, *, images=None, labels=None, patch=256, level=0, channels=3,
    run=None, storage=None, partitions=None, failures=None))]
#[allow(clippy::too_many_arguments)]
pub fn sql(
    py: Python<'_>,
    query_text: &str,
    images: Option<String>,
    labels: Option<String>,
    patch: usize,
    level: usize,
    channels: usize,
    run: Option<String>,
    storage: Option<&Bound<'_, PyDict>>,
    partitions: Option<usize>,
    failures: Option<Bound<'_, PyList>>,
) -> PyResult<ArrowStream> {
    guard("sql", || {
        let sources = sources(images, labels, patch, level, channels, run, storage)?;
        let partitions = partitions.unwrap_or_else(patchgd::sql::default_partitions);
        let result = py.detach(|| {
            crate::runtime().block_on(async {
                let ctx = session_with_partitions(partitions);
                let reported = register(&ctx, &sources).await?;
                let df = query(&ctx, query_text).await?;
                let schema = df.schema().as_arrow().clone();
                let batches = df.collect().await?;
                Ok::<_, datafusion::error::DataFusionError>((schema, batches, reported.take()))
            })
        });
        let (schema, batches, failed) = result.map_err(|e| errors::to_py(&e))?;
        let reporter = Reporter::new(failures.map(|l| l.unbind()));
        for f in &failed {
            reporter.report(py, f)?;
        }
        let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema.into());
        Ok(ArrowStream::new(Box::new(reader)))
    })
}
