//! The `patches` table: one row per patch of every image of a data set, read through the real
//! source stage. What a query asks for decides what is read:
//!
//! - filters on `image_id`, `label`, `split` choose the images before anything is fetched;
//! - filters on the geometry (`row`, `col`, `x`, `y`, `level`, `grid_rows`, …) choose the cells
//!   once an image's header is read: TIFF segments and PNG/JPEG images with no chosen cell are
//!   never decoded;
//! - a projection without `mean`, `std`, `fg_fraction` and `pixels` reads headers only, and one
//!   without `pixels` decodes but never keeps pixels.
//!
//! Every pushed filter is `Inexact`: DataFusion still applies it, so the answer never depends on
//! how much the source could prune. `EXPLAIN` shows the scan's read mode, partitions and pushed
//! filters; `EXPLAIN ANALYZE` the images opened, decoded and failed.
//!
//! The scan has one partition per slice of the chosen images (the session's
//! `target_partitions`, at most one per image): contiguous ranges of the listing with about the
//! same bytes each, every image in exactly one. Each partition runs its own source stage over its
//! images, with its share of the byte budget and of the decode workers (at least one), so the
//! bounds on memory and on images decoding at once hold for the whole scan.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, Result};
use datafusion::datasource::TableType;
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

use super::images::filter_entries;
use super::slices::{slice_source, slices_of};
use super::{DataSet, pushdown, reads_only};
use crate::patch::{Cut, ImageKey, segment_batch};
use crate::patch::{Grid, patch_schema};
use crate::source::stream::{CellSelector, Read, SourceCounters};
use crate::source::{Failure, ImageEntry, SourceItem, stream_images};

/// Columns known from the listing and the labels table.
pub const IMAGE_COLUMNS: &[&str] = &["image_id", "label", "split"];
/// Columns known once an image's header is read, without decoding pixels.
pub const GEOMETRY_COLUMNS: &[&str] = &[
    "image_id",
    "label",
    "split",
    "row",
    "col",
    "x",
    "y",
    "level",
    "grid_rows",
    "grid_cols",
    "size",
    "channels",
];

/// What a projection needs read.
pub fn read_for(schema: &Schema, projection: Option<&Vec<usize>>) -> Read {
    let names: Vec<&str> = match projection {
        Some(p) => p.iter().map(|&i| schema.field(i).name().as_str()).collect(),
        None => schema.fields().iter().map(|f| f.name().as_str()).collect(),
    };
    if names.contains(&"pixels") {
        Read::Pixels
    } else if names
        .iter()
        .any(|n| ["mean", "std", "fg_fraction"].contains(n))
    {
        Read::Statistics
    } else {
        Read::Geometry
    }
}

/// A cell selector from a physical filter over the patch schema, evaluated on an image's
/// geometry rows (no pixels needed).
fn cell_selector(expr: Arc<dyn PhysicalExpr>, channels: usize) -> CellSelector {
    CellSelector(Arc::new(move |key: &ImageKey, grid: &Grid, level: u32| {
        let cut = Cut {
            level,
            channels,
            foreground: Default::default(),
            pixels: false,
            selected: None,
        };
        let bands: Vec<RecordBatch> = (0..grid.rows)
            .map(|row| segment_batch(key, grid, row, 0..grid.cols, None, &cut))
            .collect();
        let all = arrow::compute::concat_batches(&patch_schema(), &bands)?;
        let keep = expr
            .evaluate(&all)
            .and_then(|v| v.into_array(all.num_rows()))
            .map_err(|e| e.context("cell filter"))?;
        let keep = keep
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or("cell filter is not boolean")?;
        Ok(Some(
            (0..keep.len())
                .map(|i| keep.is_valid(i) && keep.value(i))
                .collect(),
        ))
    }))
}

/// The cell selector of a pushed cell filter (a logical filter over the patch schema's geometry
/// columns). Built where the scan runs: at planning here, on the executor on a cluster.
pub(crate) fn cell_selector_for(filter: &Expr, channels: usize) -> Result<CellSelector> {
    let df_schema = DFSchema::try_from(patch_schema().as_ref().clone())?;
    let expr = datafusion::physical_expr::create_physical_expr(
        filter,
        &df_schema,
        &datafusion::execution::context::ExecutionProps::new(),
        &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext::default(),
    )?;
    Ok(cell_selector(expr, channels))
}

/// The `patches` table of a data set.
#[derive(Debug)]
pub struct PatchesTable {
    pub(crate) data: DataSet,
    /// Images that could not be read by any scan of this table (reported by `patchgd sql`).
    pub failures: Arc<Mutex<Vec<Failure>>>,
}

impl PatchesTable {
    pub fn new(data: DataSet) -> Self {
        Self::with_failures(data, Default::default())
    }

    /// Report images that cannot be read into `failures`.
    pub fn with_failures(data: DataSet, failures: Arc<Mutex<Vec<Failure>>>) -> Self {
        Self { data, failures }
    }
}

#[async_trait]
impl TableProvider for PatchesTable {
    fn schema(&self) -> SchemaRef {
        patch_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        Ok(pushdown(filters, |f| reads_only(f, GEOMETRY_COLUMNS)))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (images, listed, failures) = self.data.entries().await?;
        let listed_count = listed.len();
        let image_filter = conjunction(
            filters
                .iter()
                .filter(|f| reads_only(f, IMAGE_COLUMNS))
                .cloned(),
        );
        let cell_filter = conjunction(
            filters
                .iter()
                .filter(|f| reads_only(f, GEOMETRY_COLUMNS) && !reads_only(f, IMAGE_COLUMNS))
                .cloned(),
        );
        let entries = filter_entries(state, listed, image_filter.clone())?;
        let schema = patch_schema();
        let mut config = self.data.stream.clone();
        config.read = read_for(&schema, projection);
        config.drop_unselected = true;
        if let Some(f) = &cell_filter {
            config.select = Some(cell_selector_for(f, config.channels)?);
        }
        let projected = match projection {
            Some(p) => Arc::new(schema.project(p)?),
            None => schema,
        };
        self.failures.lock().unwrap().extend(failures.clone());
        let slices = slices_by_bytes(&entries, state.config().target_partitions());
        let scan = PatchScan {
            data: self.data.clone(),
            images,
            entries: entries.into(),
            slices,
            listed: listed_count,
            listing_failures: failures,
            config,
            projection: projection.cloned(),
            schema: projected,
            pushed: [image_filter, cell_filter],
        };
        Ok(Arc::new(PatchesExec::new(scan, self.failures.clone())?))
    }
}

/// Cut `entries` into at most `n` contiguous, non-empty slices of about the same bytes (one
/// slice when there are no entries): a partition's images are neighbours in the listing, and a
/// few large slides do not all land in one partition.
pub fn slices_by_bytes(entries: &[ImageEntry], n: usize) -> Vec<Range<usize>> {
    let n = n.clamp(1, entries.len().max(1));
    let total: u64 = entries.iter().map(|e| e.size.max(1)).sum();
    let mut slices = Vec::with_capacity(n);
    let (mut start, mut bytes) = (0, 0u64);
    for (i, e) in entries.iter().enumerate() {
        bytes += e.size.max(1);
        let left = n - slices.len() - 1; // slices still to make after this one
        let images_after = entries.len() - i - 1;
        // Close the slice at its share of the bytes, or when every later slice needs one of the
        // remaining images.
        let due = bytes * n as u64 >= total * (slices.len() as u64 + 1);
        if left > 0 && (due || images_after == left) {
            slices.push(start..i + 1);
            start = i + 1;
        }
    }
    slices.push(start..entries.len());
    slices
}

/// What a `patches` scan reads: everything a cluster's executor needs to redo it.
#[derive(Clone)]
pub(crate) struct PatchScan {
    pub(crate) data: DataSet,
    pub(crate) images: crate::storage::Location,
    pub(crate) entries: Arc<[ImageEntry]>,
    /// Each slice's images: contiguous ranges of `entries`.
    pub(crate) slices: Vec<Range<usize>>,
    /// Images listed before the listing filters.
    pub(crate) listed: usize,
    /// Failures known before streaming (objects without a label).
    pub(crate) listing_failures: Vec<Failure>,
    /// One slice's source stage (its share of the byte budget and of the decode workers).
    pub(crate) config: crate::source::StreamConfig,
    pub(crate) projection: Option<Vec<usize>>,
    /// The projected schema.
    pub(crate) schema: SchemaRef,
    /// The image filter and the cell filter, as pushed (shown by EXPLAIN).
    pub(crate) pushed: [Option<Expr>; 2],
}

/// The source stage as a DataFusion node: one partition per slice of the images (given by its
/// slice source, [`super::slices`]), each with its patches in image order.
pub struct PatchesExec {
    pub(crate) scan: PatchScan,
    failures: Arc<Mutex<Vec<Failure>>>,
    /// Also log each failure (a cluster's executor: nobody collects `failures` there).
    pub(crate) log_failures: bool,
    /// The slice source: partition `p` reads the slices it holds.
    pub(crate) input: Arc<dyn ExecutionPlan>,
    metrics: ExecutionPlanMetricsSet,
    failed: Count,
    properties: Arc<PlanProperties>,
}

impl fmt::Debug for PatchesExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PatchesExec")
    }
}

impl PatchesExec {
    /// The scan of `scan.slices`, the stage settings being the whole scan's: each slice's stage
    /// gets its share of the byte budget and of the decode workers (at least one), so N
    /// partitions decode max(workers, N) images at once.
    fn new(mut scan: PatchScan, failures: Arc<Mutex<Vec<Failure>>>) -> Result<Self> {
        let n = scan.slices.len();
        scan.config.buffer_bytes = (scan.config.buffer_bytes / n).max(1 << 20);
        scan.config.decode_workers = (scan.config.decode_workers / n).max(1);
        let input = slice_source(n)?;
        Ok(Self::with_stage_config(scan, failures, input))
    }

    /// A scan whose `config` is already one slice's stage: how a cluster's executor rebuilds
    /// the scan it receives, and how a scan moves to another slice source.
    pub(crate) fn with_stage_config(
        mut scan: PatchScan,
        failures: Arc<Mutex<Vec<Failure>>>,
        input: Arc<dyn ExecutionPlan>,
    ) -> Self {
        let metrics = ExecutionPlanMetricsSet::new();
        scan.config.counters = SourceCounters {
            opened: MetricBuilder::new(&metrics).global_counter("images_opened"),
            decoded: MetricBuilder::new(&metrics).global_counter("images_decoded"),
        };
        let failed = MetricBuilder::new(&metrics).global_counter("images_failed");
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(scan.schema.clone()),
            Partitioning::UnknownPartitioning(input.properties().partitioning.partition_count()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            scan,
            failures,
            log_failures: false,
            input,
            metrics,
            failed,
            properties,
        }
    }
}

impl DisplayAs for PatchesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let scan = &self.scan;
        let read = match scan.config.read {
            Read::Geometry => "geometry (headers only)",
            Read::Statistics => "statistics (pixels decoded, not kept)",
            Read::Pixels => "pixels",
        };
        write!(
            f,
            "PatchesExec: url={}, patch={}, stride={}, read={read}, images={} of {}, partitions={}",
            scan.data.images,
            scan.config.patch,
            scan.config.stride,
            scan.entries.len(),
            scan.listed,
            self.properties.partitioning.partition_count()
        )?;
        if let Some(e) = &scan.pushed[0] {
            write!(f, ", image_filter=[{e}]")?;
        }
        if let Some(e) = &scan.pushed[1] {
            write!(f, ", cell_filter=[{e}]")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for PatchesExec {
    fn name(&self) -> &'static str {
        "PatchesExec"
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
        match (children.pop(), children.is_empty()) {
            (Some(input), true) => {
                let mut scan =
                    Self::with_stage_config(self.scan.clone(), self.failures.clone(), input);
                scan.log_failures = self.log_failures;
                Ok(Arc::new(scan))
            }
            _ => datafusion::common::internal_err!("PatchesExec has one child, its slice source"),
        }
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
        // Only what the stream needs: the image list is shared, not copied, per partition.
        let scan = &self.scan;
        let (images, entries, slices) = (
            scan.images.clone(),
            scan.entries.clone(),
            scan.slices.clone(),
        );
        let (listing_failures, config, projection) = (
            scan.listing_failures.clone(),
            scan.config.clone(),
            scan.projection.clone(),
        );
        let (failures, failed) = (self.failures.clone(), self.failed.clone());
        let log_failures = self.log_failures;
        let output_rows = MetricBuilder::new(&self.metrics).output_rows(partition);
        let input = self.input.clone();
        // Started on first poll, inside the runtime that drives the query.
        let stream = futures::stream::once(async move {
            let mine = slices_of(input, partition, context, slices.len()).await?;
            let streams = mine.into_iter().map(move |k| {
                // Objects that failed before any partition (no label) count once: with slice 0.
                if k == 0 {
                    failed.add(listing_failures.len());
                    if log_failures {
                        listing_failures.iter().for_each(super::log_failure);
                    }
                }
                let slice = SliceRead {
                    projection: projection.clone(),
                    failures: failures.clone(),
                    failed: failed.clone(),
                    output_rows: output_rows.clone(),
                    log_failures,
                };
                slice.stream(
                    images.clone(),
                    entries[slices[k].clone()].to_vec(),
                    config.clone(),
                )
            });
            Ok::<_, datafusion::error::DataFusionError>(futures::stream::iter(streams).flatten())
        })
        .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.scan.schema.clone(),
            stream,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Where one slice's patches and failures go.
#[derive(Clone)]
struct SliceRead {
    projection: Option<Vec<usize>>,
    failures: Arc<Mutex<Vec<Failure>>>,
    failed: Count,
    output_rows: Count,
    log_failures: bool,
}

impl SliceRead {
    /// One source stage over `entries`: its patch batches (projected), failures counted aside.
    fn stream(
        self,
        images: crate::storage::Location,
        entries: Vec<ImageEntry>,
        config: crate::source::StreamConfig,
    ) -> impl futures::Stream<Item = Result<RecordBatch>> + Send {
        futures::stream::unfold(stream_images(images, entries, config), move |mut rx| {
            let this = self.clone();
            async move {
                loop {
                    match rx.recv().await? {
                        SourceItem::Batch(b) => {
                            let batch = match &this.projection {
                                Some(p) => b.batch.project(p).map_err(Into::into),
                                None => Ok(b.batch),
                            };
                            if let Ok(b) = &batch {
                                this.output_rows.add(b.num_rows());
                            }
                            return Some((batch, rx));
                        }
                        SourceItem::Failed(f) => {
                            this.failed.add(1);
                            if this.log_failures {
                                super::log_failure(&f);
                            }
                            this.failures.lock().unwrap().push(f);
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(sizes: &[u64]) -> Vec<ImageEntry> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| ImageEntry {
                image_id: format!("i{i}"),
                path: format!("i{i}.png").into(),
                url: format!("memory:///i{i}.png"),
                size,
                label: None,
                split: None,
            })
            .collect()
    }

    #[test]
    fn slices_are_contiguous_non_empty_and_about_equal_in_bytes() {
        let cover = |sizes: &[u64], n: usize| {
            let s = slices_by_bytes(&entries(sizes), n);
            let flat: Vec<usize> = s.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(flat, (0..sizes.len()).collect::<Vec<_>>(), "{sizes:?} {n}");
            assert!(s.iter().all(|r| !r.is_empty()) || sizes.is_empty(), "{s:?}");
            s
        };
        assert_eq!(cover(&[10, 10, 10, 10], 2), vec![0..2, 2..4]);
        // One large image: alone in its slice, the small ones share the other.
        assert_eq!(cover(&[100, 1, 1, 1], 2), vec![0..1, 1..4]);
        assert_eq!(cover(&[1, 1, 1, 100], 2), vec![0..3, 3..4]);
        // More partitions than images: one image each.
        assert_eq!(cover(&[5, 5], 8), vec![0..1, 1..2]);
        // Every later slice keeps an image, even when the bytes say otherwise.
        assert_eq!(cover(&[1, 1, 1, 1000], 4), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(cover(&[], 3), vec![0..0]);
        assert_eq!(cover(&[0, 0, 0], 2).len(), 2);
        for n in 1..7 {
            let sizes: Vec<u64> = (0..17).map(|i| (i * 37 % 11 + 1) as u64).collect();
            assert_eq!(cover(&sizes, n).len(), n.min(17));
        }
    }
}
