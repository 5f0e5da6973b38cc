//! The tables of one run directory: `metrics`, `predictions`, `errors` (its Parquet files) and
//! `latents` (the latent store of its newest complete checkpoint, streamed from the Arrow file
//! in that checkpoint, never whole in memory).

use std::fs::File;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatchReader;
use datafusion::catalog::TableProvider;
use datafusion::catalog::streaming::StreamingTable;
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
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
            let source = LatentFile::open(Arc::new(loaded))?;
            let schema = source.schema.clone();
            return Ok(Arc::new(StreamingTable::try_new(
                schema,
                vec![Arc::new(source)],
            )?));
        }
    }
    Err(ext(format!(
        "run '{run_url}' has no complete checkpoint (looked in '{base}/checkpoints' and '{base}'), so no latents"
    )))
}

/// The latents file of a loaded checkpoint, read one batch at a time on every scan.
#[derive(Debug)]
struct LatentFile {
    loaded: Arc<Loaded>,
    schema: SchemaRef,
}

impl LatentFile {
    fn open(loaded: Arc<Loaded>) -> Result<Self> {
        let path = loaded
            .path("latents.arrow")
            .ok_or_else(|| ext("the checkpoint has no latents.arrow".into()))?;
        let reader = StreamReader::try_new(File::open(&path)?, None)?;
        Ok(Self {
            schema: reader.schema(),
            loaded,
        })
    }
}

impl PartitionStream for LatentFile {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let loaded = self.loaded.clone();
        let path = loaded.path("latents.arrow").expect("checked at open");
        let reader = File::open(&path)
            .map_err(DataFusionError::from)
            .and_then(|f| StreamReader::try_new(f, None).map_err(Into::into));
        let stream = match reader {
            Err(e) => futures::stream::iter(vec![Err(e)]).left_stream(),
            Ok(reader) => {
                // The reader keeps the checkpoint's temporary directory alive while it runs.
                let batches = reader.map(move |b| {
                    let _keep = &loaded;
                    b.map_err(DataFusionError::from)
                });
                futures::stream::iter(batches).right_stream()
            }
        };
        Box::pin(RecordBatchStreamAdapter::new(self.schema.clone(), stream))
    }
}

use futures::StreamExt as _;
