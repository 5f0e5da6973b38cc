//! The runner: a run as a short sequence of stages, each a function of its own:
//!
//! 1. [`prepare`]: list and label the images, `select:`, classes;
//! 2. [`start_or_resume`]: build the trainer, or restore it from the newest checkpoint;
//! 3. [`run_epoch`], once per epoch: a training pass (checkpointed every `every_steps`), an
//!    evaluation pass, the epoch's metrics;
//! 4. [`write_outputs`]: the final checkpoint, predictions, errors, weights, plot, summary.
//!
//! The trainer runs on the calling thread (all tch work on one OS thread); the source and the
//! object store writes run on a tokio runtime in the background.

#![warn(missing_docs)]

use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tch::Device;
use tokio::runtime::Runtime;

use super::checkpoint::{EpochPosition, Ledger, TrainingState, restore, save};
use super::data_parallel::{merge_pass, quiet_unless_root, rank_share};
use super::definition::{Definition, OnError};
use super::observer::{LogObserver, RunObserver};
use super::prepare::{Prepared, prepare};
use super::setup::{build_trainer, choose_device, device_name};
use super::start_weights;
pub use super::summary::RunSummary;
use super::trace::{TraceOptions, TraceWriter};
use crate::dist::Group;
use crate::rng::Rng;
use crate::sink::tables::{errors_batch, metrics_batch, predictions_batch, to_csv, to_parquet};
use crate::sink::{EpochMetrics, plot, weights};
use crate::source::{Failure, ImageEntry, stream_images};
use crate::state::checkpoint::{self, CheckpointError};
use crate::train::metrics::{peak_rss_bytes, quadratic_weighted_kappa};
use crate::train::{PassOutcome, Phase, Trainer};

/// Why a run stopped. Each names what it was about (image, object, key, file) and keeps the
/// error that caused it as its source.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Listing or labelling the images failed.
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    /// An object store could not be reached, or refused.
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    /// The data cannot be trained on as configured (no training images, a label out of range,
    /// `on_error: stop`).
    #[error("{0}")]
    Data(String),
    /// A trained model (`patchgd predict --model`) cannot be used.
    #[error("model '{url}': {reason}")]
    Model {
        /// The run output or checkpoint.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `model.pretrained` cannot be used.
    #[error(transparent)]
    Pretrained(#[from] crate::model::pretrained::PretrainedError),
    /// The `select:` query failed.
    #[error("select: {0}")]
    Select(#[source] datafusion::error::DataFusionError),
    /// The requested device or precision is not available.
    #[error("device: {0}")]
    Device(String),
    /// An output or checkpoint file could not be encoded.
    #[error("cannot write {what}: {source}")]
    Write {
        /// Which file.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint cannot be resumed by this pipeline (a setting changed, a file is missing).
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A checkpoint file is there but cannot be read into the trainer.
    #[error("cannot resume from checkpoint file {name}: {source}")]
    ResumeFile {
        /// The checkpoint step and file.
        name: String,
        /// Why it could not be read.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The latent store could not be set up (its spill directory).
    #[error("latent store: {0}")]
    Latents(#[from] crate::state::latent::LatentError),
    /// Training stopped: a value that is not finite, or a patch that could not be read back.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// The async runtime could not start.
    #[error("cannot start the runtime for the source and stores: {0}")]
    Runtime(#[source] std::io::Error),
    /// The observer asked to stop ([`RunObserver::stop_requested`]); a checkpoint at this step
    /// was written first, so running again resumes here.
    #[error(
        "stopped at step {step} as asked; the checkpoint at this step is written: run again to resume"
    )]
    Stopped {
        /// The optimizer step the run stopped after.
        step: i64,
    },
}

/// How to run beyond what the pipeline file says.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Delete existing checkpoints and start over instead of resuming.
    pub fresh: bool,
    /// Who hears about progress; `None` logs through `tracing` ([`LogObserver`]). In a
    /// data-parallel run only rank 0's observer hears anything.
    pub observer: Option<Arc<dyn RunObserver>>,
    /// The data-parallel group this process is one rank of ([`Group::from_environment`] under
    /// `mpirun` or `srun`); `None` trains in this process alone.
    pub group: Option<Rc<Group>>,
    /// Write the run's trace (`--trace`: every random choice and its results, for a replay by
    /// the PyTorch twin; docs/parity.md). Only for a run that starts from its first step.
    pub trace: Option<TraceOptions>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("fresh", &self.fresh)
            .field("observer", &self.observer.as_ref().map(|_| "custom"))
            .field("group", &self.group)
            .field("trace", &self.trace)
            .finish()
    }
}

/// Run a pipeline definition to the end, resuming from its newest checkpoint if there is one;
/// progress goes to `tracing`.
pub fn run(def: &Definition) -> Result<RunSummary, RunError> {
    run_with(def, &RunOptions::default())
}

/// [`run`] with options: start over (`fresh`), or report to an observer of your own.
pub fn run_with(def: &Definition, options: &RunOptions) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let group = options.group.clone().unwrap_or_else(Group::single);
    if !def.train.batch_size.is_multiple_of(group.size()) {
        return Err(RunError::Data(format!(
            "train.batch_size is the global batch, shared by the ranks: {} does not divide by the \
             {} ranks of this run (use a multiple of {})",
            def.train.batch_size,
            group.size(),
            group.size()
        )));
    }
    let rt = runtime()?;
    let _guard = rt.enter();
    let observer: &dyn RunObserver = match &options.observer {
        Some(o) => o.as_ref(),
        None => &LogObserver,
    };
    let observer = quiet_unless_root(observer, &group);
    if group.size() > 1 {
        crate::storage::identify_as(&format!(
            "patchgd/{} (rank {} of {})",
            env!("CARGO_PKG_VERSION"),
            group.rank(),
            group.size()
        ));
    }
    if options.trace.is_some() && group.size() > 1 {
        return Err(RunError::Data(
            "--trace records one process's run; under several ranks, trace a run of one".into(),
        ));
    }
    let data = prepare(def, &rt)?;
    let mut session = start_or_resume(def, &data, options.fresh, &rt, observer, group)?;
    if let Some(trace) = &options.trace {
        if session.resumed.is_some() {
            return Err(RunError::Resume(format!(
                "--trace records a run from its first step, and this one would resume from a \
                 checkpoint under {}; add --fresh to start over",
                data.checkpoints.url
            )));
        }
        session.trace = Some(TraceWriter::start(trace, def, &data, &mut session.trainer)?);
    }
    for epoch in session.first_epoch()..=def.train.epochs {
        run_epoch(def, &data, &mut session, epoch, &rt, observer)?;
    }
    observer.finished();
    write_outputs(def, &data, &session, started, &rt)
}

/// The runtime a run's (or a prediction's) object-store I/O and source stream run on.
pub fn runtime() -> Result<Runtime, RunError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(RunError::Runtime)
}

/// A run in progress: the trainer, what it has accounted for, and where a resumed epoch
/// continues.
pub struct Session {
    /// Model, optimizer, schedule position and latent store.
    pub trainer: Trainer,
    /// What the run has accounted for so far.
    pub ledger: Ledger,
    /// Where the model runs.
    pub device: Device,
    /// The checkpoint this run resumed from, until its epoch has continued from it.
    resumed: Option<TrainingState>,
    /// Optimizer steps at the last checkpoint (`checkpoint.every_steps` counts from there).
    last_checkpoint_steps: i64,
    /// The run's trace, when one was asked for.
    trace: Option<TraceWriter>,
}

impl Session {
    /// The epoch to run next: 1, or the resumed checkpoint's.
    pub fn first_epoch(&self) -> u64 {
        self.resumed.as_ref().map_or(1, |s| s.epoch)
    }
}

/// Build the trainer the definition describes, then resume it from the newest complete
/// checkpoint (or delete them all, with `fresh`).
pub fn start_or_resume(
    def: &Definition,
    data: &Prepared,
    fresh: bool,
    rt: &Runtime,
    observer: &dyn RunObserver,
    group: Rc<Group>,
) -> Result<Session, RunError> {
    let device = match choose_device(def.train.device)? {
        // One GPU per rank on each machine: the rank's local rank picks it.
        Device::Cuda(_) => {
            Device::Cuda(group.local_rank() % tch::Cuda::device_count().max(1) as usize)
        }
        other => other,
    };
    let mut trainer = build_trainer(def, data.model_spec(def), device, data.train_set.len())?;
    trainer.config.batch_size = def.train.batch_size / group.size();
    trainer.join(group.clone())?;
    observer.note(&data.describe(def, &device_name(device)));
    if group.size() > 1 {
        observer.note(&format!(
            "data-parallel over {} ranks: {} images per rank and step (train.batch_size {}), \
             gradients averaged by {}",
            group.size(),
            trainer.config.batch_size,
            def.train.batch_size,
            trainer
                .optimizer
                .averager()
                .map_or("-", |a| a.transport().name())
        ));
    }
    let mut session = Session {
        last_checkpoint_steps: trainer.optimizer.steps,
        trainer,
        ledger: Ledger {
            errors: data
                .catalog
                .failures
                .iter()
                .map(|f| (0, f.clone()))
                .collect(),
            ..Ledger::default()
        },
        device,
        resumed: None,
        trace: None,
    };
    let root = &data.checkpoints;
    if fresh {
        let n = rt.block_on(checkpoint::delete_all(root))?;
        if n > 0 {
            observer.note(&format!(
                "--fresh: deleted {n} checkpoint files under {}",
                root.url
            ));
        }
    } else {
        let (loaded, skipped) = rt.block_on(checkpoint::newest(root))?;
        for e in &skipped {
            observer.note(&format!("checkpoint not usable, trying an older one: {e}"));
        }
        if let Some(loaded) = loaded {
            let state = restore(&mut session.trainer, &loaded, def)?;
            let at = format!(
                "{}/{}",
                root.url,
                checkpoint::dir_name(loaded.manifest.step)
            );
            observer.note(&if state.epoch > def.train.epochs {
                format!("the run already finished ({at}); writing its outputs again (--fresh trains anew)")
            } else {
                format!(
                    "resuming from {at} (optimizer step {}, epoch {}, {} of {} training images done)",
                    state.optimizer_steps,
                    state.epoch,
                    state.position,
                    data.train_set.len()
                )
            });
            session.ledger = state.ledger();
            session.last_checkpoint_steps = session.trainer.optimizer.steps;
            session.resumed = Some(state);
        }
    }
    if session.resumed.is_none() {
        for line in rt.block_on(start_weights::load(&session.trainer.model, def))? {
            observer.note(&line);
        }
    }
    stop_on_error(def, &session.ledger.errors)?;
    session.trainer.check_ranks_agree("before the first step")?;
    Ok(session)
}

/// With `source.on_error: stop`, the first failure ends the run.
fn stop_on_error(def: &Definition, errors: &[(u64, Failure)]) -> Result<(), RunError> {
    match (def.source.on_error, errors.first()) {
        (OnError::Stop, Some((_, f))) => Err(RunError::Data(format!(
            "stopping (source.on_error: stop): image '{}' ({}): {}",
            f.image_id, f.url, f.message
        ))),
        _ => Ok(()),
    }
}

/// One epoch: train on the epoch's seeded order (from where a resumed checkpoint left off,
/// checkpointing every `checkpoint.every_steps`), evaluate, record and write the metrics.
pub fn run_epoch(
    def: &Definition,
    data: &Prepared,
    session: &mut Session,
    epoch: u64,
    rt: &Runtime,
    observer: &dyn RunObserver,
) -> Result<(), RunError> {
    let mut order = data.train_set.clone();
    Rng::derive(def.train.seed, "epoch-order", epoch).shuffle(&mut order);
    let order_ids: Vec<String> = order.iter().map(|e| e.image_id.clone()).collect();
    if let Some(trace) = &mut session.trace {
        trace.epoch(epoch, &order_ids)?;
    }
    let (skip, start) = resume_point(session, epoch, &order_ids)?;
    let group = session.trainer.group().clone();
    // This rank's share: every size-th image of the epoch's order, as a distributed sampler
    // takes it, so each global batch of one process is split over the ranks.
    let mine: Vec<ImageEntry> = order
        .iter()
        .skip(group.rank())
        .step_by(group.size())
        .cloned()
        .collect();
    let val_mine = data.val_set[rank_share(data.val_set.len(), &group)].to_vec();
    let train_n = mine.len();
    observer.epoch_started(
        &format!("epoch {epoch}/{}", def.train.epochs),
        train_n + val_mine.len(),
    );
    session.trainer.epoch = epoch;
    let position = EpochPosition {
        epoch,
        order: &order_ids,
        pass: &start,
    };
    let train = train_pass(def, data, session, &mine[skip..], position, rt, observer)?;
    let rx = stream_images(data.images.clone(), val_mine, data.stream.clone());
    let eval = session.trainer.run_pass(
        Phase::Evaluate,
        rx,
        PassOutcome::default(),
        |n| observer.images_done(train_n + n),
        |_, _| Ok::<(), RunError>(()),
    )?;
    if let Some(trace) = &mut session.trace {
        trace.eval(epoch, &session.trainer, eval.loss(), eval.accuracy())?;
    }
    // Every rank gets the whole epoch's outcome: the metrics and the ledger stay identical.
    let (train, eval) = (merge_pass(&group, &train), merge_pass(&group, &eval));
    account(def, data, &mut session.ledger, epoch, &train, &eval)?;
    let row = epoch_metrics(epoch, &session.trainer, &train, &eval, data.classes);
    observer.note(&format!(
        "epoch {epoch}/{}: train loss {:.4} acc {:.3} | val loss {:.4} acc {:.3} qwk {:.3} | {:.0} patches/s, {:.1} images/s | {:.1} s",
        def.train.epochs,
        row.train_loss,
        row.train_accuracy,
        row.val_loss,
        row.val_accuracy,
        row.val_qwk,
        row.patches_per_s,
        row.images_per_s,
        row.seconds
    ));
    observer.epoch_finished(&row);
    let ledger = &mut session.ledger;
    ledger.metrics.push(row);
    ledger.last_predictions = eval.predictions;
    if !group.is_root() {
        return Ok(());
    }
    // Written every epoch, so an interrupted run still has its curves so far.
    let batch = metrics_batch(&ledger.metrics);
    rt.block_on(data.output.put("metrics.parquet", to_parquet(&batch)))?;
    rt.block_on(data.output.put("metrics.csv", to_csv(&batch)))?;
    Ok(())
}

/// Where `epoch` starts: at its beginning, or, for the epoch a checkpoint was taken in, after
/// the images it had accounted for (refused when the epoch's order is not the one it saved).
fn resume_point(
    session: &mut Session,
    epoch: u64,
    order_ids: &[String],
) -> Result<(usize, PassOutcome), RunError> {
    match session.resumed.take() {
        // (A finished run's state has no order: training longer starts a new epoch.)
        Some(s) if s.epoch == epoch && !s.epoch_order.is_empty() => {
            if s.epoch_order != order_ids {
                return Err(RunError::Resume(format!(
                    "the training images changed since the checkpoint (epoch {epoch} order differs); start over with --fresh"
                )));
            }
            Ok((s.position, s.pass))
        }
        _ => Ok((0, PassOutcome::default())),
    }
}

/// The training pass over `images` (the rest of the epoch's order), continuing `start.pass`,
/// with a checkpoint every `checkpoint.every_steps` optimizer steps.
fn train_pass(
    def: &Definition,
    data: &Prepared,
    session: &mut Session,
    images: &[ImageEntry],
    start: EpochPosition,
    rt: &Runtime,
    observer: &dyn RunObserver,
) -> Result<PassOutcome, RunError> {
    let Session {
        trainer,
        ledger,
        last_checkpoint_steps,
        trace,
        ..
    } = session;
    let rx = stream_images(data.images.clone(), images.to_vec(), data.stream.clone());
    let every = def.checkpoint.every_steps as i64;
    trainer.run_pass(
        Phase::Train,
        rx,
        start.pass.clone(),
        |n| observer.images_done(n),
        |trainer: &Trainer, pass: &PassOutcome| -> Result<(), RunError> {
            if let Some(trace) = trace.as_mut() {
                trace.steps(start.epoch, trainer)?;
            }
            let steps = trainer.optimizer.steps;
            // A stop is honoured only in a run of one process: the other ranks of a
            // data-parallel run would wait for this one.
            let stop = trainer.group().size() == 1 && observer.stop_requested();
            let due = every > 0 && steps / every > *last_checkpoint_steps / every;
            // A stop writes a checkpoint at this step unless one was just written.
            if due || (stop && *last_checkpoint_steps != steps) {
                *last_checkpoint_steps = steps;
                let position = EpochPosition { pass, ..start };
                let state = TrainingState::capture(trainer, ledger, Some(position), def);
                rt.block_on(save(
                    &data.checkpoints,
                    trainer,
                    &state,
                    def.checkpoint.keep,
                ))?;
            }
            if stop {
                return Err(RunError::Stopped { step: steps });
            }
            Ok(())
        },
    )
}

/// Record an epoch's failures (and, in the first epoch, the images used); stop when
/// `on_error: stop` says so or when no training image could be used.
fn account(
    def: &Definition,
    data: &Prepared,
    ledger: &mut Ledger,
    epoch: u64,
    train: &PassOutcome,
    eval: &PassOutcome,
) -> Result<(), RunError> {
    let failures = train.failures.iter().chain(&eval.failures);
    if epoch == 1 {
        let listed = data.train_set.iter().chain(&data.val_set);
        ledger.used.extend(listed.map(|e| e.image_id.clone()));
        for f in failures.clone() {
            ledger.used.remove(&f.image_id);
        }
    }
    ledger.errors.extend(failures.map(|f| (epoch, f.clone())));
    stop_on_error(def, &ledger.errors)?;
    if train.images == 0 {
        return Err(RunError::Data(format!(
            "no training image could be used in epoch {epoch}: {} failed; first: {}",
            train.failures.len(),
            train
                .failures
                .first()
                .map_or("-".into(), |f| format!("'{}': {}", f.image_id, f.message))
        )));
    }
    Ok(())
}

/// The metrics row of an epoch from its two passes.
fn epoch_metrics(
    epoch: u64,
    trainer: &Trainer,
    train: &PassOutcome,
    eval: &PassOutcome,
    classes: i64,
) -> EpochMetrics {
    let truth: Vec<i64> = eval.predictions.iter().map(|p| p.label).collect();
    let predicted: Vec<i64> = eval.predictions.iter().map(|p| p.predicted).collect();
    EpochMetrics {
        epoch,
        train_loss: train.loss(),
        train_accuracy: train.accuracy(),
        val_loss: eval.loss(),
        val_accuracy: eval.accuracy(),
        val_qwk: quadratic_weighted_kappa(&truth, &predicted, classes as usize),
        lr: trainer
            .config
            .schedule
            .lr(trainer.outer_steps.saturating_sub(1)),
        optimizer_steps: trainer.optimizer.steps as u64,
        patches_per_s: train.patch_passes as f64 / train.seconds.max(1e-9),
        images_per_s: train.images as f64 / train.seconds.max(1e-9),
        peak_rss_bytes: peak_rss_bytes(),
        seconds: train.seconds + eval.seconds,
    }
}

/// The last stage: the final checkpoint (resuming a finished run only rewrites these outputs),
/// then predictions, errors, the learning-curve plot, the weights, the pipeline and the summary.
pub fn write_outputs(
    def: &Definition,
    data: &Prepared,
    session: &Session,
    started: Instant,
    rt: &Runtime,
) -> Result<RunSummary, RunError> {
    let Session {
        trainer, ledger, ..
    } = session;
    let Some(last) = ledger.metrics.last() else {
        return Err(RunError::Data("the run has no completed epoch".into()));
    };
    let col = |f: fn(&EpochMetrics) -> f64| ledger.metrics.iter().map(f).collect::<Vec<f64>>();
    let png = plot::learning_curves(
        &def.name,
        &col(|m| m.train_loss),
        &col(|m| m.val_loss),
        &col(|m| m.train_accuracy),
        &col(|m| m.val_accuracy),
    );
    let write_err = |what: &str| {
        let what = what.to_string();
        move |e: Box<dyn std::error::Error + Send + Sync>| RunError::Write { what, source: e }
    };
    let png = png.map_err(|e| write_err("learning_curves.png")(e.into()))?;
    let weights = weights::safetensors_bytes(&trainer.model.named_tensors())
        .map_err(|e| write_err("weights")(e.into()))?;
    let group = trainer.group().clone();
    // Each rank's own counts (its latent shard, its images), added up.
    let mut totals = [
        trainer.reused_cells as f64,
        trainer.spooled_images as f64,
        trainer.latents.len() as f64,
    ];
    group.all_reduce_sum_f64(&mut totals);
    let failed: BTreeSet<&str> = ledger
        .errors
        .iter()
        .map(|(_, f)| f.image_id.as_str())
        .collect();
    let summary = RunSummary {
        name: def.name.clone(),
        method: def.method,
        device: device_name(session.device),
        classes: data.classes,
        epochs: def.train.epochs,
        images_seen: data.catalog.objects,
        images_used: ledger.used.len(),
        images_failed: failed.len(),
        labels_without_image: data.catalog.labels_without_image.len(),
        images_deselected: data.deselected,
        train_images: data.train_set.len(),
        val_images: data.val_set.len(),
        final_val_accuracy: last.val_accuracy,
        final_val_qwk: last.val_qwk,
        final_val_loss: last.val_loss,
        wall_seconds: started.elapsed().as_secs_f64(),
        output: data.output.url.clone(),
        latent_cells_reused: totals[0] as u64,
        images_spooled: totals[1] as u64,
        latent_images: totals[2] as usize,
        ranks: group.size(),
        gradient_averaging_seconds: trainer.optimizer.averager().map_or(0.0, |a| a.seconds),
    };
    let final_state = TrainingState::capture(trainer, ledger, None, def);
    rt.block_on(save(
        &data.checkpoints,
        trainer,
        &final_state,
        def.checkpoint.keep,
    ))?;
    if !group.is_root() {
        return Ok(summary);
    }
    let pipeline =
        serde_norway::to_string(def).map_err(|e| write_err("pipeline.yaml")(e.into()))?;
    let summary_json =
        serde_json::to_vec_pretty(&summary).map_err(|e| write_err("summary.json")(e.into()))?;
    let out = &data.output;
    rt.block_on(async {
        let predictions = predictions_batch(def.train.epochs, &ledger.last_predictions);
        out.put("predictions.parquet", to_parquet(&predictions))
            .await?;
        out.put("errors.parquet", to_parquet(&errors_batch(&ledger.errors)))
            .await?;
        out.put("learning_curves.png", png).await?;
        out.put("model.safetensors", weights).await?;
        out.put("pipeline.yaml", pipeline).await?;
        out.put("summary.json", summary_json).await
    })?;
    Ok(summary)
}
