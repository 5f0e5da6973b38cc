//! `patchgd.run` and `patchgd.predict`: a pipeline file, or a trained model over images, run
//! by the library as the command line runs them. Progress goes to a Python callable; Ctrl-C
//! stops a run after its current optimizer step, with a checkpoint there.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use patchgd::pipeline::definition::DeviceChoice;
use patchgd::pipeline::{
    Definition, PredictRequest, RunError, RunObserver, RunOptions, predict, run_with,
};
use patchgd::sink::EpochMetrics;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{self, guard, msg};
use crate::patches::store_options;

/// Tells a Python callable about progress (`progress(event, value)`), and turns a pending
/// KeyboardInterrupt into a stop request.
struct PyObserver {
    progress: Option<Py<PyAny>>,
    interrupted: AtomicBool,
    /// The first exception the callable raised (kept, raised when the run returns).
    callback_error: std::sync::Mutex<Option<PyErr>>,
}

impl PyObserver {
    fn tell(&self, event: &str, value: impl for<'py> IntoPyObject<'py>) {
        Python::attach(|py| {
            // Signals are delivered to the main thread, which is this one while a run from a
            // notebook cell blocks: a Ctrl-C shows up here.
            if let Err(e) = py.check_signals() {
                if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
                    self.interrupted.store(true, Ordering::SeqCst);
                } else {
                    self.keep_error(e);
                }
            }
            if let Some(f) = &self.progress
                && let Err(e) = f.call1(py, (event, value))
            {
                // A Ctrl-C can also surface inside the callable (Python runs the signal
                // handler between its bytecodes): it is a stop request too, not its error.
                if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) {
                    self.interrupted.store(true, Ordering::SeqCst);
                } else {
                    self.keep_error(e);
                }
            }
        });
    }

    fn keep_error(&self, e: PyErr) {
        let mut slot = self.callback_error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(e);
        }
    }
}

impl RunObserver for PyObserver {
    fn note(&self, line: &str) {
        self.tell("note", line);
    }
    fn epoch_started(&self, label: &str, images: usize) {
        self.tell("epoch", (label, images));
    }
    fn images_done(&self, images: usize) {
        self.tell("images", images);
    }
    fn epoch_finished(&self, metrics: &EpochMetrics) {
        let json = serde_json::to_string(metrics).unwrap_or_default();
        self.tell("metrics", json);
    }
    fn finished(&self) {
        self.tell("finished", ());
    }
    fn stop_requested(&self) -> bool {
        self.interrupted.load(Ordering::SeqCst)
    }
}

/// Runs `f` with an observer, without the GIL; what the run returned, as JSON, or the error
/// as a Python exception (KeyboardInterrupt for a stop asked by Ctrl-C).
fn observed<T: serde::Serialize + Send>(
    py: Python<'_>,
    progress: Option<Py<PyAny>>,
    f: impl FnOnce(Arc<PyObserver>) -> Result<T, RunError> + Send,
) -> PyResult<String> {
    let observer = Arc::new(PyObserver {
        progress,
        interrupted: AtomicBool::new(false),
        callback_error: std::sync::Mutex::new(None),
    });
    let result = py.detach(|| f(observer.clone()));
    if let Some(e) = observer.callback_error.lock().unwrap().take() {
        return Err(e);
    }
    match result {
        Ok(summary) => serde_json::to_string(&summary).map_err(|e| msg(e.to_string())),
        Err(e @ RunError::Stopped { .. }) => Err(pyo3::exceptions::PyKeyboardInterrupt::new_err(
            e.to_string(),
        )),
        Err(e) => Err(errors::to_py(&e)),
    }
}

/// Runs a pipeline file with `overrides` (`KEY=VALUE`, as `patchgd run --set`); returns the
/// summary (summary.json) as JSON text.
#[pyfunction]
#[pyo3(signature = (pipeline, overrides=vec![], *, fresh=false, progress=None))]
pub fn run(
    py: Python<'_>,
    pipeline: &str,
    overrides: Vec<String>,
    fresh: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    guard("run", || {
        let text = std::fs::read_to_string(pipeline)
            .map_err(|e| msg(format!("cannot read pipeline file '{pipeline}': {e}")))?;
        let overrides: Vec<&str> = overrides.iter().map(String::as_str).collect();
        let def = Definition::from_yaml_with_overrides(&text, pipeline, &overrides)
            .map_err(|e| errors::to_py(&e))?;
        observed(py, progress, |observer| {
            let options = RunOptions {
                fresh,
                observer: Some(observer),
                ..Default::default()
            };
            run_with(&def, &options)
        })
    })
}

/// Predicts every image under `images` with the model at `model`, writing the results under
/// `output` (as `patchgd predict`); returns the summary as JSON text.
#[pyfunction]
#[pyo3(signature = (model, images, output, *, labels=None, heatmaps=false, batch_size=None,
    device=None, storage=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn predict_images(
    py: Python<'_>,
    model: String,
    images: String,
    output: String,
    labels: Option<String>,
    heatmaps: bool,
    batch_size: Option<usize>,
    device: Option<String>,
    storage: Option<&Bound<'_, PyDict>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<String> {
    guard("predict", || {
        let device = match device.as_deref() {
            None => None,
            Some("auto") => Some(DeviceChoice::Auto),
            Some("cpu") => Some(DeviceChoice::Cpu),
            Some("cuda") => Some(DeviceChoice::Cuda),
            Some(other) => {
                return Err(msg(format!(
                    "device='{other}': expected 'auto', 'cpu' or 'cuda'"
                )));
            }
        };
        let request = PredictRequest {
            model,
            images,
            labels,
            output,
            storage: store_options(storage)?,
            batch_size,
            device,
            heatmaps,
        };
        observed(py, progress, |observer| predict(&request, &*observer))
    })
}
