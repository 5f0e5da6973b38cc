//! SQL over patch metadata, latents and runs, with DataFusion.
//!
//! ```text
//! images      one row per object under a URL (+ labels): size, format, width, height, levels
//! patches     one row per patch: geometry, statistics; pixels only when a query selects them
//! metrics · predictions · errors · latents      the tables of one run directory
//! images(url [, labels]) · patches(url, patch [, level [, labels]]) · latents(run)
//!             table functions: the same tables for any URL, in any SessionContext
//! vector_norm(v) · cosine_similarity(a, b) · byte_length(x)   UDFs (latent vectors, pixels)
//! ```
//!
//! [`register`] puts all of it into a caller's `SessionContext` in one call. The SQL surface is
//! read-only: [`query`] refuses DDL, DML, COPY and other statements with a clear message.

pub mod adapter;
pub mod cluster;
pub mod functions;
pub mod images;
pub mod patches;
pub mod run;
pub mod select;
#[cfg(feature = "cli")]
pub mod shell;
pub mod slices;

use std::sync::{Arc, Mutex};

use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};

use crate::source::{Catalog, Failure, ImageEntry, SourceError, StreamConfig, list_images};
use crate::storage::{Location, StoreOptions};

pub use images::ImagesTable;
pub use patches::PatchesTable;

/// A data set as SQL sees it: the images under a URL, their labels if any, and how they are cut
/// into patches.
#[derive(Clone, Debug)]
pub struct DataSet {
    /// The images' prefix (or one object).
    pub images: String,
    /// A labels table (CSV or Parquet with image_id, label, split); without one, `label` and
    /// `split` are null.
    pub labels: Option<String>,
    pub storage: StoreOptions,
    pub stream: StreamConfig,
}

impl DataSet {
    pub fn new(images: &str, patch: usize) -> Self {
        Self {
            images: images.to_string(),
            labels: None,
            storage: StoreOptions::default(),
            stream: StreamConfig::new(patch, 3),
        }
    }

    /// The listed images, and the objects that could not be labelled or listed (counted as
    /// failures).
    pub async fn entries(
        &self,
    ) -> Result<(Location, Vec<ImageEntry>, Vec<Failure>), DataFusionError> {
        let external = |e: SourceError| DataFusionError::External(Box::new(e));
        match &self.labels {
            Some(labels) => {
                let images = Location::parse_with(&self.images, &self.storage)
                    .map_err(|e| external(e.into()))?;
                let catalog = Catalog::load(&images, labels, &self.storage)
                    .await
                    .map_err(external)?;
                Ok((images, catalog.images, catalog.failures))
            }
            None => {
                let listing = list_images(&self.images, &self.storage)
                    .await
                    .map_err(external)?;
                Ok((listing.location, listing.images, listing.failures))
            }
        }
    }
}

/// What [`register`] adds besides the table functions and UDFs.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// Registered as `images` and `patches`.
    pub data: Option<DataSet>,
    /// A run's output URL: registered as `metrics`, `predictions`, `errors` and `latents`.
    pub run: Option<String>,
    /// Settings for object stores named in table-function URLs.
    pub storage: StoreOptions,
}

/// Images that scans of the registered tables could not read.
#[derive(Clone, Debug, Default)]
pub struct Reported(pub Arc<Mutex<Vec<Failure>>>);

impl Reported {
    /// The failures since the last call, by image id (partitions fail in any order; a report
    /// should not change with it).
    pub fn take(&self) -> Vec<Failure> {
        let mut failures = std::mem::take(&mut *self.0.lock().unwrap());
        failures.sort_by(|a, b| (&a.image_id, &a.stage).cmp(&(&b.image_id, &b.stage)));
        failures
    }
}

/// A session for patchgd queries: as many partitions as cores (a `patches` scan runs that many
/// source stages over slices of the images), and information_schema for `SHOW TABLES`.
pub fn session() -> SessionContext {
    session_with_partitions(default_partitions())
}

/// Partitions per scan by default: one per core.
pub fn default_partitions() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// [`session`] with `partitions` partitions per scan (1: one source stage, patches in listing
/// order).
pub fn session_with_partitions(partitions: usize) -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(partitions.max(1))
        .with_information_schema(true);
    SessionContext::new_with_config(config)
}

/// Register patchgd's tables, table functions and UDFs in `ctx`. Returns where image failures
/// will be reported.
pub async fn register(
    ctx: &SessionContext,
    sources: &Sources,
) -> Result<Reported, DataFusionError> {
    let reported = Reported::default();
    functions::register(ctx, &sources.storage, &reported);
    if let Some(data) = &sources.data {
        let patches = PatchesTable::with_failures(data.clone(), reported.0.clone());
        ctx.register_table("patches", Arc::new(patches))?;
        let images = ImagesTable::with_failures(data.clone(), reported.0.clone());
        ctx.register_table("images", Arc::new(images))?;
    }
    if let Some(run_url) = &sources.run {
        run::register(ctx, run_url, &sources.storage).await?;
    }
    Ok(reported)
}

/// A failure where no caller collects them (a cluster's executor): the log names the image.
pub(crate) fn log_failure(f: &Failure) {
    tracing::warn!(
        image_id = %f.image_id,
        url = %f.url,
        stage = %f.stage,
        "image not read: {}",
        f.message
    );
}

/// Whether `expr` reads only `columns`.
fn reads_only(expr: &datafusion::logical_expr::Expr, columns: &[&str]) -> bool {
    expr.column_refs()
        .iter()
        .all(|c| columns.contains(&c.name.as_str()))
}

/// Pushdown answers for a scan: `Inexact` for the filters it can use (DataFusion still applies
/// them), `Unsupported` for the rest.
fn pushdown(
    filters: &[&datafusion::logical_expr::Expr],
    usable: impl Fn(&datafusion::logical_expr::Expr) -> bool,
) -> Vec<datafusion::logical_expr::TableProviderFilterPushDown> {
    use datafusion::logical_expr::TableProviderFilterPushDown::{Inexact, Unsupported};
    filters
        .iter()
        .map(|f| if usable(f) { Inexact } else { Unsupported })
        .collect()
}

/// A statement's first keyword, upper case.
fn first_keyword(sql: &str) -> String {
    sql.trim_start()
        .split(|c: char| c.is_whitespace() || c == '(' || c == ';')
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// Statements the read-only surface refuses, by their first keyword.
fn refused_kind(sql: &str) -> Option<&'static str> {
    match first_keyword(sql).as_str() {
        "CREATE" | "DROP" | "ALTER" | "TRUNCATE" => Some("DDL"),
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" => Some("DML"),
        "COPY" => Some("COPY"),
        "SET" | "RESET" | "PREPARE" | "EXECUTE" | "DEALLOCATE" | "BEGIN" | "COMMIT"
        | "ROLLBACK" | "START" => Some("a statement"),
        _ => None,
    }
}

/// Plan a read-only query. DDL, DML, COPY and other statements are refused by name.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<DataFrame, DataFusionError> {
    if let Some(kind) = refused_kind(sql) {
        return Err(read_only(kind, sql));
    }
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    ctx.sql_with_options(sql, options).await.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("not supported") && (msg.contains("DDL") || msg.contains("DML")) {
            read_only(if msg.contains("DDL") { "DDL" } else { "DML" }, sql)
        } else if msg.contains("Statement not supported") {
            read_only("a statement", sql)
        } else {
            e
        }
    })
}

fn read_only(kind: &str, sql: &str) -> DataFusionError {
    let shown: String = sql.trim().chars().take(60).collect();
    DataFusionError::Plan(format!(
        "the patchgd SQL surface is read-only: {kind} is refused ('{shown}'); \
         only queries (SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE) run"
    ))
}
