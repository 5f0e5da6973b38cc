//! The tables of one run directory: `metrics`, `predictions`, `errors` (its Parquet files) and
//! `latents` (the latent store of its newest complete checkpoint, streamed from the Arrow file
//! in that checkpoint, never whole in memory).

use std::fs::File;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatchReader;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning,
    PlanProperties, ReplaceChildrenOptions, SendableRecordBatchStream,
};
use datafusion::prelude::SessionContext;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::state::checkpoint::{self, Loaded};
use crate::storage::{Location, StorageError, StoreOptions};

/// The Parquet tables a run writes, by table name.
pub const RUN_TABLES: &[&str] = &["metrics", "predictions", "errors", "heatmaps"];

fn ext(message: String) -> DataFusionError {
    DataFusionError::External(message.into())
}

/// Register the run's tables in `ctx`: those of its Parquet files that exist (a training run
/// has metrics, predictions and errors; `patchgd predict` writes `predictions` and `errors`,
/// and `heatmaps` with `--heatmaps`). `latents` is left out
/// (with the reason returned) when the run has no complete checkpoint.
pub async fn register(
    ctx: &SessionContext,
    run_url: &str,
    storage: &StoreOptions,
) -> Result<Option<String>> {
    let mut registered = 0;
    for name in RUN_TABLES {
        if let Some(table) = parquet_table_if_present(run_url, name, storage).await? {
            ctx.register_table(*name, table)?;
            registered += 1;
        }
    }
    if registered == 0 {
        return Err(ext(format!(
            "'{run_url}' has none of {}: is it the output directory of a patchgd run or prediction?",
            RUN_TABLES
                .iter()
                .map(|t| format!("{t}.parquet"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    match latents_table(run_url, storage).await {
        Ok(t) => {
            ctx.register_table("latents", t)?;
            Ok(None)
        }
        Err(e) => Ok(Some(e.to_string())),
    }
}

/// `{run_url}/{name}.parquet` as an in-memory table (run tables are small).
pub async fn parquet_table(
    run_url: &str,
    name: &str,
    storage: &StoreOptions,
) -> Result<Arc<dyn TableProvider>> {
    parquet_table_if_present(run_url, name, storage)
        .await?
        .ok_or_else(|| {
            ext(format!(
                "run '{run_url}' has no {name}.parquet: is it the output directory of a patchgd run?"
            ))
        })
}

/// [`parquet_table`], or `None` when the file does not exist.
async fn parquet_table_if_present(
    run_url: &str,
    name: &str,
    storage: &StoreOptions,
) -> Result<Option<Arc<dyn TableProvider>>> {
    let run = Location::parse_with(run_url, storage)
        .map_err(|e| ext(format!("run URL '{run_url}': {e}")))?;
    let file = format!("{name}.parquet");
    let bytes = match run.get(&run.path(&file)).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(ext(format!("run '{run_url}': {e}"))),
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| {
            ext(format!(
                "'{}': not a readable Parquet file: {e}",
                run.url_of(&run.path(&file))
            ))
        })?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Arc::new(MemTable::try_new(schema, vec![batches])?)))
}

/// The latent store of the newest complete checkpoint under `{run_url}/checkpoints` (or under
/// `run_url` itself, when it is a checkpoint root).
pub async fn latents_table(
    run_url: &str,
    storage: &StoreOptions,
) -> Result<Arc<dyn TableProvider>> {
    let base = run_url.trim_end_matches('/');
    for root_url in [format!("{base}/checkpoints"), base.to_string()] {
        let root = Location::parse_with(&root_url, storage)
            .map_err(|e| ext(format!("run URL '{run_url}': {e}")))?;
        let (loaded, _skipped) = checkpoint::newest(&root)
            .await
            .map_err(|e| ext(format!("checkpoints under '{root_url}': {e}")))?;
        if let Some(loaded) = loaded {
            let file = LatentFile {
                root: root_url,
                step: loaded.manifest.step,
                storage: storage.clone(),
                loaded: tokio::sync::OnceCell::new_with(Some(Arc::new(loaded))),
            };
            let schema = file.read_schema().await?;
            return Ok(Arc::new(LatentsTable {
                file: Arc::new(file),
                schema,
            }));
        }
    }
    Err(ext(format!(
        "run '{run_url}' has no complete checkpoint (looked in '{base}/checkpoints' and '{base}'), so no latents"
    )))
}

/// The `latents.arrow` of one checkpoint (a checkpoint root and a step), loaded once, when
/// first needed: at planning on the machine that finds the checkpoint, at execution on a
/// cluster's executor that receives the scan.
#[derive(Debug)]
pub struct LatentFile {
    /// The checkpoint root's URL.
    pub root: String,
    pub step: u64,
    pub storage: StoreOptions,
    loaded: tokio::sync::OnceCell<Arc<Loaded>>,
}

impl LatentFile {
    /// The file of the checkpoint at `step` under `root`, not read yet.
    pub fn new(root: String, step: u64, storage: StoreOptions) -> Self {
        Self {
            root,
            step,
            storage,
            loaded: tokio::sync::OnceCell::new(),
        }
    }

    /// The local copy of `latents.arrow`, reading and verifying the checkpoint the first time.
    async fn path(&self) -> Result<std::path::PathBuf> {
        let loaded = self
            .loaded
            .get_or_try_init(|| async {
                let root = Location::parse_with(&self.root, &self.storage)
                    .map_err(|e| ext(format!("checkpoint root '{}': {e}", self.root)))?;
                checkpoint::read(&root, self.step)
                    .await
                    .map(Arc::new)
                    .map_err(|e| {
                        ext(format!(
                            "checkpoint {} under '{}': {e}",
                            self.step, self.root
                        ))
                    })
            })
            .await?;
        loaded.path("latents.arrow").ok_or_else(|| {
            ext(format!(
                "checkpoint {} under '{}' has no latents.arrow",
                self.step, self.root
            ))
        })
    }

    async fn read_schema(&self) -> Result<SchemaRef> {
        let reader = StreamReader::try_new(File::open(self.path().await?)?, None)?;
        Ok(reader.schema())
    }

    /// Every batch of the file, one at a time, projected.
    fn stream(
        self: Arc<Self>,
        schema: SchemaRef,
        projection: Option<Vec<usize>>,
    ) -> SendableRecordBatchStream {
        let stream = futures::stream::once(async move {
            let path = self.path().await?;
            let reader = StreamReader::try_new(File::open(&path)?, None)?;
            // The reader keeps the checkpoint's temporary directory (in `self`) alive.
            let batches = reader.map(move |b| {
                let _keep = &self;
                let b = b?;
                Ok(match &projection {
                    Some(p) => b.project(p)?,
                    None => b,
                })
            });
            Ok::<_, DataFusionError>(futures::stream::iter(batches))
        })
        .try_flatten();
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

/// The `latents` table: one checkpoint's latent store, streamed on every scan.
#[derive(Debug)]
pub struct LatentsTable {
    pub file: Arc<LatentFile>,
    pub schema: SchemaRef,
}

#[async_trait::async_trait]
impl TableProvider for LatentsTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(LatentsExec::new(
            self.file.clone(),
            self.schema.clone(),
            projection.cloned(),
        )?))
    }
}

/// A scan of a [`LatentFile`]: one partition, batches in file order.
#[derive(Debug)]
pub struct LatentsExec {
    pub file: Arc<LatentFile>,
    /// The whole file's schema.
    pub table_schema: SchemaRef,
    pub projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
}

impl LatentsExec {
    pub fn new(
        file: Arc<LatentFile>,
        table_schema: SchemaRef,
        projection: Option<Vec<usize>>,
    ) -> Result<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(table_schema.project(p)?),
            None => table_schema.clone(),
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            file,
            table_schema,
            projection,
            properties,
        })
    }
}

impl DisplayAs for LatentsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "LatentsExec: checkpoint={} under {}",
            self.file.step, self.file.root
        )
    }
}

impl ExecutionPlan for LatentsExec {
    fn name(&self) -> &'static str {
        "LatentsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
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
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return datafusion::common::internal_err!(
                "LatentsExec has 1 partition, asked for partition {partition}"
            );
        }
        Ok(self.file.clone().stream(
            self.properties.eq_properties.schema().clone(),
            self.projection.clone(),
        ))
    }
}

use futures::TryStreamExt as _;
