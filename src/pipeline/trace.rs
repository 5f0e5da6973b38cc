//! A run's trace (`patchgd run --trace DIR`): every random choice a training run makes (each
//! epoch's image order, each step's cell permutation, each dropout mask) and what it computed
//! from them (each inner iteration's loss, the weights after each step, every validation
//! prediction), so that the PyTorch twin can replay the run choice for choice and say at which
//! step, if any, the two part (`tests/twin/replay.py`, `scripts/paired`). The format is in
//! docs/parity.md, "The trace".
//!
//! In DIR (a local directory):
//! - `trace.jsonl`: one JSON object per line, `run` first, then per epoch an `epoch` record,
//!   its `step`s and its `eval`;
//! - `initial.safetensors`: every weight and BatchNorm statistic before the first step;
//! - `weights.f32`: the same tensors after every `weights_every`-th step, f32 little-endian,
//!   one block per such step, each tensor in the order the `run` record lists them.

#![warn(missing_docs)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tch::{Device, Kind};

use super::definition::Definition;
use super::prepare::Prepared;
use super::runner::RunError;
use crate::train::Trainer;
use crate::train::trace::{TracedEval, TracedStep, mask_hex};

/// What `--trace` asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceOptions {
    /// The directory the trace goes to (created; its trace files are replaced).
    pub dir: PathBuf,
    /// Weights are written after every this many steps (0: never; 1, the default: after each).
    pub weights_every: u64,
}

/// The version of the format below; a reader refuses another.
pub const TRACE_FORMAT: u64 = 1;

/// Writes one run's trace as the run goes.
pub struct TraceWriter {
    dir: PathBuf,
    lines: BufWriter<File>,
    weights: BufWriter<File>,
    weights_every: u64,
    /// Weight blocks written so far (a step record names its block).
    blocks: u64,
}

impl TraceWriter {
    /// Create the trace for a run that is about to take its first step: the `run` record and
    /// the initial weights. The trainer starts taking notes.
    pub fn start(
        options: &TraceOptions,
        def: &Definition,
        data: &Prepared,
        trainer: &mut Trainer,
    ) -> Result<Self, RunError> {
        let dir = options.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| trace_error(&dir, e))?;
        let create = |name: &str| {
            let path = dir.join(name);
            File::create(&path)
                .map(BufWriter::new)
                .map_err(|e| trace_error(&path, e))
        };
        let mut writer = Self {
            lines: create("trace.jsonl")?,
            weights: create("weights.f32")?,
            weights_every: options.weights_every,
            blocks: 0,
            dir: dir.clone(),
        };
        let tensors = trainer.model.named_tensors();
        let initial = crate::sink::weights::safetensors_bytes(&tensors)
            .map_err(|e| trace_error(&dir.join("initial.safetensors"), e))?;
        let path = dir.join("initial.safetensors");
        std::fs::write(&path, initial).map_err(|e| trace_error(&path, e))?;
        let spec = data.model_spec(def);
        let (mean, std) = def.source.normalize.values();
        let schedule = &trainer.config.schedule;
        writer.record(&json!({
            "record": "run",
            "format": TRACE_FORMAT,
            "patchgd": env!("CARGO_PKG_VERSION"),
            "threads": tch::get_num_threads(),
            "seed": def.train.seed,
            "model": {
                "method": def.method,
                "backbone": spec.backbone.name(),
                "channels": spec.channels,
                "latent_dim": spec.latent_dim,
                "head_width": spec.head_width,
                "classes": spec.classes,
                "head_dropout": spec.head_dropout,
            },
            "normalize": {"mean": mean, "std": std},
            "train_images": data.train_set.len(),
            "val_images": data.val_set.len(),
            "schedule": {
                "peak": schedule.peak,
                "warmup_steps": schedule.warmup_steps,
                "horizon_steps": schedule.horizon_steps,
            },
            "weights_every": options.weights_every,
            "tensors": tensors
                .iter()
                .map(|(name, t)| json!({"name": name, "shape": t.size()}))
                .collect::<Vec<_>>(),
            "pipeline": def,
        }))?;
        trainer.start_tracing();
        Ok(writer)
    }

    /// The start of an epoch: its image order.
    pub fn epoch(&mut self, epoch: u64, order: &[String]) -> Result<(), RunError> {
        self.record(&json!({"record": "epoch", "epoch": epoch, "order": order}))
    }

    /// The steps the trainer has noted since the last call, with the weights after the last
    /// of them when it is due (called after every step, so each is written right after it).
    pub fn steps(&mut self, epoch: u64, trainer: &Trainer) -> Result<(), RunError> {
        for step in trainer.take_trace_notes().steps {
            let due = self.weights_every > 0 && step.step % self.weights_every == 0;
            let block = if due {
                self.write_weights(trainer)?;
                Some(self.blocks - 1)
            } else {
                None
            };
            self.record(&step_record(epoch, &step, block))?;
        }
        Ok(())
    }

    /// An evaluation pass: its batches and predictions as the trainer noted them, and the
    /// pass's loss and accuracy.
    pub fn eval(
        &mut self,
        epoch: u64,
        trainer: &Trainer,
        loss: f64,
        accuracy: f64,
    ) -> Result<(), RunError> {
        let evals = trainer.take_trace_notes().evals;
        let batches: Vec<Value> = evals.iter().map(eval_batch).collect();
        self.record(&json!({
            "record": "eval",
            "epoch": epoch,
            "loss": finite_or_null(loss),
            "accuracy": finite_or_null(accuracy),
            "batches": batches,
        }))?;
        self.flush()
    }

    /// Everything so far on disk (each epoch ends with it, so a trace is readable mid-run).
    pub fn flush(&mut self) -> Result<(), RunError> {
        self.lines
            .flush()
            .map_err(|e| trace_error(&self.dir.join("trace.jsonl"), e))?;
        self.weights
            .flush()
            .map_err(|e| trace_error(&self.dir.join("weights.f32"), e))
    }

    fn write_weights(&mut self, trainer: &Trainer) -> Result<(), RunError> {
        for (_, t) in trainer.model.named_tensors() {
            let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let values: Vec<f32> = Vec::try_from(t.view([-1])).expect("weights to Vec");
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.weights
                .write_all(&bytes)
                .map_err(|e| trace_error(&self.dir.join("weights.f32"), e))?;
        }
        self.blocks += 1;
        Ok(())
    }

    fn record(&mut self, value: &Value) -> Result<(), RunError> {
        let path = self.dir.join("trace.jsonl");
        serde_json::to_writer(&mut self.lines, value).map_err(|e| trace_error(&path, e.into()))?;
        self.lines
            .write_all(b"\n")
            .map_err(|e| trace_error(&path, e))
    }
}

fn step_record(epoch: u64, step: &TracedStep, weights_block: Option<u64>) -> Value {
    json!({
        "record": "step",
        "epoch": epoch,
        "step": step.step,
        "images": step.images,
        "lr": step.lr,
        "permutation": step.permutation,
        "dropout": step.dropout.iter().map(|m| mask_hex(m)).collect::<Vec<_>>(),
        "losses": step.losses.iter().map(|&l| finite_or_null(f64::from(l))).collect::<Vec<_>>(),
        "optimizer_steps": step.optimizer_steps,
        "weights_block": weights_block,
    })
}

fn eval_batch(batch: &TracedEval) -> Value {
    json!({"images": batch.images, "probabilities": batch.probabilities})
}

/// JSON has no NaN: a value that does not exist (no validation images) is null.
fn finite_or_null(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

fn trace_error(path: &Path, e: std::io::Error) -> RunError {
    RunError::Write {
        what: format!("the trace file {}", path.display()),
        source: Box::new(e),
    }
}
