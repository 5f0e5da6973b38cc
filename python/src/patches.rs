//! `patchgd.patches(url, ...)`: the source stage's patch batches as an Arrow C stream.
//!
//! The same stage the pipelines and the `patches` table run (fetch, decode on a blocking pool,
//! cut, a buffer bounded in bytes), listed and labelled as `patchgd sql` does. An image that
//! cannot be read is reported (appended to the caller's `failures` list and logged to the
//! `patchgd` logger), or, with `strict`, ends the stream with an error naming it.

use std::ffi::CString;
use std::panic::{AssertUnwindSafe, catch_unwind};

use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::ffi_stream::FFI_ArrowArrayStream;
use arrow::record_batch::{RecordBatch, RecordBatchReader};
use patchgd::patch::{Foreground, patch_schema};
use patchgd::source::stream::Read;
use patchgd::source::{Failure, SourceItem, stream_images};
use patchgd::sql::DataSet;
use patchgd::storage::StoreOptions;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyList};
use tokio::sync::mpsc;

use crate::errors::{self, guard, msg};

/// An Arrow C stream, handed over once (the `__arrow_c_stream__` protocol, which pyarrow,
/// Polars, DuckDB and datafusion-python read).
#[pyclass(module = "patchgd._patchgd")]
pub struct ArrowStream {
    stream: std::sync::Mutex<Option<FFI_ArrowArrayStream>>,
}

impl ArrowStream {
    pub fn new(reader: Box<dyn RecordBatchReader + Send>) -> Self {
        Self {
            stream: std::sync::Mutex::new(Some(FFI_ArrowArrayStream::new(reader))),
        }
    }
}

#[pymethods]
impl ArrowStream {
    /// The stream as a capsule named `arrow_array_stream`; a second call is an error (a stream
    /// is read once).
    #[pyo3(signature = (requested_schema=None))]
    fn __arrow_c_stream__<'py>(
        &self,
        py: Python<'py>,
        requested_schema: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        // The schema is patchgd's own; a consumer that asks for another casts afterwards.
        let _ = requested_schema;
        let stream = self
            .stream
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| msg("this patch stream was already read; call patches() again"))?;
        let name = CString::new("arrow_array_stream").expect("no NUL");
        PyCapsule::new(py, stream, Some(name))
    }
}

/// Where each failure goes: the caller's list, the `patchgd` logger.
pub(crate) struct Reporter {
    failures: Option<Py<PyList>>,
}

impl Reporter {
    pub(crate) fn new(failures: Option<Py<PyList>>) -> Self {
        Self { failures }
    }

    pub(crate) fn report(&self, py: Python<'_>, f: &Failure) -> PyResult<()> {
        let row = PyDict::new(py);
        row.set_item("image_id", &f.image_id)?;
        row.set_item("url", &f.url)?;
        row.set_item("stage", &f.stage)?;
        row.set_item("message", &f.message)?;
        if let Some(list) = &self.failures {
            list.bind(py).append(row)?;
        }
        let logger = py
            .import("logging")?
            .call_method1("getLogger", ("patchgd",))?;
        logger.call_method1(
            "warning",
            (
                "image %s (%s) not read at %s: %s",
                &f.image_id,
                &f.url,
                &f.stage,
                &f.message,
            ),
        )?;
        Ok(())
    }
}

/// The source stage's receiving end, read by the consumer's thread.
struct PatchReader {
    rx: mpsc::Receiver<SourceItem>,
    schema: SchemaRef,
    reporter: Reporter,
    strict: bool,
}

impl PatchReader {
    fn next_batch(&mut self) -> Option<Result<RecordBatch, ArrowError>> {
        loop {
            // Wait without the GIL, on any thread (a consumer may call from its own runtime:
            // not tokio's block_on).
            let item =
                Python::attach(|py| py.detach(|| futures::executor::block_on(self.rx.recv())));
            match item? {
                SourceItem::Batch(b) => return Some(Ok(b.batch)),
                SourceItem::Failed(f) => {
                    let reported = Python::attach(|py| self.reporter.report(py, &f));
                    if self.strict {
                        self.rx.close();
                        return Some(Err(ArrowError::ExternalError(
                            format!(
                                "patchgd: image '{}' ({}) not read at {}: {}",
                                f.image_id, f.url, f.stage, f.message
                            )
                            .into(),
                        )));
                    }
                    if let Err(e) = reported {
                        return Some(Err(ArrowError::ExternalError(
                            format!("patchgd: reporting a failed image: {e}").into(),
                        )));
                    }
                }
            }
        }
    }
}

impl Iterator for PatchReader {
    type Item = Result<RecordBatch, ArrowError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Called through the C stream by the consumer: a panic must not unwind into it.
        match catch_unwind(AssertUnwindSafe(|| self.next_batch())) {
            Ok(item) => item,
            Err(panic) => Some(Err(ArrowError::ExternalError(
                format!(
                    "patchgd: internal error reading patches (a bug, please report it): {}",
                    errors::panic_text(&panic)
                )
                .into(),
            ))),
        }
    }
}

impl RecordBatchReader for PatchReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

/// What to read of each patch.
fn read_mode(read: &str) -> PyResult<Read> {
    match read {
        "pixels" => Ok(Read::Pixels),
        "statistics" => Ok(Read::Statistics),
        "geometry" => Ok(Read::Geometry),
        other => Err(msg(format!(
            "read='{other}': expected 'pixels', 'statistics' or 'geometry'"
        ))),
    }
}

/// The images under `url` cut into `patch` px patches at `level`, as every entry point
/// (`patches`, `sql`, `register`) takes them, with their arguments checked.
pub(crate) fn data_set(
    url: &str,
    patch: usize,
    level: usize,
    channels: usize,
    labels: Option<String>,
    storage: StoreOptions,
) -> PyResult<DataSet> {
    if patch == 0 {
        return Err(msg("patch and stride must be at least 1 pixel"));
    }
    if channels != 1 && channels != 3 {
        return Err(msg(format!(
            "channels={channels}: expected 1 (grey) or 3 (RGB)"
        )));
    }
    let mut data = DataSet::new(url, patch);
    data.labels = labels;
    data.storage = storage;
    data.stream.level = level;
    data.stream.channels = channels;
    Ok(data)
}

/// Object store settings from a dict of strings (the command line's `--storage KEY=VALUE`).
pub fn store_options(storage: Option<&Bound<'_, PyDict>>) -> PyResult<StoreOptions> {
    let mut pairs = vec![];
    if let Some(d) = storage {
        for (k, v) in d.iter() {
            pairs.push(format!("{}={}", k.str()?, v.str()?));
        }
    }
    StoreOptions::from_pairs(&pairs).map_err(|e| errors::to_py(&e))
}

/// The patches of every image under `url`, as an Arrow C stream (wrapped as a
/// `pyarrow.RecordBatchReader` by `patchgd.patches`).
#[pyfunction]
#[pyo3(signature = (url, patch=256, *, stride=None, level=0, channels=3, labels=None,
    foreground="220", min_fraction=0.0, read="pixels", workers=None, buffer_mib=64,
    storage=None, failures=None, strict=false))]
#[allow(clippy::too_many_arguments)]
pub fn patches(
    py: Python<'_>,
    url: &str,
    patch: usize,
    stride: Option<usize>,
    level: usize,
    channels: usize,
    labels: Option<String>,
    foreground: &str,
    min_fraction: f32,
    read: &str,
    workers: Option<usize>,
    buffer_mib: usize,
    storage: Option<&Bound<'_, PyDict>>,
    failures: Option<Py<PyList>>,
    strict: bool,
) -> PyResult<ArrowStream> {
    guard("patches", || {
        if stride == Some(0) {
            return Err(msg("patch and stride must be at least 1 pixel"));
        }
        let mut data = data_set(url, patch, level, channels, labels, store_options(storage)?)?;
        let config = &mut data.stream;
        config.stride = stride.unwrap_or(patch);
        config.read = read_mode(read)?;
        config.foreground = Foreground::parse(foreground, min_fraction).map_err(msg)?;
        config.decode_workers = workers
            .unwrap_or_else(patchgd::sql::default_partitions)
            .max(1);
        config.buffer_bytes = buffer_mib.max(1) << 20;
        let listed = py.detach(|| crate::runtime().block_on(data.entries()));
        let (location, entries, listing_failures) = listed.map_err(|e| errors::to_py(&e))?;
        let reporter = Reporter::new(failures);
        for f in &listing_failures {
            if strict {
                return Err(msg(format!(
                    "image '{}' ({}) not read at {}: {}",
                    f.image_id, f.url, f.stage, f.message
                )));
            }
            reporter.report(py, f)?;
        }
        let rx = {
            let _inside = crate::runtime().enter();
            stream_images(location, entries, data.stream.clone())
        };
        Ok(ArrowStream::new(Box::new(PatchReader {
            rx,
            schema: patch_schema(),
            reporter,
            strict,
        })))
    })
}
