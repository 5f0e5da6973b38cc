//! What a checkpoint holds besides tensors (`state.yaml`), and the rule that decides whether a
//! pipeline file may resume a checkpoint: only when every setting that shapes the training
//! trajectory is unchanged.

use serde::{Deserialize, Serialize};

use crate::pipeline::Definition;
use crate::sink::EpochMetrics;
use crate::source::Failure;
use crate::train::{PassOutcome, Prediction};

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
    pub metrics: Vec<EpochMetrics>,
    /// (epoch, failure); epoch 0 = at listing.
    pub errors: Vec<(u64, Failure)>,
    pub used: Vec<String>,
    /// Predictions of the last evaluation (for the outputs of a finished run).
    pub last_predictions: Vec<Prediction>,
    /// The pipeline that wrote the checkpoint.
    pub pipeline: Definition,
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
