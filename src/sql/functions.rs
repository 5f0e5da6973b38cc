//! Table functions (`images`, `patches`, `latents`) and UDFs (`vector_norm`,
//! `cosine_similarity`, `byte_length`) that work in any DataFusion `SessionContext`.

use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, AsArray, Float64Array};
use arrow::datatypes::{DataType, Float32Type};
use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use super::{DataSet, ImagesTable, PatchesTable, Reported};
use crate::source::Failure;
use crate::storage::StoreOptions;

/// Register the table functions and UDFs in `ctx`.
pub fn register(ctx: &SessionContext, storage: &StoreOptions, reported: &Reported) {
    for (name, function) in table_functions(storage, reported) {
        ctx.register_udtf(name, function);
    }
    for udf in udfs() {
        ctx.register_udf(udf.as_ref().clone());
    }
}

/// patchgd's table functions by name; scans they start read with `storage` and report the
/// images they cannot read to `reported` (the Python package hands them to other hosts).
pub fn table_functions(
    storage: &StoreOptions,
    reported: &Reported,
) -> Vec<(&'static str, Arc<dyn TableFunctionImpl>)> {
    let common = Common {
        storage: storage.clone(),
        failures: reported.0.clone(),
    };
    vec![
        ("images", Arc::new(ImagesFunction(common.clone()))),
        ("patches", Arc::new(PatchesFunction(common.clone()))),
        ("latents", Arc::new(LatentsFunction(common))),
    ]
}

/// patchgd's scalar UDFs (a cluster's scheduler and executors register them too).
pub fn udfs() -> Vec<Arc<ScalarUDF>> {
    vec![
        Arc::new(ScalarUDF::new_from_impl(VectorNorm::new())),
        Arc::new(ScalarUDF::new_from_impl(CosineSimilarity::new())),
        Arc::new(ScalarUDF::new_from_impl(ByteLength::new())),
    ]
}

#[derive(Clone, Debug)]
struct Common {
    storage: StoreOptions,
    failures: Arc<Mutex<Vec<Failure>>>,
}

fn string_arg(name: &str, args: &[Expr], i: usize, what: &str) -> Result<Option<String>> {
    match args.get(i) {
        None => Ok(None),
        Some(Expr::Literal(ScalarValue::Utf8(Some(s)), _))
        | Some(Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _))
        | Some(Expr::Literal(ScalarValue::Utf8View(Some(s)), _)) => Ok(Some(s.clone())),
        Some(other) => plan_err!(
            "{name}(): argument {} ({what}) must be a string literal, got {other}",
            i + 1
        ),
    }
}

fn int_arg(name: &str, args: &[Expr], i: usize, what: &str) -> Result<Option<i64>> {
    match args.get(i) {
        None => Ok(None),
        Some(Expr::Literal(v, _)) if v.data_type().is_integer() && !v.is_null() => {
            match v.cast_to(&DataType::Int64)? {
                ScalarValue::Int64(Some(n)) => Ok(Some(n)),
                _ => plan_err!("{name}(): argument {} ({what}) must be an integer", i + 1),
            }
        }
        Some(other) => plan_err!(
            "{name}(): argument {} ({what}) must be an integer literal, got {other}",
            i + 1
        ),
    }
}

fn check_url(name: &str, url: &str, storage: &StoreOptions) -> Result<()> {
    crate::storage::Location::parse_with(url, storage)
        .map(|_| ())
        .map_err(|e| DataFusionError::Plan(format!("{name}(): bad URL '{url}': {e}")))
}

/// `images(url [, labels_url])`
#[derive(Debug)]
struct ImagesFunction(Common);

impl TableFunctionImpl for ImagesFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if exprs.is_empty() || exprs.len() > 2 {
            return plan_err!(
                "images(url [, labels_url]) takes 1 or 2 arguments, got {}",
                exprs.len()
            );
        }
        let url = string_arg("images", exprs, 0, "url")?.unwrap();
        check_url("images", &url, &self.0.storage)?;
        let mut data = DataSet::new(&url, 256);
        data.labels = string_arg("images", exprs, 1, "labels_url")?;
        data.storage = self.0.storage.clone();
        Ok(Arc::new(ImagesTable::with_failures(
            data,
            self.0.failures.clone(),
        )))
    }
}

/// `patches(url, patch [, level [, labels_url]])`
#[derive(Debug)]
struct PatchesFunction(Common);

impl TableFunctionImpl for PatchesFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if exprs.len() < 2 || exprs.len() > 4 {
            return plan_err!(
                "patches(url, patch [, level [, labels_url]]) takes 2 to 4 arguments, got {}",
                exprs.len()
            );
        }
        let url = string_arg("patches", exprs, 0, "url")?.unwrap();
        check_url("patches", &url, &self.0.storage)?;
        let patch = int_arg("patches", exprs, 1, "patch size in pixels")?.unwrap();
        if !(1..=65536).contains(&patch) {
            return plan_err!("patches(): patch size must be 1 to 65536 pixels, got {patch}");
        }
        let mut data = DataSet::new(&url, patch as usize);
        if let Some(level) = int_arg("patches", exprs, 2, "pyramid level")? {
            if level < 0 {
                return plan_err!("patches(): level must be 0 or more, got {level}");
            }
            data.stream.level = level as usize;
        }
        data.labels = string_arg("patches", exprs, 3, "labels_url")?;
        data.storage = self.0.storage.clone();
        Ok(Arc::new(PatchesTable::with_failures(
            data,
            self.0.failures.clone(),
        )))
    }
}

/// `latents(run_url)`: reads the newest checkpoint's latent store when called.
#[derive(Debug)]
struct LatentsFunction(Common);

impl TableFunctionImpl for LatentsFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let exprs = args.exprs();
        if exprs.len() != 1 {
            return plan_err!("latents(run_url) takes 1 argument, got {}", exprs.len());
        }
        let url = string_arg("latents", exprs, 0, "run_url")?.unwrap();
        check_url("latents", &url, &self.0.storage)?;
        let storage = self.0.storage.clone();
        // Planning is synchronous here; the checkpoint is found on a thread of its own so that
        // this works under any runtime (or none).
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(super::run::latents_table(&url, &storage))
            })
            .join()
            .map_err(|_| DataFusionError::Execution("latents(): reader thread panicked".into()))?
        })
    }
}

/// Float32 vectors of a list column (FixedSizeList or List), one per row (None for null).
fn vectors(array: &ArrayRef) -> Result<Vec<Option<Vec<f32>>>> {
    let values = |a: ArrayRef| -> Result<Vec<f32>> {
        let a = arrow::compute::cast(&a, &DataType::Float32)?;
        Ok(a.as_primitive::<Float32Type>().values().to_vec())
    };
    let rows = array.len();
    let mut out = Vec::with_capacity(rows);
    match array.data_type() {
        DataType::FixedSizeList(..) => {
            let l = array.as_fixed_size_list();
            for i in 0..rows {
                out.push(if l.is_null(i) {
                    None
                } else {
                    Some(values(l.value(i))?)
                });
            }
        }
        DataType::List(..) => {
            let l = array.as_list::<i32>();
            for i in 0..rows {
                out.push(if l.is_null(i) {
                    None
                } else {
                    Some(values(l.value(i))?)
                });
            }
        }
        DataType::LargeList(..) => {
            let l = array.as_list::<i64>();
            for i in 0..rows {
                out.push(if l.is_null(i) {
                    None
                } else {
                    Some(values(l.value(i))?)
                });
            }
        }
        other => {
            return plan_err!(
                "expected a vector (a list of numbers, e.g. latents.vector), got {other}"
            );
        }
    }
    Ok(out)
}

fn list_check(name: &str, types: &[DataType]) -> Result<()> {
    for t in types {
        if !matches!(
            t,
            DataType::FixedSizeList(..)
                | DataType::List(..)
                | DataType::LargeList(..)
                | DataType::Null
        ) {
            return plan_err!("{name}() takes vectors (e.g. latents.vector), got {t}");
        }
    }
    Ok(())
}

/// `vector_norm(v)`: the L2 norm of a vector.
#[derive(Debug, PartialEq, Eq, Hash)]
struct VectorNorm {
    signature: Signature,
}

impl VectorNorm {
    fn new() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VectorNorm {
    fn name(&self) -> &str {
        "vector_norm"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        list_check("vector_norm", arg_types)?;
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = args.args[0].to_array(args.number_rows)?;
        let out: Float64Array = vectors(&a)?
            .into_iter()
            .map(|v| v.map(|v| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// `cosine_similarity(a, b)`: a·b / (|a| |b|); null if either is null, zero or of another length.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CosineSimilarity {
    signature: Signature,
}

impl CosineSimilarity {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for CosineSimilarity {
    fn name(&self) -> &str {
        "cosine_similarity"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        list_check("cosine_similarity", arg_types)?;
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = vectors(&args.args[0].to_array(args.number_rows)?)?;
        let b = vectors(&args.args[1].to_array(args.number_rows)?)?;
        let out: Float64Array = a
            .into_iter()
            .zip(b)
            .map(|(a, b)| {
                let (a, b) = (a?, b?);
                if a.len() != b.len() {
                    return None;
                }
                let dot: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
                let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                (na > 0.0 && nb > 0.0).then(|| dot / (na * nb))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// `byte_length(x)`: bytes of a binary value (e.g. `pixels`) or string; DataFusion's
/// `octet_length` takes strings only.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ByteLength {
    signature: Signature,
}

impl ByteLength {
    fn new() -> Self {
        Self {
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for ByteLength {
    fn name(&self) -> &str {
        "byte_length"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match &arg_types[0] {
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_)
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Null => Ok(DataType::Int64),
            other => plan_err!("byte_length() takes binary or string values, got {other}"),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = args.args[0].to_array(args.number_rows)?;
        let a = arrow::compute::cast(&a, &DataType::LargeBinary)?;
        let b = a.as_binary::<i64>();
        let out: arrow::array::Int64Array = (0..b.len())
            .map(|i| (!b.is_null(i)).then(|| b.value(i).len() as i64))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
