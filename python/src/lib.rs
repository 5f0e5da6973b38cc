//! `patchgd._patchgd`: the Rust side of the Python package (docs/python.md).
//!
//! Each function releases the GIL while Rust works, on one tokio runtime of its own. Batches
//! leave through the Arrow C stream interface (pyarrow imports them without a copy). Errors
//! become `patchgd.PatchgdError` with the message the command line prints; a panic is caught
//! at the boundary and raised as an error too, never an abort of the interpreter.

mod errors;
mod patches;
mod query;
mod runs;
mod tables;

use pyo3::prelude::*;

pub use errors::PatchgdError;

#[pymodule]
fn _patchgd(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PatchgdError", m.py().get_type::<PatchgdError>())?;
    m.add_function(wrap_pyfunction!(patches::patches, m)?)?;
    m.add_function(wrap_pyfunction!(query::sql, m)?)?;
    m.add_function(wrap_pyfunction!(tables::tables, m)?)?;
    m.add_function(wrap_pyfunction!(runs::run, m)?)?;
    m.add_function(wrap_pyfunction!(runs::predict_images, m)?)?;
    m.add_class::<tables::Table>()?;
    m.add_function(wrap_pyfunction!(tables::functions, m)?)?;
    m.add_class::<tables::ScalarFunction>()?;
    m.add_class::<tables::TableFunction>()?;
    m.add_class::<patches::ArrowStream>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// The runtime every call runs on: as many workers as cores, started on first use.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("patchgd")
            .build()
            .expect("a tokio runtime for patchgd")
    })
}
