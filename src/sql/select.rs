//! `select:` in a pipeline: a query over `images` and `patches` that decides the training set.
//!
//! The query returns `image_id` (whole images are chosen) or `image_id, row, col` (single
//! patches are chosen; the others of a chosen image are never decoded where the format allows,
//! and stay zero in its latent grid). It runs before training with the pipeline's own source
//! settings, so its filters are pushed to the source: a query on the listing or the geometry
//! decodes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, UInt32Type};
use datafusion::error::DataFusionError;

use super::{DataSet, Sources, first_keyword, query, refused_kind, register, session};
use crate::patch::Grid;
use crate::patch::ImageKey;
use crate::source::Failure;
use crate::source::stream::CellSelector;

/// What a `select:` query chose.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    pub images: HashSet<String>,
    /// Per image, the chosen cells; `None` when the query chose whole images.
    pub cells: Option<HashMap<String, HashSet<(u32, u32)>>>,
    /// Images the query's scans could not read.
    pub failures: Vec<Failure>,
}

impl Selection {
    /// A selector that keeps the chosen cells of each image (all of them for whole images).
    pub fn cell_selector(&self) -> Option<CellSelector> {
        let cells = Arc::new(self.cells.clone()?);
        Some(CellSelector(Arc::new(
            move |key: &ImageKey, grid: &Grid, _level: u32| {
                let chosen = cells.get(&key.image_id);
                Ok(Some(
                    (0..grid.rows)
                        .flat_map(|r| (0..grid.cols).map(move |c| (r as u32, c as u32)))
                        .map(|cell| chosen.is_some_and(|s| s.contains(&cell)))
                        .collect(),
                ))
            },
        )))
    }
}

/// Refuse what is not a query, naming `select:`.
pub fn check_query(sql: &str) -> Result<(), DataFusionError> {
    let first = first_keyword(sql);
    if refused_kind(sql).is_some() || !["SELECT", "WITH", "VALUES"].contains(&first.as_str()) {
        let shown: String = sql.trim().chars().take(60).collect();
        return Err(DataFusionError::Plan(format!(
            "select: must be a query that returns image_id (and optionally row, col), \
             e.g. SELECT image_id FROM images WHERE split = 'train'; got '{shown}'"
        )));
    }
    Ok(())
}

/// Plan `sql` as a selection over `data`: checks that it is a query and that its result has the
/// columns a selection needs.
pub async fn plan(
    data: &DataSet,
    sql: &str,
) -> Result<(datafusion::prelude::DataFrame, super::Reported), DataFusionError> {
    plan_in(session(), data, sql).await
}

/// [`plan`] in `ctx` (a local session, or one connected to a cluster).
pub async fn plan_in(
    ctx: datafusion::prelude::SessionContext,
    data: &DataSet,
    sql: &str,
) -> Result<(datafusion::prelude::DataFrame, super::Reported), DataFusionError> {
    check_query(sql)?;
    let reported = register(
        &ctx,
        &Sources {
            data: Some(data.clone()),
            run: None,
            storage: data.storage.clone(),
        },
    )
    .await?;
    let df = query(&ctx, sql).await?;
    let schema = df.schema();
    if schema.field_with_unqualified_name("image_id").is_err() {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        return Err(DataFusionError::Plan(format!(
            "select: the query's result has no column 'image_id' (it has {}); return image_id \
             for whole images or image_id, row, col for patches",
            names.join(", ")
        )));
    }
    Ok((df, reported))
}

/// Run a `select:` query and collect what it chose.
pub async fn run(data: &DataSet, sql: &str) -> Result<Selection, DataFusionError> {
    run_on(None, data, sql).await
}

/// [`run`], on the Ballista cluster whose scheduler is at `cluster` (`df://HOST:PORT`) when
/// given. On a cluster, images that cannot be read are logged by the executor that met them
/// and are not in [`Selection::failures`]: the query does not choose them.
pub async fn run_on(
    cluster: Option<&str>,
    data: &DataSet,
    sql: &str,
) -> Result<Selection, DataFusionError> {
    let ctx = match cluster {
        None => session(),
        Some(url) => super::cluster::connect(url, super::default_partitions())
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?,
    };
    let (df, reported) = plan_in(ctx, data, sql).await?;
    let schema = df.schema().clone();
    let has = |n: &str| schema.field_with_unqualified_name(n).is_ok();
    let by_cell = has("row") && has("col");
    let batches: Vec<RecordBatch> = df.collect().await?;
    let mut selection = Selection {
        cells: by_cell.then(HashMap::new),
        ..Default::default()
    };
    for b in &batches {
        let ids = cast(b.column_by_name("image_id").unwrap(), &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let (rows, cols) = if by_cell {
            let rows = cast(b.column_by_name("row").unwrap(), &DataType::UInt32)?;
            let cols = cast(b.column_by_name("col").unwrap(), &DataType::UInt32)?;
            (Some(rows), Some(cols))
        } else {
            (None, None)
        };
        for i in 0..b.num_rows() {
            if ids.is_null(i) {
                continue;
            }
            let id = ids.value(i).to_string();
            if let (Some(r), Some(c), Some(cells)) = (&rows, &cols, selection.cells.as_mut()) {
                let (r, c) = (
                    r.as_primitive::<UInt32Type>(),
                    c.as_primitive::<UInt32Type>(),
                );
                if r.is_valid(i) && c.is_valid(i) {
                    cells
                        .entry(id.clone())
                        .or_default()
                        .insert((r.value(i), c.value(i)));
                }
            }
            selection.images.insert(id);
        }
    }
    selection.failures = reported.take();
    Ok(selection)
}
