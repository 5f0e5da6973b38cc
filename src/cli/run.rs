//! `patchgd run`: a pipeline file, with `--set` overrides, to the end.

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result};
use patchgd::dist::Group;
use patchgd::pipeline::{Definition, RunOptions, run_with};

/// Run the pipeline file at `pipeline` with `set` overrides as one rank of `group`; print the
/// summary line (rank 0).
pub fn run(
    pipeline: &Path,
    set: &[String],
    no_progress: bool,
    fresh: bool,
    group: Rc<Group>,
) -> Result<()> {
    let text = std::fs::read_to_string(pipeline)
        .with_context(|| format!("cannot read pipeline file '{}'", pipeline.display()))?;
    let overrides: Vec<&str> = set.iter().map(String::as_str).collect();
    let def =
        Definition::from_yaml_with_overrides(&text, &pipeline.display().to_string(), &overrides)?;
    let root = group.is_root();
    let progress = Arc::new(super::progress::Progress::new(!no_progress && root));
    let summary = run_with(
        &def,
        &RunOptions {
            fresh,
            observer: Some(progress.clone()),
            group: Some(group),
        },
    );
    progress.finish();
    let summary = summary?;
    if !root {
        return Ok(());
    }
    println!(
        "{}: validation accuracy {:.3} (QWK {:.3}) after {} epoch{}; images seen {} = used {} + failed {}{}; {:.1} s; results in {}",
        summary.name,
        summary.final_val_accuracy,
        summary.final_val_qwk,
        summary.epochs,
        if summary.epochs == 1 { "" } else { "s" },
        summary.images_seen,
        summary.images_used,
        summary.images_failed,
        if summary.images_deselected > 0 {
            format!(" + left out by select: {}", summary.images_deselected)
        } else {
            String::new()
        },
        summary.wall_seconds,
        summary.output
    );
    if summary.ranks > 1 {
        println!("trained data-parallel on {} ranks", summary.ranks);
    }
    Ok(())
}
