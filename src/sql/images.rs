//! The `images` table: one row per object under a data set's URL, with its label and split, and
//! what its first bytes say (format, size in pixels, pyramid levels, microns per pixel).
//!
//! Filters on `image_id`, `url`, `bytes`, `label` and `split` are applied to the listing before
//! any object is read; the header columns are read (one ranged GET per image) only when the
//! query uses them. An object whose header cannot be read keeps its row, with the reason in
//! `error`.

use std::sync::{Arc, LazyLock, Mutex};

use arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, Result, plan_err};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;

use super::{DataSet, pushdown, reads_only};
use crate::source::inspect::{ImageInfo, InspectError, inspect};
use crate::source::{Failure, ImageEntry};

static IMAGES_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("image_id", DataType::Utf8, false),
        Field::new("url", DataType::Utf8, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("label", DataType::Int64, true),
        Field::new("split", DataType::Utf8, true),
        Field::new("format", DataType::Utf8, true),
        Field::new("width", DataType::UInt32, true),
        Field::new("height", DataType::UInt32, true),
        Field::new("levels", DataType::UInt32, true),
        Field::new("mpp", DataType::Float64, true),
        Field::new("error", DataType::Utf8, true),
    ]))
});

/// The schema of the images table (documented in docs/sql.md).
pub fn images_schema() -> SchemaRef {
    IMAGES_SCHEMA.clone()
}

/// Columns known from the listing and labels alone.
const LISTING_COLUMNS: &[&str] = &["image_id", "url", "bytes", "label", "split"];
/// Images whose headers are read at once.
const HEADER_READS_IN_FLIGHT: usize = 16;

fn listing_only(expr: &Expr) -> bool {
    reads_only(expr, LISTING_COLUMNS)
}

#[derive(Debug)]
pub struct ImagesTable {
    data: DataSet,
    failures: Arc<Mutex<Vec<Failure>>>,
}

impl ImagesTable {
    pub fn new(data: DataSet) -> Self {
        Self::with_failures(data, Default::default())
    }

    pub fn with_failures(data: DataSet, failures: Arc<Mutex<Vec<Failure>>>) -> Self {
        Self { data, failures }
    }
}

fn listing_batch(entries: &[ImageEntry]) -> Result<RecordBatch> {
    let schema = Arc::new(images_schema().project(&[0, 1, 2, 3, 4])?);
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(|e| e.image_id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                entries.iter().map(|e| e.url.as_str()),
            )),
            Arc::new(UInt64Array::from_iter_values(
                entries.iter().map(|e| e.size),
            )),
            Arc::new(Int64Array::from_iter(entries.iter().map(|e| e.label))),
            Arc::new(StringArray::from_iter(
                entries.iter().map(|e| e.split.map(|s| s.as_str())),
            )),
        ],
    )?)
}

/// The images of `entries` that `filter` keeps: it may use the listing's columns (`image_id`,
/// `url`, `bytes`, `label`, `split`). This is how listing-level filters of both tables prune
/// images before anything is read.
pub(crate) fn filter_entries(
    state: &dyn Session,
    entries: Vec<ImageEntry>,
    filter: Option<Expr>,
) -> Result<Vec<ImageEntry>> {
    let Some(filter) = filter else {
        return Ok(entries);
    };
    let batch = listing_batch(&entries)?;
    let df_schema = DFSchema::try_from(batch.schema().as_ref().clone())?;
    let expr = state.create_physical_expr(filter, &df_schema)?;
    let keep = expr.evaluate(&batch)?.into_array(batch.num_rows())?;
    let Some(keep) = keep.as_any().downcast_ref::<arrow::array::BooleanArray>() else {
        return plan_err!("a filter on the image listing is not boolean: {expr}");
    };
    Ok(entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep.is_valid(*i) && keep.value(*i))
        .map(|(_, e)| e)
        .collect())
}

#[async_trait]
impl TableProvider for ImagesTable {
    fn schema(&self) -> SchemaRef {
        images_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(pushdown(filters, listing_only))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (loc, entries, failures) = self.data.entries().await?;
        self.failures.lock().unwrap().extend(failures);
        let filter = conjunction(filters.iter().filter(|f| listing_only(f)).cloned());
        let entries = filter_entries(state, entries, filter)?;
        let schema = images_schema();
        let wanted: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..schema.fields().len()).collect());
        let needs_header = wanted.iter().any(|&i| i >= LISTING_COLUMNS.len());
        let (patch, stride) = (self.data.stream.patch, self.data.stream.stride);
        let infos: Vec<Option<Result<ImageInfo, InspectError>>> = if needs_header {
            let targets: Vec<_> = entries.iter().map(|e| (e.path.clone(), e.size)).collect();
            futures::stream::iter(targets)
                .map(|(path, size)| {
                    let loc = loc.clone();
                    async move { Some(inspect(&loc, &path, size, patch, stride).await) }
                })
                .buffered(HEADER_READS_IN_FLIGHT)
                .collect()
                .await
        } else {
            entries.iter().map(|_| None).collect()
        };
        let listing = listing_batch(&entries)?;
        let info = |f: &dyn Fn(&ImageInfo) -> Option<f64>| -> Vec<Option<f64>> {
            infos
                .iter()
                .map(|i| i.as_ref().and_then(|r| r.as_ref().ok()).and_then(f))
                .collect()
        };
        let level0 = |i: &ImageInfo| i.levels.iter().find(|l| l.level == Some(0)).cloned();
        let u32s = |v: Vec<Option<f64>>| -> ArrayRef {
            Arc::new(UInt32Array::from_iter(
                v.into_iter().map(|x| x.map(|x| x as u32)),
            ))
        };
        let mut columns: Vec<ArrayRef> = listing.columns().to_vec();
        columns.push(Arc::new(StringArray::from_iter(infos.iter().map(|i| {
            i.as_ref()
                .and_then(|r| r.as_ref().ok())
                .map(|i| i.format.clone())
        }))));
        columns.push(u32s(info(&|i| level0(i).map(|l| l.width as f64))));
        columns.push(u32s(info(&|i| level0(i).map(|l| l.height as f64))));
        columns.push(u32s(info(&|i| {
            Some(i.levels.iter().filter(|l| l.level.is_some()).count() as f64)
        })));
        columns.push(Arc::new(Float64Array::from(info(&|i| i.mpp))));
        columns.push(Arc::new(StringArray::from_iter(infos.iter().map(|i| {
            i.as_ref()
                .and_then(|r| r.as_ref().err())
                .map(|e| e.to_string())
        }))));
        {
            let mut reported = self.failures.lock().unwrap();
            for (e, i) in entries.iter().zip(&infos) {
                if let Some(Err(message)) = i {
                    reported.push(Failure {
                        image_id: e.image_id.clone(),
                        url: e.url.clone(),
                        stage: "read".into(),
                        message: message.to_string(),
                    });
                }
            }
        }
        let batch = RecordBatch::try_new(schema.clone(), columns)?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            schema,
            projection.cloned(),
        )?)
    }
}
