//! patchgd's tables for other DataFusion hosts: each one a Python object that exports its
//! `TableProvider` through datafusion-ffi's capsule protocol (`__datafusion_table_provider__`),
//! so that `datafusion.SessionContext.register_table(name, table)` takes it.
//!
//! The providers are patchgd's own (pushdown, the byte-bounded source stage, failures counted),
//! built by the same `patchgd::sql::register` the command line uses, in a scratch session, and
//! handed over; the host's session plans and runs them.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;

use datafusion::catalog::{TableFunctionImpl, TableProvider};
use datafusion::logical_expr::ScalarUDF;
use datafusion_ffi::proto::logical_extension_codec::FFI_LogicalExtensionCodec;
use datafusion_ffi::table_provider::FFI_TableProvider;
use datafusion_ffi::udf::FFI_ScalarUDF;
use datafusion_ffi::udtf::FFI_TableFunction;
use patchgd::sql::{Reported, Sources, register};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict, PyList};

use crate::errors::{self, guard, msg};
use crate::patches::{Reporter, data_set, store_options};

/// One of patchgd's tables, ready to be registered in a datafusion-python session.
#[pyclass(module = "patchgd._patchgd", frozen)]
pub struct Table {
    name: String,
    provider: Arc<dyn TableProvider>,
    reported: Reported,
}

#[pymethods]
impl Table {
    /// The name patchgd gives it (`patches`, `images`, `metrics`, ...).
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Images the scans could not read since the last call (each also logged to the
    /// `patchgd` logger), appended to `into` if given; returns how many there were.
    #[pyo3(signature = (into=None))]
    fn take_failures(&self, py: Python<'_>, into: Option<Py<PyList>>) -> PyResult<usize> {
        take_failures(py, &self.reported, into)
    }

    /// The provider, for the session it is being registered in (datafusion-python 55 passes
    /// it; its logical codec travels with the provider).
    #[pyo3(signature = (session=None))]
    fn __datafusion_table_provider__<'py>(
        &self,
        py: Python<'py>,
        session: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let codec = session_codec(&format!("table '{}'", self.name), session)?;
        let ffi = FFI_TableProvider::new_with_ffi_codec(
            self.provider.clone(),
            true,
            Some(crate::runtime().handle().clone()),
            codec,
        );
        let name = CString::new("datafusion_table_provider").expect("no NUL");
        PyCapsule::new(py, ffi, Some(name))
    }

    fn __repr__(&self) -> String {
        format!("patchgd table '{}'", self.name)
    }
}

/// Hands the failures `reported` holds to the logger and `into`.
fn take_failures(py: Python<'_>, reported: &Reported, into: Option<Py<PyList>>) -> PyResult<usize> {
    let failures = reported.take();
    let reporter = Reporter::new(into);
    for f in &failures {
        reporter.report(py, f)?;
    }
    Ok(failures.len())
}

/// The logical codec of the session an object is being registered in: datafusion-python 55
/// passes the session, whose codec travels with the exported provider or function.
fn session_codec(
    what: &str,
    session: Option<Bound<'_, PyAny>>,
) -> PyResult<FFI_LogicalExtensionCodec> {
    let session = session.ok_or_else(|| {
        msg(format!(
            "{what}: the host did not pass its session; register it with datafusion-python 55"
        ))
    })?;
    let capsule = session.call_method0("__datafusion_logical_extension_codec__")?;
    let capsule = capsule.cast::<PyCapsule>()?;
    let codec: NonNull<FFI_LogicalExtensionCodec> = capsule
        .pointer_checked(Some(c"datafusion_logical_extension_codec"))?
        .cast();
    // SAFETY: the capsule named so holds an FFI_LogicalExtensionCodec (datafusion-ffi's
    // protocol); it is cloned, not taken.
    Ok(unsafe { codec.as_ref() }.clone())
}

/// One of patchgd's scalar UDFs (`vector_norm`, `cosine_similarity`, `byte_length`), for
/// `datafusion.ScalarUDF.from_pycapsule`.
#[pyclass(module = "patchgd._patchgd", frozen)]
pub struct ScalarFunction {
    udf: Arc<ScalarUDF>,
}

#[pymethods]
impl ScalarFunction {
    #[getter]
    fn name(&self) -> &str {
        self.udf.name()
    }

    fn __datafusion_scalar_udf__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyCapsule>> {
        let ffi = FFI_ScalarUDF::from(self.udf.clone());
        PyCapsule::new(
            py,
            ffi,
            Some(CString::new("datafusion_scalar_udf").expect("no NUL")),
        )
    }
}

/// One of patchgd's table functions (`images(url)`, `patches(url, patch)`, `latents(run)`),
/// for `datafusion.TableFunction(name, f, ctx)`.
#[pyclass(module = "patchgd._patchgd", frozen)]
pub struct TableFunction {
    name: &'static str,
    function: Arc<dyn TableFunctionImpl>,
    /// Shared by the three functions: images their scans could not read.
    reported: Reported,
}

#[pymethods]
impl TableFunction {
    #[getter]
    fn name(&self) -> &str {
        self.name
    }

    /// Images the table functions' scans could not read since the last call (logged to the
    /// `patchgd` logger, appended to `into`); returns how many there were.
    #[pyo3(signature = (into=None))]
    fn take_failures(&self, py: Python<'_>, into: Option<Py<PyList>>) -> PyResult<usize> {
        take_failures(py, &self.reported, into)
    }

    #[pyo3(signature = (session=None))]
    fn __datafusion_table_function__<'py>(
        &self,
        py: Python<'py>,
        session: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyCapsule>> {
        let codec = session_codec(&format!("table function '{}'", self.name), session)?;
        let ffi = FFI_TableFunction::new_with_ffi_codec(
            self.function.clone(),
            Some(crate::runtime().handle().clone()),
            codec,
        );
        PyCapsule::new(
            py,
            ffi,
            Some(CString::new("datafusion_table_function").expect("no NUL")),
        )
    }
}

/// patchgd's UDFs and table functions; the table functions' scans read with `storage`.
#[pyfunction]
#[pyo3(signature = (*, storage=None))]
pub fn functions(
    storage: Option<&Bound<'_, PyDict>>,
) -> PyResult<(Vec<ScalarFunction>, Vec<TableFunction>)> {
    let storage = store_options(storage)?;
    let scalars = patchgd::sql::functions::udfs()
        .into_iter()
        .map(|udf| ScalarFunction { udf })
        .collect();
    let reported = Reported::default();
    let tables = patchgd::sql::functions::table_functions(&storage, &reported)
        .into_iter()
        .map(|(name, function)| TableFunction {
            name,
            function,
            reported: reported.clone(),
        })
        .collect();
    Ok((scalars, tables))
}

/// What `patchgd sql --images ... --run ...` registers: a data set (when `images` is given)
/// and a run's output directory, with the Python arguments checked.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sources(
    images: Option<String>,
    labels: Option<String>,
    patch: usize,
    level: usize,
    channels: usize,
    run: Option<String>,
    storage: Option<&Bound<'_, PyDict>>,
) -> PyResult<Sources> {
    let storage = store_options(storage)?;
    let data = match images {
        Some(images) => Some(data_set(
            &images,
            patch,
            level,
            channels,
            labels,
            storage.clone(),
        )?),
        None => None,
    };
    Ok(Sources { data, run, storage })
}

/// patchgd's tables for a data set and a run: `images`, `patches` (with `images`) and the
/// run's `metrics`, `predictions`, `errors`, `heatmaps`, `latents` (with `run`).
#[pyfunction]
#[pyo3(signature = (*, images=None, labels=None, patch=256, level=0, channels=3, run=None,
    storage=None))]
#[allow(clippy::too_many_arguments)]
pub fn tables(
    py: Python<'_>,
    images: Option<String>,
    labels: Option<String>,
    patch: usize,
    level: usize,
    channels: usize,
    run: Option<String>,
    storage: Option<&Bound<'_, PyDict>>,
) -> PyResult<Vec<Table>> {
    guard("tables", || {
        let sources = sources(images, labels, patch, level, channels, run, storage)?;
        let built = py.detach(|| {
            crate::runtime().block_on(async {
                let ctx = patchgd::sql::session();
                let reported = register(&ctx, &sources).await?;
                let schema = ctx
                    .catalog("datafusion")
                    .and_then(|c| c.schema("public"))
                    .expect("the default schema");
                let mut names = schema.table_names();
                names.sort();
                let mut out = vec![];
                for name in names {
                    let provider = ctx.table_provider(name.as_str()).await?;
                    out.push((name, provider));
                }
                Ok::<_, datafusion::error::DataFusionError>((out, reported))
            })
        });
        let (built, reported) = built.map_err(|e| errors::to_py(&e))?;
        Ok(built
            .into_iter()
            .map(|(name, provider)| Table {
                name,
                provider,
                reported: reported.clone(),
            })
            .collect())
    })
}
