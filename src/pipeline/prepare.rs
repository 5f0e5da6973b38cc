//! The first stage of a run: from a definition to the images it trains and evaluates on, before
//! any model exists. Lists and labels the images, applies `select:`, and settles the classes.

#![warn(missing_docs)]

use std::collections::BTreeSet;

use tokio::runtime::Runtime;

use super::definition::Definition;
use super::runner::RunError;
use crate::model::{Method, ModelSpec};
use crate::source::{Catalog, ImageEntry, Split, StreamConfig};
use crate::storage::Location;

/// What a run reads and writes, settled before training starts.
#[derive(Debug)]
pub struct Prepared {
    /// Where the images are (`source.images`).
    pub images: Location,
    /// Where the outputs go (`output`).
    pub output: Location,
    /// Where the checkpoints go (under the output unless `checkpoint.url` says otherwise).
    pub checkpoints: Location,
    /// Every listed object: the labelled images (after `select:`) and those that failed.
    pub catalog: Catalog,
    /// How images are streamed (with `select:`'s patch selection, for PatchGD).
    pub stream: StreamConfig,
    /// Labelled images that `select:` left out.
    pub deselected: usize,
    /// The training images, in listing order (each epoch shuffles its own copy).
    pub train_set: Vec<ImageEntry>,
    /// The validation images.
    pub val_set: Vec<ImageEntry>,
    /// Classes the model predicts (`model.classes`, or implied by the labels).
    pub classes: i64,
}

impl Prepared {
    /// The model these images and the definition call for.
    pub fn model_spec(&self, def: &Definition) -> ModelSpec {
        def.model_spec(self.classes)
    }

    /// One line about what the run trains on, for its observer.
    pub fn describe(&self, def: &Definition, device: &str) -> String {
        let c = &self.catalog;
        format!(
            "{}: {} on {device} — {} train / {} val images, {} classes, {} failed at listing, {} labels rows without an image{}{}",
            def.name,
            match def.method {
                Method::Patchgd => "PatchGD",
                Method::Gd => "GD",
            },
            self.train_set.len(),
            self.val_set.len(),
            self.classes,
            c.failures.len(),
            c.labels_without_image.len(),
            c.labels_without_image
                .first()
                .map_or(String::new(), |id| format!(" (first: '{id}')")),
            if def.select.is_some() {
                format!(", {} left out by select:", self.deselected)
            } else {
                String::new()
            }
        )
    }
}

/// List and label the images, apply `select:`, and check the labels against the classes.
pub fn prepare(def: &Definition, rt: &Runtime) -> Result<Prepared, RunError> {
    let images = Location::parse_with(&def.source.images, &def.storage)?;
    let output = Location::parse_with(&def.output, &def.storage)?;
    let checkpoints = Location::parse_with(&def.checkpoint_url(), &def.storage)?;
    let mut catalog = rt.block_on(Catalog::load(&images, &def.source.labels, &def.storage))?;
    let mut stream = def.stream_config();
    let deselected = match &def.select {
        Some(sql) => apply_select(def, sql, &mut catalog, &mut stream, rt)?,
        None => 0,
    };
    let train_set = catalog.split(Split::Train);
    let val_set = catalog.split(Split::Val);
    if train_set.is_empty() {
        return Err(RunError::Data(format!(
            "no labelled training images (split 'train') under '{}'",
            images.url
        )));
    }
    let classes = def
        .model
        .classes
        .unwrap_or(catalog.implied_classes().max(2) as i64);
    if let Some(e) = catalog
        .images
        .iter()
        .find(|e| e.label.is_some_and(|l| l >= classes))
    {
        return Err(RunError::Data(format!(
            "image '{}' has label {} but model.classes is {classes}: labels must be 0..{}",
            e.image_id,
            e.label.unwrap_or_default(),
            classes - 1
        )));
    }
    Ok(Prepared {
        images,
        output,
        checkpoints,
        catalog,
        stream,
        deselected,
        train_set,
        val_set,
        classes,
    })
}

/// `select:` chooses the training set before anything is trained (docs/sql.md): keep the
/// images it selects, count the rest, record the images it could not read as failures.
/// Returns how many labelled images it left out.
fn apply_select(
    def: &Definition,
    sql: &str,
    catalog: &mut Catalog,
    stream: &mut StreamConfig,
    rt: &Runtime,
) -> Result<usize, RunError> {
    let selection = rt
        .block_on(crate::sql::select::run_on(
            def.select_cluster.as_deref(),
            &def.data_set(),
            sql,
        ))
        .map_err(RunError::Select)?;
    let listed: BTreeSet<String> = catalog.images.iter().map(|e| e.image_id.clone()).collect();
    let failures: Vec<_> = selection
        .failures
        .iter()
        .filter(|f| listed.contains(&f.image_id))
        .cloned()
        .collect();
    let failed: BTreeSet<&str> = failures.iter().map(|f| f.image_id.as_str()).collect();
    let before = catalog.images.len();
    catalog.images.retain(|e| {
        selection.images.contains(&e.image_id) && !failed.contains(e.image_id.as_str())
    });
    let deselected = before - catalog.images.len() - failed.len();
    catalog.failures.extend(failures);
    // GD reads whole images: a patch selection chooses its images only.
    if def.method == Method::Patchgd {
        stream.select = selection.cell_selector();
    }
    Ok(deselected)
}
