//! The trainer: model, optimizer, schedule and sampling RNG, plus the epoch loop that consumes a
//! patch stream, assembles images, forms mini-batches and accounts for every image.
//!
//! Everything here runs on one OS thread (tch tensors are not `Sync` and grad mode is
//! thread-local); the async source feeds it through a channel read with `blocking_recv`.

use std::rc::Rc;
use std::time::Instant;

use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;

use super::batch::PatchReadError;
use super::gd::{gd_predict, gd_step};
use super::optim::{Adam, NonFinite};
use super::patchgd::{GridBatch, Reuse, StepError, correct, grid_view, outer_step, predict};
use super::schedule::{Accumulation, LrSchedule, plan_outer_step};
use super::trace::{TraceNotes, TracedEval, TracedStep};
use crate::dist::Group;
use crate::model::grad_cam::{ImageEvidence, grad_cam};
use crate::model::{Method, Model};
use crate::patch::{ImageAssembler, ImagePatches, SpoolPolicy};
use crate::rng::Rng;
use crate::source::{Failure, SourceItem};
use crate::state::{LatentGrid, LatentStore};

#[derive(Clone, Debug)]
pub struct TrainerConfig {
    pub batch_size: usize,
    pub sampling_fraction: f64,
    pub accumulation: Accumulation,
    /// Patches per backbone call in the fill pass and at inference.
    pub fill_chunk: i64,
    pub schedule: LrSchedule,
    pub weight_decay: f64,
    pub seed: u64,
    /// `latent.reuse`: fill-pass cells are taken from the latent store when they were written
    /// at most this many optimizer steps ago; `None` recomputes every cell.
    pub reuse_max_age: Option<u64>,
    /// Which assembled images wait for their step in a temporary file instead of memory.
    pub spool: SpoolPolicy,
    /// How pixels become the backbone's input (`source.normalize`).
    pub normalization: crate::model::Normalization,
    /// Whether evaluation keeps each image's Z in the latent store (training's validation
    /// does, for SQL over latents; `patchgd predict` over many large images does not).
    pub store_evaluation_latents: bool,
}

/// Training stopped because a loss, gradient, weight or BatchNorm statistic (or, in
/// evaluation, a prediction) was not finite: where, and on which images.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error(
    "{what} in epoch {epoch}, {}, on a batch of {} images ({}); the run stops so that no NaN \
     reaches a model file, checkpoint or metric (a lower train.lr is the usual cure)",
    match phase {
        Phase::Train => format!("training step {step}"),
        Phase::Evaluate => format!("evaluating after training step {step}"),
    },
    images.len(),
    images.join(", ")
)]
pub struct NonFiniteError {
    pub what: String,
    pub epoch: u64,
    pub phase: Phase,
    /// The run's training step (1-based) being taken; in evaluation, the last one taken.
    pub step: u64,
    pub images: Vec<String>,
}

/// Why a pass stopped: a value that is not finite, or a patch that could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    NonFinite(#[from] NonFiniteError),
    #[error(transparent)]
    PatchRead(#[from] PatchReadError),
    /// The ranks of a data-parallel run disagree (their weights, or their batches' grids).
    #[error("data-parallel ranks disagree: {0}")]
    Ranks(String),
    /// The ranks could not set up their collectives (NCCL on a GPU).
    #[error(transparent)]
    Dist(#[from] crate::dist::DistError),
}

/// What one training mini-batch did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainedBatch {
    /// Cross-entropy summed over the batch's images.
    pub loss_sum: f64,
    /// Images whose loss is in `loss_sum`: all, unless the f16 loss scaler skipped the step
    /// because the loss overflowed (then none).
    pub loss_images: usize,
    pub correct: i64,
    pub patch_passes: usize,
    pub optimizer_steps: usize,
}

pub struct Trainer {
    pub model: Model,
    pub optimizer: Adam,
    pub config: TrainerConfig,
    rng: Rng,
    /// Outer steps taken (the schedule's position).
    pub outer_steps: u64,
    /// Each image's latest Z (PatchGD), with the step that wrote each cell.
    pub latents: LatentStore,
    /// Fill-pass cells taken from the store instead of encoded (latent.reuse).
    pub reused_cells: u64,
    /// Assembled images whose patches went to a spool file.
    pub spooled_images: u64,
    /// The epoch in progress (1-based; set by the caller, named in errors).
    pub epoch: u64,
    /// Where evaluation sends each image's per-cell class evidence (Grad-CAM at Z), when
    /// someone wants it (`patchgd predict --heatmaps`). Bounded: a slow consumer holds the
    /// pass back rather than letting the evidence pile up in memory.
    pub evidence: Option<std::sync::mpsc::SyncSender<ImageEvidence>>,
    /// The data-parallel group this trainer is one rank of (a group of one by default).
    group: Rc<Group>,
    /// While a run is traced: the choices and results noted since the runner last took them
    /// (taken through `&self`, from the callback that sees each step).
    notes: std::cell::RefCell<Option<TraceNotes>>,
}

/// One prediction of an evaluation pass.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    pub image_id: String,
    pub label: i64,
    pub predicted: i64,
    pub probabilities: Vec<f32>,
}

/// What one pass over a stream did (checkpointed mid-pass, so that a resumed pass adds up).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PassOutcome {
    pub images: usize,
    pub loss_sum: f64,
    pub correct: i64,
    pub patch_passes: usize,
    pub optimizer_steps: usize,
    /// Images left out of the loss average: their f16 step overflowed and was skipped.
    #[serde(default)]
    pub loss_skipped: usize,
    pub failures: Vec<Failure>,
    pub predictions: Vec<Prediction>,
    pub seconds: f64,
}

impl PassOutcome {
    /// Mean loss; NaN when no image has one (no images: metrics record it as null).
    pub fn loss(&self) -> f64 {
        let n = self.images - self.loss_skipped;
        if n == 0 {
            f64::NAN
        } else {
            self.loss_sum / n as f64
        }
    }
    pub fn accuracy(&self) -> f64 {
        if self.images == 0 {
            f64::NAN
        } else {
            self.correct as f64 / self.images as f64
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Train,
    Evaluate,
}

impl Trainer {
    pub fn new(model: Model, config: TrainerConfig, latents: LatentStore) -> Self {
        let optimizer = Adam::new(model.trainable(), config.weight_decay);
        let rng = Rng::derive(config.seed, "patch-permutation", 0);
        Self {
            model,
            optimizer,
            config,
            rng,
            outer_steps: 0,
            latents,
            reused_cells: 0,
            spooled_images: 0,
            epoch: 1,
            evidence: None,
            group: Group::single(),
            notes: std::cell::RefCell::new(None),
        }
    }

    /// Note every step's random choices and results from now on (a run's trace: the image
    /// order, each permutation, each dropout mask, the losses, the evaluation's predictions).
    pub fn start_tracing(&mut self) {
        self.model.record_dropout(true);
        *self.notes.get_mut() = Some(TraceNotes::default());
    }

    /// The notes taken since the last call (empty when not tracing).
    pub fn take_trace_notes(&self) -> TraceNotes {
        self.notes
            .borrow_mut()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Train as one rank of `group` (docs/distributed.md): every step's gradients are averaged
    /// over the ranks and BatchNorm's running statistics follow rank 0's after every step.
    /// `config.batch_size` is then this rank's share of the global batch. Once the starting
    /// weights are in place, [`Trainer::check_ranks_agree`] says whether every rank has them.
    pub fn join(&mut self, group: Rc<Group>) -> Result<(), TrainError> {
        self.optimizer.average_over(group.clone())?;
        self.group = group;
        Ok(())
    }

    /// The group this trainer is one rank of.
    pub fn group(&self) -> &Rc<Group> {
        &self.group
    }

    /// CRC-32 of every weight and BatchNorm statistic (fp32 masters), in name order.
    pub fn weights_checksum(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for (name, t) in self.model.named_tensors() {
            h.update(name.as_bytes());
            let t = t.to_device(Device::Cpu).contiguous();
            let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, t.numel());
            h.update(&bytes);
        }
        h.finalize()
    }

    /// Turn silent divergence into an error: every rank's weights must be bitwise those of
    /// rank 0. `when` says where in the run (named in the error).
    pub fn check_ranks_agree(&self, when: &str) -> Result<(), TrainError> {
        if self.group.size() == 1 {
            return Ok(());
        }
        let sums = self.group.all_gather_u64(&[
            u64::from(self.weights_checksum()),
            self.optimizer.steps as u64,
        ]);
        if sums.iter().all(|s| *s == sums[0]) {
            return Ok(());
        }
        let each: Vec<String> = sums
            .iter()
            .enumerate()
            .map(|(r, s)| format!("rank {r}: checksum {:08x} after {} steps", s[0], s[1]))
            .collect();
        Err(TrainError::Ranks(format!(
            "the weights differ between ranks {when} ({}); the run stops rather than train \
             diverged copies of the model",
            each.join(", ")
        )))
    }

    /// Every rank takes rank 0's BatchNorm running statistics (PyTorch DDP's default,
    /// `broadcast_buffers=True`, does the same at every forward pass).
    fn share_batch_norm_statistics(&self) {
        if self.group.size() == 1 {
            return;
        }
        let buffers: Vec<Tensor> = self
            .model
            .named_tensors()
            .into_iter()
            .filter(|(n, t)| {
                (n.ends_with(".running_mean") || n.ends_with(".running_var"))
                    && t.kind() == Kind::Float
            })
            .map(|(_, t)| t)
            .collect();
        if buffers.is_empty() {
            return;
        }
        let flat = Tensor::cat(
            &buffers
                .iter()
                .map(|t| t.to_device(Device::Cpu).reshape([-1]))
                .collect::<Vec<_>>(),
            0,
        );
        let mut values: Vec<f32> = Vec::try_from(&flat).expect("BatchNorm statistics to Vec");
        self.group.broadcast_f32(&mut values);
        let mut at = 0;
        tch::no_grad(|| {
            for t in &buffers {
                let n = t.numel();
                let v = Tensor::from_slice(&values[at..at + n]).reshape(t.size());
                let mut t = t.shallow_clone();
                t.copy_(&v.to_device(t.device()));
                at += n;
            }
        });
    }

    /// Data-parallel runs: before each outer step the ranks say whether they have images for it
    /// and on which grid. Every rank with images must have the same grid (the step's plan, the
    /// permutation of cells, is one for all ranks). Returns the step's (rows, cols), or `None`
    /// when no rank has images left: the pass is over.
    fn agree_on_step(&self, batch: Option<&GridBatch>) -> Result<Option<(i64, i64)>, TrainError> {
        let mine = match batch {
            Some(b) => [1, b.rows as u64, b.cols as u64, b.batch_size() as u64],
            None => [0; 4],
        };
        let all = self.group.all_gather_u64(&mine);
        let active: Vec<(usize, &Vec<u64>)> =
            all.iter().enumerate().filter(|(_, h)| h[0] == 1).collect();
        let Some((_, first)) = active.first() else {
            return Ok(None);
        };
        if let Some((r, other)) = active.iter().find(|(_, h)| h[1..3] != first[1..3]) {
            return Err(TrainError::Ranks(format!(
                "in training step {}, rank {} has a batch on a {} x {} grid and rank {r} on a {} x \
                 {} grid; under several ranks every image of a run must give the same grid \
                 (resize them to one size, or train with one rank)",
                self.outer_steps + 1,
                active[0].0,
                first[1],
                first[2],
                other[1],
                other[2]
            )));
        }
        Ok(Some((first[1] as i64, first[2] as i64)))
    }

    /// A step in which this rank has no images (its share of the epoch has run out, the others'
    /// not): it takes part in the step's collectives with a weight of zero and takes the same
    /// optimizer steps, so that its weights stay those of the other ranks. Returns false when no
    /// rank had images: the pass is over for all.
    pub fn idle_step(&mut self) -> Result<bool, TrainError> {
        let Some((rows, cols)) = self.agree_on_step(None)? else {
            return Ok(false);
        };
        let lr = self.config.schedule.lr(self.outer_steps);
        let steps = match self.model.spec.method {
            Method::Patchgd => plan_outer_step(
                (rows * cols) as usize,
                self.config.sampling_fraction,
                self.config.accumulation,
                &mut self.rng,
            )
            .step_after
            .iter()
            .filter(|s| **s)
            .count(),
            Method::Gd => 1,
        };
        self.optimizer.step_images = 0.0;
        let none: [ImagePatches; 0] = [];
        for _ in 0..steps {
            self.optimizer.zero_grad();
            self.optimizer
                .step(lr)
                .map_err(|e| self.non_finite(e, Phase::Train, &none))?;
        }
        self.optimizer.zero_grad();
        self.share_batch_norm_statistics();
        self.check_weights()
            .map_err(|e| self.non_finite(e, Phase::Train, &none))?;
        self.outer_steps += 1;
        Ok(true)
    }

    /// The error for a value that was not finite on `images`.
    fn non_finite(&self, what: NonFinite, phase: Phase, images: &[ImagePatches]) -> NonFiniteError {
        NonFiniteError {
            what: what.to_string(),
            epoch: self.epoch,
            phase,
            step: self.outer_steps + (phase == Phase::Train) as u64,
            images: images.iter().map(|im| im.key.image_id.clone()).collect(),
        }
    }

    /// The first weight or BatchNorm statistic that is not finite, if any (one read for all).
    fn step_error(&self, e: StepError, images: &[ImagePatches]) -> TrainError {
        match e {
            StepError::NonFinite(what) => self.non_finite(what, Phase::Train, images).into(),
            StepError::PatchRead(e) => e.into(),
        }
    }

    fn check_weights(&self) -> Result<(), NonFinite> {
        let vars = self.model.named_tensors();
        let tensors: Vec<Tensor> = vars.iter().map(|(_, t)| t.shallow_clone()).collect();
        super::optim::all_finite(&tensors).map_err(|i| NonFinite(format!("'{}'", vars[i].0)))
    }

    /// The patch-permutation RNG's state (for checkpoints).
    pub fn rng_state(&self) -> [u64; 4] {
        self.rng.state()
    }

    /// Put the trainer back where a checkpoint left it.
    pub fn restore(
        &mut self,
        weights: &[(String, tch::Tensor)],
        optimizer: &[(String, tch::Tensor)],
        optimizer_steps: i64,
        outer_steps: u64,
        rng: [u64; 4],
    ) -> Result<(), crate::model::LoadError> {
        self.model.load_named(weights)?;
        self.optimizer.load_state(optimizer_steps, optimizer)?;
        self.outer_steps = outer_steps;
        self.rng = Rng::from_state(rng);
        Ok(())
    }

    /// Stored cells young enough to replace the fill pass's, for a batch (latent.reuse).
    fn reuse_for(&mut self, images: &[ImagePatches], k: usize) -> Option<(Reuse, Vec<u64>)> {
        let max_age = self.config.reuse_max_age?;
        let now = self.optimizer.steps as u64;
        let d = self.model.spec.latent_dim as usize;
        let mut z = vec![0f32; images.len() * k * d];
        let mut compute = vec![true; images.len() * k];
        let mut steps = vec![0u64; images.len() * k];
        let mut any = false;
        for (i, im) in images.iter().enumerate() {
            let Ok(Some(grid)) = self.latents.get(&im.key.image_id) else {
                continue;
            };
            if grid.cells() != k || grid.dim as usize != d {
                continue;
            }
            for cell in 0..k {
                if now.saturating_sub(grid.steps[cell]) <= max_age {
                    let at = i * k + cell;
                    z[at * d..(at + 1) * d].copy_from_slice(&grid.values[cell * d..(cell + 1) * d]);
                    compute[at] = false;
                    steps[at] = grid.steps[cell];
                    any = true;
                }
            }
        }
        if !any {
            return None;
        }
        self.reused_cells += compute.iter().filter(|c| !**c).count() as u64;
        let b = images.len() as i64;
        let device = self.device();
        Some((
            Reuse {
                z: Tensor::from_slice(&z)
                    .view([b, k as i64, d as i64])
                    .to_device(device),
                compute,
            },
            steps,
        ))
    }

    /// Keep each image's Z (B x K x D) with its cells' writer steps (B x K).
    fn store_latents(&mut self, images: &[ImagePatches], z: &Tensor, steps: &[u64]) {
        let size = z.size();
        let (k, d) = (size[1] as usize, size[2] as usize);
        let flat: Vec<f32> =
            Vec::try_from(z.to_device(Device::Cpu).contiguous().view([-1])).expect("Z to Vec");
        for (i, im) in images.iter().enumerate() {
            let grid = LatentGrid {
                rows: im.grid_rows as u32,
                cols: im.grid_cols as u32,
                dim: d as u32,
                values: flat[i * k * d..(i + 1) * k * d].to_vec(),
                steps: steps[i * k..(i + 1) * k].to_vec(),
            };
            if let Err(e) = self.latents.put(&im.key.image_id, grid) {
                // The store is a cache of recomputable values: losing an entry costs time only.
                tracing::warn!(image = %im.key.image_id, "latent store: {e}");
            }
        }
    }

    pub fn device(&self) -> Device {
        self.model.device()
    }

    fn to_batch(&self, images: &[ImagePatches]) -> GridBatch {
        GridBatch::from_images(images, self.device())
            .with_normalization(self.config.normalization.clone())
    }

    /// One training step on a mini-batch. A loss, gradient, weight or BatchNorm statistic that
    /// is not finite afterwards is an error (the f16 loss scaler's skipped steps excepted).
    pub fn train_batch(&mut self, images: &[ImagePatches]) -> Result<TrainedBatch, TrainError> {
        let batch = self.to_batch(images);
        if self.group.size() > 1 {
            self.agree_on_step(Some(&batch))?;
        }
        self.train_on(images, &batch)
    }

    /// [`Trainer::train_batch`] on a batch already built from `images` (its tensors may be
    /// on the device already: the benchmark's compute ceiling).
    pub fn train_on(
        &mut self,
        images: &[ImagePatches],
        batch: &GridBatch,
    ) -> Result<TrainedBatch, TrainError> {
        // Dropout masks start from (seed, step): a resumed run draws exactly what the
        // original did, with no generator state to save.
        self.model.reseed_dropout(Rng::derive(
            self.config.seed,
            "head-dropout",
            self.outer_steps,
        ));
        let lr = self.config.schedule.lr(self.outer_steps);
        self.optimizer.step_images = images.len() as f64;
        let mut permutation = Vec::new();
        let outcome = match self.model.spec.method {
            Method::Patchgd => {
                let plan = plan_outer_step(
                    batch.cells() as usize,
                    self.config.sampling_fraction,
                    self.config.accumulation,
                    &mut self.rng,
                );
                if self.notes.get_mut().is_some() {
                    // The chunks cover the whole permutation (n·ζ ≥ K): their concatenation is it.
                    permutation = plan.chunks.concat();
                }
                let reuse = self.reuse_for(images, batch.cells() as usize);
                let outcome = outer_step(
                    &self.model,
                    &mut self.optimizer,
                    lr,
                    batch,
                    &plan,
                    self.config.fill_chunk,
                    reuse.as_ref().map(|(r, s)| (r, s.as_slice())),
                )
                .map_err(|e| self.step_error(e, images))?;
                self.store_latents(images, &outcome.z, &outcome.cell_steps);
                outcome
            }
            Method::Gd => gd_step(&self.model, &mut self.optimizer, lr, batch)
                .map_err(|e| self.step_error(e, images))?,
        };
        let (loss, logits, patch_passes, optimizer_steps) = (
            outcome.loss,
            outcome.logits,
            outcome.patch_passes,
            outcome.optimizer_steps,
        );
        self.share_batch_norm_statistics();
        // BatchNorm statistics move in forward passes, weights in the update: both are checked
        // before the step counts (so no checkpoint ever holds a NaN).
        self.check_weights()
            .map_err(|e| self.non_finite(e, Phase::Train, images))?;
        self.outer_steps += 1;
        if let Some(notes) = self.notes.get_mut() {
            notes.steps.push(TracedStep {
                step: self.outer_steps,
                images: images.iter().map(|im| im.key.image_id.clone()).collect(),
                lr,
                permutation,
                dropout: self.model.take_dropout_masks(),
                losses: outcome.inner_losses,
                optimizer_steps: self.optimizer.steps,
            });
        }
        let counted = loss.is_finite();
        Ok(TrainedBatch {
            loss_sum: if counted {
                loss * images.len() as f64
            } else {
                0.0
            },
            loss_images: if counted { images.len() } else { 0 },
            correct: correct(&logits, &batch.labels),
            patch_passes,
            optimizer_steps,
        })
    }

    /// Inference on a mini-batch: (summed loss, predictions, patch passes). Logits that are not
    /// finite are an error.
    pub fn predict_batch(
        &mut self,
        images: &[ImagePatches],
    ) -> Result<(f64, Vec<Prediction>, usize), TrainError> {
        let batch = self.to_batch(images);
        let (logits, z) = match self.model.spec.method {
            Method::Patchgd => {
                let (logits, z) = predict(&self.model, &batch, self.config.fill_chunk);
                if self.config.store_evaluation_latents {
                    let step = self.optimizer.steps as u64;
                    let cells = (batch.batch_size() * batch.cells()) as usize;
                    self.store_latents(images, &z, &vec![step; cells]);
                }
                (logits, Some(z))
            }
            Method::Gd => (gd_predict(&self.model, &batch), None),
        };
        batch.check_reads()?;
        super::optim::all_finite(std::slice::from_ref(&logits)).map_err(|_| {
            self.non_finite(NonFinite("a prediction".into()), Phase::Evaluate, images)
        })?;
        // Summed over the labelled images (`patchgd predict` takes unlabelled ones too: -1).
        let labelled: Vec<i64> = images
            .iter()
            .enumerate()
            .filter(|(_, im)| im.key.label.is_some_and(|l| l >= 0))
            .map(|(i, _)| i as i64)
            .collect();
        let loss_sum = if labelled.is_empty() {
            0.0
        } else if labelled.len() == images.len() {
            let mean = tch::no_grad(|| logits.cross_entropy_for_logits(&batch.labels));
            mean.double_value(&[]) * images.len() as f64
        } else {
            let idx = Tensor::from_slice(&labelled).to_device(logits.device());
            let mean = tch::no_grad(|| {
                logits
                    .index_select(0, &idx)
                    .cross_entropy_for_logits(&batch.labels.index_select(0, &idx))
            });
            mean.double_value(&[]) * labelled.len() as f64
        };
        let probs = logits.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let classes = probs.size()[1] as usize;
        let flat: Vec<f32> = Vec::try_from(probs.flatten(0, -1)).expect("probabilities to Vec");
        let predictions: Vec<Prediction> = images
            .iter()
            .enumerate()
            .map(|(i, im)| {
                let p = flat[i * classes..(i + 1) * classes].to_vec();
                let predicted = p
                    .iter()
                    .enumerate()
                    .fold(0, |best, (j, v)| if *v > p[best] { j } else { best });
                Prediction {
                    image_id: im.key.image_id.clone(),
                    label: im.key.label.unwrap_or(-1),
                    predicted: predicted as i64,
                    probabilities: p,
                }
            })
            .collect();
        if let Some(notes) = self.notes.get_mut() {
            notes.evals.push(TracedEval {
                images: predictions.iter().map(|p| p.image_id.clone()).collect(),
                probabilities: predictions
                    .iter()
                    .map(|p| p.probabilities.clone())
                    .collect(),
            });
        }
        if let (Some(tx), Some(z)) = (&self.evidence, z) {
            let maps = grad_cam(&self.model, &grid_view(&z, batch.rows, batch.cols));
            send_evidence(tx, &maps.0, &predictions, (batch.rows, batch.cols));
        }
        Ok((loss_sum, predictions, batch.present_cells() as usize))
    }

    /// Consume a patch stream to its end: train on it or evaluate it, continuing `start` (the
    /// outcome so far of a pass resumed from a checkpoint; default for a new pass). `progress`
    /// is called with the number of images accounted for so far (used + failed). In training,
    /// `at_step` is called at every outer-step boundary where no image is half-consumed: every
    /// image before it is in `out` (used or failed), none after it has started. A value that is
    /// not finite, or a spooled patch that cannot be read back, stops the pass ([`TrainError`]).
    pub fn run_pass<E: From<TrainError>>(
        &mut self,
        phase: Phase,
        mut rx: mpsc::Receiver<SourceItem>,
        start: PassOutcome,
        mut progress: impl FnMut(usize),
        mut at_step: impl FnMut(&Trainer, &PassOutcome) -> Result<(), E>,
    ) -> Result<PassOutcome, E> {
        let started = Instant::now();
        let base_seconds = start.seconds;
        let mut out = start;
        let mut assembler = ImageAssembler::with_spool(self.config.spool.clone());
        let mut pending: Vec<ImagePatches> = Vec::new();
        let mut flush = |trainer: &mut Trainer,
                         pending: &mut Vec<ImagePatches>,
                         out: &mut PassOutcome|
         -> Result<(), E> {
            if pending.is_empty() {
                return Ok(());
            }
            match phase {
                Phase::Train => {
                    let done = trainer.train_batch(pending)?;
                    out.loss_sum += done.loss_sum;
                    out.loss_skipped += pending.len() - done.loss_images;
                    out.correct += done.correct;
                    out.patch_passes += done.patch_passes;
                    out.optimizer_steps += done.optimizer_steps;
                }
                Phase::Evaluate => {
                    let (loss, preds, passes) = trainer.predict_batch(pending)?;
                    out.loss_sum += loss;
                    out.correct += preds.iter().filter(|p| p.predicted == p.label).count() as i64;
                    out.patch_passes += passes;
                    out.predictions.extend(preds);
                }
            }
            out.images += pending.len();
            pending.clear();
            out.seconds = base_seconds + started.elapsed().as_secs_f64();
            if phase == Phase::Train {
                at_step(trainer, out)?;
            }
            Ok(())
        };
        while let Some(item) = rx.blocking_recv() {
            match item {
                SourceItem::Failed(f) => {
                    assembler.discard(&f.image_id);
                    out.failures.push(f)
                }
                SourceItem::Batch(b) => match assembler.push(&b.batch) {
                    Ok(done) => {
                        for image in done {
                            self.spooled_images += image.pixels.is_spooled() as u64;
                            let same_shape = pending.first().is_none_or(|p| {
                                (p.grid_rows, p.grid_cols, p.patch, p.channels)
                                    == (
                                        image.grid_rows,
                                        image.grid_cols,
                                        image.patch,
                                        image.channels,
                                    )
                            });
                            if !same_shape {
                                flush(self, &mut pending, &mut out)?;
                            }
                            pending.push(image);
                            if pending.len() == self.config.batch_size {
                                flush(self, &mut pending, &mut out)?;
                            }
                        }
                    }
                    Err(e) => out.failures.push(Failure {
                        image_id: String::new(),
                        url: String::new(),
                        stage: "patch".into(),
                        message: e.to_string(),
                    }),
                },
            }
            progress(out.images + pending.len() + out.failures.len());
        }
        flush(self, &mut pending, &mut out)?;
        // Data-parallel: this rank's share is done; it keeps taking the other ranks' steps
        // (with no images of its own) until every rank's is.
        if phase == Phase::Train && self.group.size() > 1 {
            while self.idle_step()? {
                out.seconds = base_seconds + started.elapsed().as_secs_f64();
                at_step(self, &out)?;
            }
        }
        for id in assembler.incomplete() {
            out.failures.push(Failure {
                image_id: id,
                url: String::new(),
                stage: "patch".into(),
                message: "stream ended before all patches arrived".into(),
            });
        }
        progress(out.images + out.failures.len());
        out.seconds = base_seconds + started.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// Each image's Grad-CAM maps (B x classes x rows x cols) to the evidence consumer. A consumer
/// that has gone away (it failed, and reports why when joined) is not an error here.
fn send_evidence(
    tx: &std::sync::mpsc::SyncSender<ImageEvidence>,
    maps: &Tensor,
    predictions: &[Prediction],
    (rows, cols): (i64, i64),
) {
    let maps = maps.to_kind(Kind::Float).to_device(Device::Cpu);
    let classes = maps.size()[1];
    let cells = (rows * cols) as usize;
    let flat: Vec<f32> = Vec::try_from(maps.flatten(0, -1)).expect("evidence to Vec");
    for (i, p) in predictions.iter().enumerate() {
        let image = &flat[i * classes as usize * cells..(i + 1) * classes as usize * cells];
        let evidence = ImageEvidence {
            image_id: p.image_id.clone(),
            rows: rows as usize,
            cols: cols as usize,
            scores: image.chunks(cells).map(<[f32]>::to_vec).collect(),
            predicted: p.predicted,
            probability: p.probabilities[p.predicted as usize],
        };
        if tx.send(evidence).is_err() {
            return;
        }
    }
}
