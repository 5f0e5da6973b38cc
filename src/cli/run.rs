//! `patchgd run`: a pipeline file, with `--set` overrides, to the end.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Context, Result};
use patchgd::dist::Group;
use patchgd::pipeline::{Definition, RunOptions, TraceOptions, run_with};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    pipeline: PathBuf,
    /// Override a key of the file, e.g. `--set method=gd --set output=out/gd` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Plain log lines even on a terminal.
    #[arg(long)]
    no_progress: bool,
    /// Start over: delete the checkpoints under the output instead of resuming from them.
    /// (Without it, a run resumes from its newest complete checkpoint.)
    #[arg(long)]
    fresh: bool,
    /// Write the run's trace to this local directory: every random choice and what it gave,
    /// for a replay by the PyTorch twin (docs/parity.md). Needs a run from its first step.
    #[arg(long, value_name = "DIR")]
    trace: Option<PathBuf>,
    /// With --trace: the weights after every N-th step (0: none). The demo's model is 1.6 MB
    /// a step.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "trace")]
    trace_weights_every: u64,
}

/// Run the pipeline file with its overrides as one rank of `group`; print the summary line
/// (rank 0).
pub fn run(args: &RunArgs, group: Rc<Group>) -> Result<()> {
    let pipeline = &args.pipeline;
    let text = std::fs::read_to_string(pipeline)
        .with_context(|| format!("cannot read pipeline file '{}'", pipeline.display()))?;
    let overrides: Vec<&str> = args.set.iter().map(String::as_str).collect();
    let def =
        Definition::from_yaml_with_overrides(&text, &pipeline.display().to_string(), &overrides)?;
    let root = group.is_root();
    let progress = Arc::new(super::progress::Progress::new(!args.no_progress && root));
    let summary = run_with(
        &def,
        &RunOptions {
            fresh: args.fresh,
            observer: Some(progress.clone()),
            group: Some(group),
            trace: args.trace.clone().map(|dir| TraceOptions {
                dir,
                weights_every: args.trace_weights_every,
            }),
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
