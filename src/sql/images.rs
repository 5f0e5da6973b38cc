//! The `images` table: one row per object under a data set's URL, with its label and split, and
//! what its first bytes say (format, size in pixels, pyramid levels, microns per pixel).
//!
//! Filters on `image_id`, `url`, `bytes`, `label` and `split` are applied to the listing before
//! any object is read; the header columns are read (one ranged GET per image) only when the
//! query uses them. An object whose header cannot be read keeps its row, with the reason in
//! `error`.
//!
//! Header reads happen when the plan runs, in [`ImagesExec`]: one partition per slice of the
//! images, as the `patches` scan splits them ([`slices_by_bytes`]), so that partitions (and the
//! executors of a cluster) share the reads. `EXPLAIN ANALYZE` shows `headers_read` and
//! `images_failed`.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex};

use arrow::array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, Result, plan_err};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use futures::{StreamExt, TryStreamExt};

use super::patches::slices_by_bytes;
use super::slices::{slice_source, slices_of};
use super::{DataSet, pushdown, reads_only};
use crate::source::inspect::{ImageInfo, InspectError, inspect};
use crate::source::{Failure, ImageEntry};
use crate::storage::Location;

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
    pub(crate) data: DataSet,
    failures: Arc<Mutex<Vec<Failure>>>,
    /// Also log the listing's failures (a cluster's scheduler: nobody collects `failures`).
    pub(crate) log_failures: bool,
}

impl ImagesTable {
    pub fn new(data: DataSet) -> Self {
        Self::with_failures(data, Default::default())
    }

    pub fn with_failures(data: DataSet, failures: Arc<Mutex<Vec<Failure>>>) -> Self {
        Self {
            data,
            failures,
            log_failures: false,
        }
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
        if self.log_failures {
            failures.iter().for_each(super::log_failure);
        }
        self.failures.lock().unwrap().extend(failures);
        let listed = entries.len();
        let filter = conjunction(filters.iter().filter(|f| listing_only(f)).cloned());
        let entries = filter_entries(state, entries, filter)?;
        let schema = images_schema();
        let wanted: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..schema.fields().len()).collect());
        let needs_header = wanted.iter().any(|&i| i >= LISTING_COLUMNS.len());
        if !needs_header {
            // The listing alone: nothing to read, one batch.
            let mut columns = listing_batch(&entries)?.columns().to_vec();
            columns.extend(
                schema.fields()[LISTING_COLUMNS.len()..]
                    .iter()
                    .map(|f| arrow::array::new_null_array(f.data_type(), entries.len())),
            );
            let batch = RecordBatch::try_new(schema.clone(), columns)?;
            return Ok(MemorySourceConfig::try_new_exec(
                &[vec![batch]],
                schema,
                projection.cloned(),
            )?);
        }
        let slices = slices_by_bytes(&entries, state.config().target_partitions());
        Ok(Arc::new(ImagesExec::new(
            self.data.clone(),
            loc,
            entries.into(),
            listed,
            slices,
            projection.cloned(),
            self.failures.clone(),
            None,
        )?))
    }
}

/// Read the headers of `entries` (a few at a time) into rows of the images table; an object
/// whose header cannot be read keeps its row, with the reason in `error`, and is reported.
async fn header_rows(
    loc: &Location,
    entries: &[ImageEntry],
    (patch, stride): (usize, usize),
    failures: &Mutex<Vec<Failure>>,
    counters: &HeaderCounters,
    log_failures: bool,
) -> Result<RecordBatch> {
    let schema = images_schema();
    let targets: Vec<_> = entries.iter().map(|e| (e.path.clone(), e.size)).collect();
    let infos: Vec<Result<ImageInfo, InspectError>> = futures::stream::iter(targets)
        .map(|(path, size)| {
            let loc = loc.clone();
            async move { inspect(&loc, &path, size, patch, stride).await }
        })
        .buffered(HEADER_READS_IN_FLIGHT)
        .collect()
        .await;
    counters.read.add(infos.len());
    let listing = listing_batch(entries)?;
    let info = |f: &dyn Fn(&ImageInfo) -> Option<f64>| -> Vec<Option<f64>> {
        infos.iter().map(|i| i.as_ref().ok().and_then(f)).collect()
    };
    let level0 = |i: &ImageInfo| i.levels.iter().find(|l| l.level == Some(0)).cloned();
    let u32s = |v: Vec<Option<f64>>| -> ArrayRef {
        Arc::new(UInt32Array::from_iter(
            v.into_iter().map(|x| x.map(|x| x as u32)),
        ))
    };
    let mut columns: Vec<ArrayRef> = listing.columns().to_vec();
    columns.push(Arc::new(StringArray::from_iter(
        infos
            .iter()
            .map(|i| i.as_ref().ok().map(|i| i.format.clone())),
    )));
    columns.push(u32s(info(&|i| level0(i).map(|l| l.width as f64))));
    columns.push(u32s(info(&|i| level0(i).map(|l| l.height as f64))));
    columns.push(u32s(info(&|i| {
        Some(i.levels.iter().filter(|l| l.level.is_some()).count() as f64)
    })));
    columns.push(Arc::new(Float64Array::from(info(&|i| i.mpp))));
    columns.push(Arc::new(StringArray::from_iter(
        infos
            .iter()
            .map(|i| i.as_ref().err().map(|e| e.to_string())),
    )));
    {
        let mut reported = failures.lock().unwrap();
        for (e, i) in entries.iter().zip(&infos) {
            if let Err(message) = i {
                counters.failed.add(1);
                let failure = Failure {
                    image_id: e.image_id.clone(),
                    url: e.url.clone(),
                    stage: "read".into(),
                    message: message.to_string(),
                };
                if log_failures {
                    super::log_failure(&failure);
                }
                reported.push(failure);
            }
        }
    }
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// What an [`ImagesExec`] counts, for `EXPLAIN ANALYZE`.
#[derive(Clone)]
struct HeaderCounters {
    read: Count,
    failed: Count,
}

/// The images table's header reads as a DataFusion leaf: partition `p` reads the headers of its
/// slice of the images and yields their rows.
pub struct ImagesExec {
    pub(crate) data: DataSet,
    pub(crate) location: Location,
    pub(crate) entries: Arc<[ImageEntry]>,
    /// Images listed before the listing filters.
    pub(crate) listed: usize,
    /// Each partition's images: contiguous ranges of `entries`.
    pub(crate) slices: Vec<Range<usize>>,
    pub(crate) projection: Option<Vec<usize>>,
    failures: Arc<Mutex<Vec<Failure>>>,
    /// Also log each failure (a cluster's executor: nobody collects `failures` there).
    pub(crate) log_failures: bool,
    /// The slice source ([`super::slices`]): partition `p` reads the slices it holds.
    pub(crate) input: Arc<dyn ExecutionPlan>,
    metrics: ExecutionPlanMetricsSet,
    counters: HeaderCounters,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for ImagesExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ImagesExec")
    }
}

impl ImagesExec {
    /// `input`: the slice source; `None` makes one of `slices`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        data: DataSet,
        location: Location,
        entries: Arc<[ImageEntry]>,
        listed: usize,
        slices: Vec<Range<usize>>,
        projection: Option<Vec<usize>>,
        failures: Arc<Mutex<Vec<Failure>>>,
        input: Option<Arc<dyn ExecutionPlan>>,
    ) -> Result<Self> {
        let input = match input {
            Some(input) => input,
            None => slice_source(slices.len())?,
        };
        let schema = match &projection {
            Some(p) => Arc::new(images_schema().project(p)?),
            None => images_schema(),
        };
        let metrics = ExecutionPlanMetricsSet::new();
        let counters = HeaderCounters {
            read: MetricBuilder::new(&metrics).global_counter("headers_read"),
            failed: MetricBuilder::new(&metrics).global_counter("images_failed"),
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(input.properties().partitioning.partition_count()),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Ok(Self {
            data,
            location,
            entries,
            listed,
            slices,
            projection,
            failures,
            log_failures: false,
            input,
            metrics,
            counters,
            properties,
        })
    }
}

impl DisplayAs for ImagesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ImagesExec: url={}, read=headers, images={} of {}, partitions={}",
            self.data.images,
            self.entries.len(),
            self.listed,
            self.properties.partitioning.partition_count()
        )
    }
}

impl ExecutionPlan for ImagesExec {
    fn name(&self) -> &'static str {
        "ImagesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        // The slice source's partitions are the scan's: never repartition it.
        vec![false]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (Some(input), true) = (children.pop(), children.is_empty()) else {
            return datafusion::common::internal_err!("ImagesExec has one child, its slice source");
        };
        let mut scan = ImagesExec::new(
            self.data.clone(),
            self.location.clone(),
            self.entries.clone(),
            self.listed,
            self.slices.clone(),
            self.projection.clone(),
            self.failures.clone(),
            Some(input),
        )?;
        scan.log_failures = self.log_failures;
        Ok(Arc::new(scan))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let (input, slices) = (self.input.clone(), self.slices.clone());
        let entries = self.entries.clone();
        let location = self.location.clone();
        let cut = (self.data.stream.patch, self.data.stream.stride);
        let (failures, counters) = (self.failures.clone(), self.counters.clone());
        let log_failures = self.log_failures;
        let projection = self.projection.clone();
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        let stream = futures::stream::once(async move {
            let mine = slices_of(input, partition, context, slices.len()).await?;
            let mut batches = Vec::with_capacity(mine.len());
            for k in mine {
                let batch = header_rows(
                    &location,
                    &entries[slices[k].clone()],
                    cut,
                    &failures,
                    &counters,
                    log_failures,
                )
                .await?;
                let batch = match &projection {
                    Some(p) => batch.project(p)?,
                    None => batch,
                };
                output_rows.add(batch.num_rows());
                batches.push(Ok(batch));
            }
            Ok::<_, datafusion::error::DataFusionError>(futures::stream::iter(batches))
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.properties.eq_properties.schema().clone(),
            stream,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}
