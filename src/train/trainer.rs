//! The trainer: model, optimizer, schedule and sampling RNG, plus the epoch loop that consumes a
//! patch stream, assembles images, forms mini-batches and accounts for every image.
//!
//! Everything here runs on one OS thread (tch tensors are not `Sync` and grad mode is
//! thread-local); the async source feeds it through a channel read with `blocking_recv`.

use std::time::Instant;

use tch::{Device, Kind};
use tokio::sync::mpsc;

use super::gd::{gd_predict, gd_step};
use super::optim::Adam;
use super::patchgd::{GridBatch, correct, outer_step, predict};
use super::schedule::{Accumulation, LrSchedule, plan_outer_step};
use crate::model::{Method, Model};
use crate::patch::{ImageAssembler, ImagePatches};
use crate::rng::Rng;
use crate::source::{Failure, SourceItem};

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
}

pub struct Trainer {
    pub model: Model,
    pub optimizer: Adam,
    pub config: TrainerConfig,
    rng: Rng,
    /// Outer steps taken (the schedule's position).
    pub outer_steps: u64,
}

/// One prediction of an evaluation pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub image_id: String,
    pub label: i64,
    pub predicted: i64,
    pub probabilities: Vec<f32>,
}

/// What one pass over a stream did.
#[derive(Debug, Default)]
pub struct PassOutcome {
    pub images: usize,
    pub loss_sum: f64,
    pub correct: i64,
    pub patch_passes: usize,
    pub optimizer_steps: usize,
    pub failures: Vec<Failure>,
    pub predictions: Vec<Prediction>,
    pub seconds: f64,
}

impl PassOutcome {
    pub fn loss(&self) -> f64 {
        if self.images == 0 {
            f64::NAN
        } else {
            self.loss_sum / self.images as f64
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
    pub fn new(model: Model, config: TrainerConfig) -> Self {
        let optimizer = Adam::new(model.trainable(), config.weight_decay);
        let rng = Rng::derive(config.seed, "patch-permutation", 0);
        Self {
            model,
            optimizer,
            config,
            rng,
            outer_steps: 0,
        }
    }

    pub fn device(&self) -> Device {
        self.model.device()
    }

    fn to_batch(&self, images: &[ImagePatches]) -> GridBatch {
        GridBatch::from_images(images, self.device())
    }

    /// One training step on a mini-batch. Returns (summed loss over images, correct, passes, steps).
    pub fn train_batch(&mut self, images: &[ImagePatches]) -> (f64, i64, usize, usize) {
        let batch = self.to_batch(images);
        let lr = self.config.schedule.lr(self.outer_steps);
        let outcome = match self.model.spec.method {
            Method::Patchgd => {
                let plan = plan_outer_step(
                    batch.cells() as usize,
                    self.config.sampling_fraction,
                    self.config.accumulation,
                    &mut self.rng,
                );
                outer_step(
                    &self.model,
                    &mut self.optimizer,
                    lr,
                    &batch,
                    &plan,
                    self.config.fill_chunk,
                )
            }
            Method::Gd => gd_step(&self.model, &mut self.optimizer, lr, &batch),
        };
        self.outer_steps += 1;
        let n = images.len() as f64;
        (
            outcome.loss * n,
            correct(&outcome.logits, &batch.labels),
            outcome.patch_passes,
            outcome.optimizer_steps,
        )
    }

    /// Inference on a mini-batch: (summed loss, predictions, patch passes).
    pub fn predict_batch(&self, images: &[ImagePatches]) -> (f64, Vec<Prediction>, usize) {
        let batch = self.to_batch(images);
        let logits = match self.model.spec.method {
            Method::Patchgd => predict(&self.model, &batch, self.config.fill_chunk),
            Method::Gd => gd_predict(&self.model, &batch),
        };
        let loss = tch::no_grad(|| {
            logits
                .cross_entropy_for_logits(&batch.labels)
                .double_value(&[])
        });
        let probs = logits.softmax(-1, Kind::Float).to_device(Device::Cpu);
        let classes = probs.size()[1] as usize;
        let flat: Vec<f32> = Vec::try_from(probs.flatten(0, -1)).expect("probabilities to Vec");
        let predictions = images
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
        (
            loss * images.len() as f64,
            predictions,
            batch.present_cells() as usize,
        )
    }

    /// Consume a patch stream to its end: train on it or evaluate it. `progress` is called with
    /// the number of images accounted for so far (used + failed).
    pub fn run_pass(
        &mut self,
        phase: Phase,
        mut rx: mpsc::Receiver<SourceItem>,
        mut progress: impl FnMut(usize),
    ) -> PassOutcome {
        let start = Instant::now();
        let mut out = PassOutcome::default();
        let mut assembler = ImageAssembler::default();
        let mut pending: Vec<ImagePatches> = Vec::new();
        let flush = |trainer: &mut Trainer,
                     pending: &mut Vec<ImagePatches>,
                     out: &mut PassOutcome| {
            if pending.is_empty() {
                return;
            }
            match phase {
                Phase::Train => {
                    let (loss, right, passes, steps) = trainer.train_batch(pending);
                    out.loss_sum += loss;
                    out.correct += right;
                    out.patch_passes += passes;
                    out.optimizer_steps += steps;
                }
                Phase::Evaluate => {
                    let (loss, preds, passes) = trainer.predict_batch(pending);
                    out.loss_sum += loss;
                    out.correct += preds.iter().filter(|p| p.predicted == p.label).count() as i64;
                    out.patch_passes += passes;
                    out.predictions.extend(preds);
                }
            }
            out.images += pending.len();
            pending.clear();
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
                                flush(self, &mut pending, &mut out);
                            }
                            pending.push(image);
                            if pending.len() == self.config.batch_size {
                                flush(self, &mut pending, &mut out);
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
        flush(self, &mut pending, &mut out);
        for id in assembler.incomplete() {
            out.failures.push(Failure {
                image_id: id,
                url: String::new(),
                stage: "patch".into(),
                message: "stream ended before all patches arrived".into(),
            });
        }
        progress(out.images + out.failures.len());
        out.seconds = start.elapsed().as_secs_f64();
        out
    }
}
