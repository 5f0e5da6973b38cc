//! patchgd's errors as Python exceptions, and panics kept on the Rust side of the boundary.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pyo3::PyErr;
use pyo3::create_exception;
use pyo3::exceptions::PyException;

create_exception!(
    _patchgd,
    PatchgdError,
    PyException,
    "An error patchgd reports: it names the object, key or file, and what was expected."
);

/// The error and its causes, as the command line prints them: `message: cause: cause`, each
/// cause only once (many messages already quote theirs).
pub fn message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

/// A patchgd error as a `PatchgdError`.
pub fn to_py(e: &(dyn std::error::Error + 'static)) -> PyErr {
    PatchgdError::new_err(message(e))
}

/// A plain message as a `PatchgdError`.
pub fn msg(text: impl Into<String>) -> PyErr {
    PatchgdError::new_err(text.into())
}

/// Runs `f`; a panic in it becomes a `PatchgdError` that says it is a bug.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, PyErr>) -> Result<T, PyErr> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(msg(format!(
            "{what}: internal error (a bug in patchgd, please report it): {}",
            panic_text(&panic)
        ))),
    }
}

/// What a panic said.
pub fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}
