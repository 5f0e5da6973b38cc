//! Where a new run's weights come from, when not from random initialisation:
//! `model.pretrained` (a backbone file: torchvision's or patchgd's) or `model.init_from` (a
//! previous run's output or checkpoint). A resumed run has its checkpoint's weights instead.

#![warn(missing_docs)]

use super::definition::Definition;
use super::predict::TrainedModel;
use super::runner::RunError;
use crate::model::Model;
use crate::model::pretrained::{load_backbone, load_run_weights, read_tensors};
use crate::storage::Location;

/// Load what the definition names into `model`; returns the lines to log (what was loaded,
/// what starts fresh, and why).
pub async fn load(model: &Model, def: &Definition) -> Result<Vec<String>, RunError> {
    let mut lines = Vec::new();
    if let Some(url) = &def.model.pretrained {
        lines.extend(load_pretrained(model, url, def).await?);
    }
    if let Some(url) = &def.model.init_from {
        lines.extend(init_from(model, url, def).await?);
    }
    Ok(lines)
}

/// Load `model.init_from` (a run output or checkpoint directory, read as `patchgd predict`
/// reads its model); returns the lines to log.
async fn init_from(model: &Model, url: &str, def: &Definition) -> Result<Vec<String>, RunError> {
    let earlier = TrainedModel::load(url, &def.storage).await?;
    let weights = &earlier.weights_url;
    let report = load_run_weights(model, &earlier.weights, weights)?;
    let mut lines = vec![format!(
        "init_from: loaded {} tensors from {weights}",
        report.loaded
    )];
    if let Some(why) = report.fresh_head {
        lines.push(format!("init_from: the head starts fresh: {why}"));
    }
    // Weights are only as good as the input statistics they were trained with.
    let before = &earlier.definition.source.normalize;
    if *before != def.source.normalize {
        lines.push(format!(
            "init_from: warning: the earlier run normalised its input as {before:?}, this one as {:?}",
            def.source.normalize
        ));
    }
    Ok(lines)
}

/// Fetch `model.pretrained` and load the backbone from it.
async fn load_pretrained(
    model: &Model,
    url: &str,
    def: &Definition,
) -> Result<Vec<String>, RunError> {
    let (loc, path) = Location::parse_object(url, &def.storage)?;
    let bytes = loc.get(&path).await?;
    let tensors = read_tensors(&bytes, url)?;
    Ok(load_backbone(model, &tensors, url)?.lines(url))
}
