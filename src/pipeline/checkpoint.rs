//! A run's checkpoint payload, in one place: what `state::checkpoint` (the mechanism: files
//! then manifest) stores for a pipeline run, how it is captured from and restored into the
//! trainer, and the rule that decides whether a pipeline file may resume it: only when every
//! setting that shapes the training trajectory is unchanged.
//!
//! Files of a checkpoint: `model.safetensors`, `optimizer.safetensors` (tensors),
//! `latents.arrow` (the latent store's snapshot), `state.yaml` ([`TrainingState`]).
//!
//! A data-parallel run of N ranks shares one checkpoint: rank 0 writes the weights, the
//! optimizer and `state.yaml`; every rank r writes its own latent shard `latents-rank-R.arrow`
//! and position `state-rank-R.yaml`; rank 0 writes the manifest last, once every rank has
//! reported its files complete.

#![warn(missing_docs)]

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::definition::Definition;
use super::runner::RunError;
use crate::sink::{EpochMetrics, weights};
use crate::source::Failure;
use crate::state::checkpoint::{self, Loaded};
use crate::storage::Location;
use crate::train::{PassOutcome, Prediction, Trainer};

const MODEL: &str = "model.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const LATENTS: &str = "latents.arrow";
const STATE: &str = "state.yaml";

/// What a run has accounted for so far, across epochs: checkpointed with the trainer, so a
/// resumed run reports what an uninterrupted one would.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    /// One row per finished epoch.
    pub metrics: Vec<EpochMetrics>,
    /// (epoch, failure); epoch 0 = at listing.
    pub errors: Vec<(u64, Failure)>,
    /// Images trained or evaluated on in the first epoch.
    pub used: BTreeSet<String>,
    /// Predictions of the last evaluation.
    pub last_predictions: Vec<Prediction>,
}

/// Where in an epoch a checkpoint is taken: mid-epoch (`Some`) or after the last (`None`).
#[derive(Clone, Copy)]
pub struct EpochPosition<'a> {
    /// The epoch in progress (1-based).
    pub epoch: u64,
    /// This epoch's training order, by image id.
    pub order: &'a [String],
    /// The training pass so far.
    pub pass: &'a PassOutcome,
}

/// The run's position and bookkeeping at an optimizer-step boundary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Outer steps taken (the learning-rate schedule's position).
    pub outer_steps: u64,
    /// Optimizer steps taken (Adam's bias correction).
    pub optimizer_steps: i64,
    /// The patch-permutation RNG.
    pub rng: [u64; 4],
    /// The epoch in progress (1-based); `epochs + 1` once the run has finished.
    pub epoch: u64,
    /// Images of this epoch's training order already accounted for (used or failed).
    pub position: usize,
    /// This epoch's training order, by image id (checked against the order the seed gives).
    pub epoch_order: Vec<String>,
    /// The training pass so far in this epoch.
    pub pass: PassOutcome,
    /// One row per finished epoch.
    pub metrics: Vec<EpochMetrics>,
    /// (epoch, failure); epoch 0 = at listing.
    pub errors: Vec<(u64, Failure)>,
    /// Images trained or evaluated on in the first epoch.
    pub used: Vec<String>,
    /// Predictions of the last evaluation (for the outputs of a finished run).
    pub last_predictions: Vec<Prediction>,
    /// The pipeline that wrote the checkpoint.
    pub pipeline: Definition,
    /// Data-parallel ranks that wrote it (1: a single process).
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
}

/// The latent shard and position file of `rank` in a checkpoint of `ranks` ranks.
fn rank_files(rank: usize, ranks: usize) -> (String, String) {
    if ranks == 1 {
        (LATENTS.into(), STATE.into())
    } else {
        (
            format!("latents-rank-{rank}.arrow"),
            format!("state-rank-{rank}.yaml"),
        )
    }
}

/// Keys that can change between a checkpoint and its resume without changing the result.
const HARMLESS: &[&str] = &[
    "name",
    "output",
    "source.decode_workers",
    "source.buffer_mib",
    "source.on_error",
    "storage",
    "checkpoint",
    "synth",
    "latent.budget_mib",
    "latent.spill_dir",
    // Where pixels wait for their step, not what is computed.
    "train.spool_above_mib",
    // Compared through the effective decay horizon below.
    "train.epochs",
];

/// The first setting that differs between the pipeline that wrote a checkpoint and the one
/// resuming it, when the difference would make the resumed run differ from an uninterrupted
/// one. `train.epochs` may grow when the decay horizon (`train.decay_epochs`) is explicit.
pub fn inexact_change(saved: &Definition, now: &Definition) -> Option<String> {
    let flat = |d: &Definition| {
        let mut v = serde_json::to_value(d).expect("a definition is JSON");
        let horizon = d.train.decay_epochs.unwrap_or(d.train.epochs as f64);
        v["train"]["decay_epochs"] = serde_json::json!(horizon);
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        out
    };
    let (a, b) = (flat(saved), flat(now));
    let keys: std::collections::BTreeSet<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
    let get = |m: &Vec<(String, serde_json::Value)>, k: &str| {
        m.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    };
    keys.into_iter()
        .filter(|k| {
            !HARMLESS
                .iter()
                .any(|h| k.as_str() == *h || k.starts_with(&format!("{h}.")))
        })
        .find(|k| get(&a, k) != get(&b, k))
        .cloned()
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, child, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

impl TrainingState {
    /// The state of `trainer` and `ledger`: mid-epoch at `position`, or, without one, the
    /// finished run (`epoch` = `epochs + 1`), whose resume only rewrites the outputs.
    pub fn capture(
        trainer: &Trainer,
        ledger: &Ledger,
        position: Option<EpochPosition>,
        def: &Definition,
    ) -> Self {
        let finished = position.is_none();
        let (epoch, order, pass) = match position {
            Some(p) => (p.epoch, p.order.to_vec(), p.pass.clone()),
            None => (def.train.epochs + 1, Vec::new(), PassOutcome::default()),
        };
        Self {
            outer_steps: trainer.outer_steps,
            optimizer_steps: trainer.optimizer.steps,
            rng: trainer.rng_state(),
            epoch,
            position: pass.images + pass.failures.len(),
            epoch_order: order,
            pass,
            metrics: ledger.metrics.clone(),
            errors: ledger.errors.clone(),
            used: ledger.used.iter().cloned().collect(),
            // Mid-epoch, the last predictions are rewritten by the epoch's evaluation anyway.
            last_predictions: if finished {
                ledger.last_predictions.clone()
            } else {
                Vec::new()
            },
            pipeline: def.clone(),
            ranks: trainer.group().size(),
        }
    }

    /// The ledger this state carries.
    pub fn ledger(&self) -> Ledger {
        Ledger {
            metrics: self.metrics.clone(),
            errors: self.errors.clone(),
            used: self.used.iter().cloned().collect(),
            last_predictions: self.last_predictions.clone(),
        }
    }
}

/// Write one checkpoint of `trainer` and `state` under `root` (weights, optimizer, latents,
/// state, then the manifest), and keep the newest `keep`. In a data-parallel run every rank
/// calls this at the same step: the ranks' weights are compared first (a difference is an
/// error), each writes its shard, and rank 0 the shared files and, last, the manifest.
pub async fn save(
    root: &Location,
    trainer: &Trainer,
    state: &TrainingState,
    keep: usize,
) -> Result<(), RunError> {
    let group = trainer.group().clone();
    let step = state.optimizer_steps as u64;
    trainer.check_ranks_agree(&format!("at checkpoint step {step}"))?;
    let write_err = |what: &str| {
        let what = format!("checkpoint {what}");
        move |e: Box<dyn std::error::Error + Send + Sync>| RunError::Write { what, source: e }
    };
    // YAML, not JSON: its floats round-trip exactly (shortest repr out, correctly rounded in),
    // and NaN (a loss over no images) is representable.
    let yaml = serde_norway::to_string(state).map_err(|e| write_err(STATE)(e.into()))?;
    let (latents, position) = rank_files(group.rank(), group.size());
    let mut w = if group.is_root() {
        let mut w = checkpoint::Writer::begin(root, step).await?;
        let model = weights::safetensors_bytes(&trainer.model.named_tensors())
            .map_err(|e| write_err(MODEL)(e.into()))?;
        let optimizer = weights::safetensors_bytes(&trainer.optimizer.state())
            .map_err(|e| write_err(OPTIMIZER)(e.into()))?;
        w.put(MODEL, model.into()).await?;
        w.put(OPTIMIZER, optimizer.into()).await?;
        if group.size() > 1 {
            w.put(STATE, yaml.clone().into_bytes().into()).await?;
        }
        w
    } else {
        checkpoint::Writer::join(root, step)
    };
    // Rewriting a step: rank 0 has taken the old manifest away before any rank's file changes.
    group.barrier();
    w.put_pieces(&latents, trainer.latents.snapshot()).await?;
    w.put(&position, yaml.into_bytes().into()).await?;
    if group.size() > 1 {
        // Every rank's files are complete before rank 0 lists them in the manifest.
        let mine = serde_json::to_vec(w.entries()).expect("file entries to JSON");
        let all = group.all_gather_bytes(&mine);
        if !group.is_root() {
            return Ok(());
        }
        for theirs in &all[1..] {
            let entries: Vec<checkpoint::FileEntry> =
                serde_json::from_slice(theirs).expect("a rank's file entries");
            w.add_entries(entries);
        }
    }
    w.finish().await?;
    checkpoint::prune(root, keep).await?;
    Ok(())
}

/// Load a checkpoint into the trainer; refuse it when the pipeline changed in a way that would
/// make the resumed run differ from an uninterrupted one.
pub fn restore(
    trainer: &mut Trainer,
    loaded: &Loaded,
    def: &Definition,
) -> Result<TrainingState, RunError> {
    let step = loaded.manifest.step;
    let missing = |name: &str| RunError::Resume(format!("checkpoint step {step} has no {name}"));
    let file_err = |name: &str| {
        let name = format!("step {step}: {name}");
        move |e: Box<dyn std::error::Error + Send + Sync>| RunError::ResumeFile { name, source: e }
    };
    let bytes = loaded.bytes(STATE).ok_or_else(|| missing(STATE))?;
    let shared: TrainingState =
        serde_norway::from_slice(&bytes).map_err(|e| file_err(STATE)(e.into()))?;
    let group = trainer.group().clone();
    if shared.ranks != group.size() {
        return Err(RunError::Resume(format!(
            "checkpoint step {step} was written by {} rank{}, and this run has {}: resume it with \
             the same number of ranks (mpirun -np {}), or start over with --fresh",
            shared.ranks,
            if shared.ranks == 1 { "" } else { "s" },
            group.size(),
            shared.ranks
        )));
    }
    let (latents_file, position) = rank_files(group.rank(), group.size());
    let state: TrainingState = if group.size() == 1 {
        shared
    } else {
        let bytes = loaded.bytes(&position).ok_or_else(|| missing(&position))?;
        serde_norway::from_slice(&bytes).map_err(|e| file_err(&position)(e.into()))?
    };
    if let Some(key) = inexact_change(&state.pipeline, def) {
        return Err(RunError::Resume(format!(
            "key '{key}' changed since the checkpoint was written, so the resumed run would differ from an uninterrupted one; restore it, use another output, or start over with --fresh"
        )));
    }
    let tensors = |name: &str| {
        let path = loaded.path(name).ok_or_else(|| missing(name))?;
        tch::Tensor::read_safetensors(&path).map_err(|e| file_err(name)(e.into()))
    };
    trainer
        .restore(
            &tensors(MODEL)?,
            &tensors(OPTIMIZER)?,
            state.optimizer_steps,
            state.outer_steps,
            state.rng,
        )
        .map_err(|e| file_err("model and optimizer")(e.into()))?;
    let latents = loaded
        .path(&latents_file)
        .ok_or_else(|| missing(&latents_file))?;
    let file = std::fs::File::open(&latents).map_err(|e| file_err(&latents_file)(e.into()))?;
    trainer
        .latents
        .read_snapshot(std::io::BufReader::new(file))
        .map_err(|e| file_err(&latents_file)(e.into()))?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "source: {images: data/x, labels: data/x.csv}\npatch: {size: 32}\nmodel: {backbone: small_cnn}\ntrain: {epochs: 2, batch_size: 2}\noutput: out/x\n";

    fn with(overrides: &[&str]) -> Definition {
        Definition::from_yaml_with_overrides(FILE, "t.yaml", overrides).unwrap()
    }

    #[test]
    fn settings_that_shape_training_refuse_a_resume_and_name_the_key() {
        let base = with(&[]);
        assert_eq!(inexact_change(&base, &base), None);
        for (set, key) in [
            ("train.lr=0.01", "train.lr"),
            ("patch.size=16", "patch.size"),
            ("model.latent_dim=8", "model.latent_dim"),
            ("train.seed=1", "train.seed"),
            ("latent.reuse=true", "latent.reuse"),
            ("train.device=cuda", "train.device"),
            // Without an explicit horizon, more epochs change the learning-rate decay.
            ("train.epochs=3", "train.decay_epochs"),
        ] {
            assert_eq!(
                inexact_change(&base, &with(&[set])),
                Some(key.to_string()),
                "{set}"
            );
        }
    }

    #[test]
    fn settings_that_do_not_change_results_allow_a_resume() {
        let base = with(&["train.decay_epochs=10"]);
        for set in [
            "source.decode_workers=7",
            "source.buffer_mib=1",
            "name=other",
            "checkpoint.keep=9",
            "train.epochs=5", // explicit horizon: training longer is exact
        ] {
            let mut overrides = vec!["train.decay_epochs=10", set];
            overrides.dedup();
            assert_eq!(inexact_change(&base, &with(&overrides)), None, "{set}");
        }
    }
}
