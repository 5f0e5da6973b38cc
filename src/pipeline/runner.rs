//! The runner wires the stages: catalog → per epoch, a source stream for train then val →
//! trainer → sinks. The trainer runs on the calling thread (all tch work on one OS thread);
//! the source and the object store writes run on a tokio runtime in the background.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tch::Device;

use super::definition::{Definition, DeviceChoice, OnError};
use crate::model::{Method, Model, ModelSpec};
use crate::patch::SpoolPolicy;
use crate::rng::Rng;
use crate::sink::tables::{errors_batch, metrics_batch, predictions_batch, to_csv, to_parquet};
use crate::sink::{EpochMetrics, plot, weights};
use crate::source::{Catalog, Failure, Split, stream_images};
use crate::state::LatentStore;
use crate::state::checkpoint::{self, CheckpointError};
use crate::state::resume::{TrainingState, inexact_change};
use crate::storage::Location;
use crate::train::metrics::{peak_rss_bytes, quadratic_weighted_kappa};
use crate::train::{LossScaler, Precision};
use crate::train::{LrSchedule, PassOutcome, Phase, Trainer, TrainerConfig};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("{0}")]
    Data(String),
    #[error("device: {0}")]
    Device(String),
    #[error("cannot write {what}: {reason}")]
    Write { what: String, reason: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
}

/// How to run beyond what the pipeline file says.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Draw a progress bar when stderr is a terminal.
    pub show_progress: bool,
    /// Delete existing checkpoints and start over instead of resuming.
    pub fresh: bool,
}

/// Write one checkpoint: weights, optimizer, latents, then the state, then the manifest; keep
/// the newest `keep`.
async fn save(
    root: &Location,
    trainer: &Trainer,
    state: &TrainingState,
    keep: usize,
) -> Result<(), RunError> {
    let write_err = |what: &str, e: String| RunError::Write {
        what: format!("checkpoint {what}"),
        reason: e,
    };
    let model = weights::safetensors_bytes(&trainer.model.named_tensors())
        .map_err(|e| write_err("weights", e.to_string()))?;
    let optimizer = weights::safetensors_bytes(&trainer.optimizer.state())
        .map_err(|e| write_err("optimizer", e.to_string()))?;
    // YAML, not JSON: its floats round-trip exactly (shortest repr out, correctly rounded in),
    // and NaN (a loss over no images) is representable.
    let yaml = serde_norway::to_string(state).expect("state to YAML");
    let mut w = checkpoint::Writer::begin(root, state.optimizer_steps as u64).await?;
    w.put("model.safetensors", model.into()).await?;
    w.put("optimizer.safetensors", optimizer.into()).await?;
    w.put_pieces("latents.arrow", trainer.latents.snapshot())
        .await?;
    w.put("state.yaml", yaml.into_bytes().into()).await?;
    w.finish().await?;
    checkpoint::prune(root, keep).await?;
    Ok(())
}

/// Load a checkpoint into the trainer; refuse it when the pipeline changed in a way that would
/// make the resumed run differ from an uninterrupted one.
fn restore(
    trainer: &mut Trainer,
    loaded: &checkpoint::Loaded,
    def: &Definition,
) -> Result<TrainingState, RunError> {
    let missing = |name: &str| {
        RunError::Resume(format!(
            "checkpoint step {} has no {name}",
            loaded.manifest.step
        ))
    };
    let state: TrainingState = serde_norway::from_slice(
        &loaded
            .bytes("state.yaml")
            .ok_or_else(|| missing("state.yaml"))?,
    )
    .map_err(|e| RunError::Resume(format!("state.yaml: {e}")))?;
    if let Some(key) = inexact_change(&state.pipeline, def) {
        return Err(RunError::Resume(format!(
            "key '{key}' changed since the checkpoint was written, so the resumed run would differ from an uninterrupted one; restore it, use another output, or start over with --fresh"
        )));
    }
    let tensors = |name: &str| {
        let path = loaded.path(name).ok_or_else(|| missing(name))?;
        tch::Tensor::read_safetensors(&path).map_err(|e| RunError::Resume(format!("{name}: {e}")))
    };
    trainer
        .restore(
            &tensors("model.safetensors")?,
            &tensors("optimizer.safetensors")?,
            state.optimizer_steps,
            state.outer_steps,
            state.rng,
        )
        .map_err(RunError::Resume)?;
    let latents = loaded
        .path("latents.arrow")
        .ok_or_else(|| missing("latents.arrow"))?;
    let file = std::fs::File::open(&latents)
        .map_err(|e| RunError::Resume(format!("latents.arrow: {e}")))?;
    trainer
        .latents
        .read_snapshot(std::io::BufReader::new(file))
        .map_err(|e| RunError::Resume(e.to_string()))?;
    Ok(state)
}

/// What a run did, written as summary.json and returned to the caller.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub method: Method,
    pub device: String,
    pub classes: i64,
    pub epochs: u64,
    /// Objects under the images URL.
    pub images_seen: usize,
    /// Images trained or evaluated on in the first epoch.
    pub images_used: usize,
    /// Distinct images in the errors table.
    pub images_failed: usize,
    /// Rows of the labels table that match no object under the images URL.
    pub labels_without_image: usize,
    /// Labelled images that the pipeline's `select:` query left out.
    pub images_deselected: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub final_val_accuracy: f64,
    pub final_val_qwk: f64,
    pub final_val_loss: f64,
    pub wall_seconds: f64,
    pub output: String,
    /// Fill-pass cells taken from the latent store instead of encoded (`latent.reuse`), in this
    /// process (a resumed run counts from its resume).
    pub latent_cells_reused: u64,
    /// Image passes (training and evaluation) whose patches waited in a spool file
    /// (`train.spool_above_mib`), in this process.
    pub images_spooled: u64,
    /// Images whose Z the latent store holds at the end.
    pub latent_images: usize,
}

/// The trainer a definition describes: model (seeded), optimizer, schedule over `train_images`
/// per epoch, latent store, spool and precision settings.
pub fn build_trainer(
    def: &Definition,
    spec: ModelSpec,
    device: Device,
    train_images: usize,
) -> Result<Trainer, RunError> {
    if def.train.precision == Precision::F16 && !device.is_cuda() {
        return Err(RunError::Device(format!(
            "train.precision f16 needs a CUDA device (libtorch's autocast, as tch exposes it, \
             covers CUDA only), but this run's device is {}; use precision bf16 or f32",
            device_name(device)
        )));
    }
    let steps_per_epoch = train_images.div_ceil(def.train.batch_size) as f64;
    let schedule = LrSchedule {
        peak: def.train.lr,
        warmup_steps: (def.train.warmup_epochs * steps_per_epoch).round() as u64,
        horizon_steps: (def.train.decay_epochs.unwrap_or(def.train.epochs as f64) * steps_per_epoch)
            .round() as u64,
    };
    if def.train.precision == Precision::Bf16 {
        crate::train::determinism::set_deterministic_mkldnn(true);
    }
    let mut model = Model::seeded(spec, device, def.train.seed);
    model.set_precision(def.train.precision);
    let mut trainer = Trainer::new(
        model,
        TrainerConfig {
            batch_size: def.train.batch_size,
            sampling_fraction: def.patchgd.sampling_fraction,
            accumulation: def.patchgd.accumulation,
            fill_chunk: def.patchgd.fill_chunk,
            schedule,
            weight_decay: def.train.weight_decay,
            seed: def.train.seed,
            reuse_max_age: def.latent.reuse.then_some(def.latent.max_age_steps),
            spool: SpoolPolicy {
                above_bytes: (def.train.spool_above_mib * 1048576.0) as usize,
            },
        },
        LatentStore::new(
            def.latent.budget_mib << 20,
            def.latent.spill_dir.as_deref().map(std::path::Path::new),
        )
        .map_err(|e| RunError::Data(e.to_string()))?,
    );
    if def.train.precision == Precision::F16 {
        trainer.optimizer.scaler = Some(LossScaler::default());
    }
    Ok(trainer)
}

pub fn choose_device(choice: DeviceChoice) -> Result<Device, RunError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto => Ok(Device::cuda_if_available()),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        DeviceChoice::Cuda => Err(RunError::Device(
            "train.device is cuda but no CUDA device is available".into(),
        )),
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(enabled: bool, images: usize) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(images as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} images {elapsed_precise} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar }
    }
    fn start(&self, prefix: String, offset: usize) {
        if let Some(b) = &self.bar {
            b.set_prefix(prefix);
            b.set_position(offset as u64);
        }
    }
    fn set(&self, pos: usize) {
        if let Some(b) = &self.bar {
            b.set_position(pos as u64);
        }
    }
    /// Progress bar on a terminal, plain log lines otherwise.
    fn line(&self, text: String) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Run a pipeline definition to the end, resuming from its newest checkpoint if there is one.
/// `show_progress` draws a bar when stderr is a terminal.
pub fn run(def: &Definition, show_progress: bool) -> Result<RunSummary, RunError> {
    run_with(
        def,
        &RunOptions {
            show_progress,
            fresh: false,
        },
    )
}

/// [`run`] with options.
pub fn run_with(def: &Definition, options: &RunOptions) -> Result<RunSummary, RunError> {
    let show_progress = options.show_progress;
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let _guard = rt.enter();
    let images = Location::parse_with(&def.source.images, &def.storage)?;
    let output = Location::parse_with(&def.output, &def.storage)?;
    let mut catalog = rt.block_on(Catalog::load(&images, &def.source.labels, &def.storage))?;
    let mut stream_config = def.stream_config();
    // `select:` chooses the training set before anything is trained (docs/sql.md).
    let mut deselected = 0;
    if let Some(sql) = &def.select {
        let selection = rt
            .block_on(crate::sql::select::run(&def.data_set(), sql))
            .map_err(|e| RunError::Data(format!("select: {e}")))?;
        let listed: BTreeSet<String> = catalog.images.iter().map(|e| e.image_id.clone()).collect();
        let failed: BTreeSet<String> = selection
            .failures
            .iter()
            .filter(|f| listed.contains(&f.image_id))
            .map(|f| f.image_id.clone())
            .collect();
        catalog.failures.extend(
            selection
                .failures
                .iter()
                .filter(|f| listed.contains(&f.image_id))
                .cloned(),
        );
        let before = catalog.images.len();
        catalog
            .images
            .retain(|e| selection.images.contains(&e.image_id) && !failed.contains(&e.image_id));
        deselected = before - catalog.images.len() - failed.len();
        // GD reads whole images: a patch selection chooses its images only.
        if def.method == Method::Patchgd {
            stream_config.select = selection.cell_selector();
        }
    }
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
    let device = choose_device(def.train.device)?;
    let spec = ModelSpec {
        method: def.method,
        backbone: def.model.backbone,
        channels: def.source.channels as i64,
        latent_dim: def.model.latent_dim,
        head_width: def.model.head_width,
        head_dropout: def.model.head_dropout,
        classes,
    };
    let mut trainer = build_trainer(def, spec, device, train_set.len())?;
    let ckpt_root = Location::parse_with(&def.checkpoint_url(), &def.storage)?;
    let mut errors: Vec<(u64, Failure)> = catalog.failures.iter().map(|f| (0, f.clone())).collect();
    let mut metrics: Vec<EpochMetrics> = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut last_eval = PassOutcome::default();
    let progress = Progress::new(show_progress, train_set.len() + val_set.len());
    progress.line(format!(
        "{}: {} on {} — {} train / {} val images, {classes} classes, {} failed at listing, {} labels rows without an image{}{}",
        def.name,
        match def.method {
            Method::Patchgd => "PatchGD",
            Method::Gd => "GD",
        },
        device_name(device),
        train_set.len(),
        val_set.len(),
        catalog.failures.len(),
        catalog.labels_without_image.len(),
        catalog.labels_without_image.first().map_or(String::new(), |id| format!(" (first: '{id}')")),
        if def.select.is_some() { format!(", {deselected} left out by select:") } else { String::new() }
    ));
    // Resume from the newest complete checkpoint, unless asked to start over.
    let mut resumed: Option<TrainingState> = None;
    if options.fresh {
        let n = rt.block_on(checkpoint::delete_all(&ckpt_root))?;
        if n > 0 {
            progress.line(format!(
                "--fresh: deleted {n} checkpoint files under {}",
                ckpt_root.url
            ));
        }
    } else {
        let (loaded, skipped) = rt.block_on(checkpoint::newest(&ckpt_root))?;
        for e in &skipped {
            progress.line(format!("checkpoint not usable, trying an older one: {e}"));
        }
        if let Some(loaded) = loaded {
            let state = restore(&mut trainer, &loaded, def)?;
            let at = format!(
                "{}/{}",
                ckpt_root.url,
                checkpoint::dir_name(loaded.manifest.step)
            );
            progress.line(if state.epoch > def.train.epochs {
                format!("the run already finished ({at}); writing its outputs again (--fresh trains anew)")
            } else {
                format!(
                    "resuming from {at} (optimizer step {}, epoch {}, {} of {} training images done)",
                    state.optimizer_steps,
                    state.epoch,
                    state.position,
                    train_set.len()
                )
            });
            metrics = state.metrics.clone();
            errors = state.errors.clone();
            used = state.used.iter().cloned().collect();
            last_eval.predictions = state.last_predictions.clone();
            resumed = Some(state);
        }
    }
    let mut last_checkpoint_steps = trainer.optimizer.steps;
    let stop_on_error = |errors: &[(u64, Failure)]| -> Result<(), RunError> {
        match (def.source.on_error, errors.first()) {
            (OnError::Stop, Some((_, f))) => Err(RunError::Data(format!(
                "stopping (source.on_error: stop): image '{}' ({}): {}",
                f.image_id, f.url, f.message
            ))),
            _ => Ok(()),
        }
    };
    stop_on_error(&errors)?;
    let first_epoch = resumed.as_ref().map_or(1, |s| s.epoch);
    for epoch in first_epoch..=def.train.epochs {
        let mut order = train_set.clone();
        Rng::derive(def.train.seed, "epoch-order", epoch).shuffle(&mut order);
        let order_ids: Vec<String> = order.iter().map(|e| e.image_id.clone()).collect();
        // A resumed epoch skips the images its checkpoint had accounted for.
        let (skip, start) = match resumed.take() {
            // (A finished run's state has no order: training longer starts a new epoch.)
            Some(s) if s.epoch == epoch && !s.epoch_order.is_empty() => {
                if s.epoch_order != order_ids {
                    return Err(RunError::Resume(format!(
                        "the training images changed since the checkpoint (epoch {epoch} order differs); start over with --fresh"
                    )));
                }
                (s.position, s.pass)
            }
            _ => (0, PassOutcome::default()),
        };
        progress.start(format!("epoch {epoch}/{}", def.train.epochs), 0);
        trainer.epoch = epoch;
        let rx = stream_images(
            images.clone(),
            order[skip..].to_vec(),
            stream_config.clone(),
        );
        let every = def.checkpoint.every_steps;
        let train = trainer.run_pass(
            Phase::Train,
            rx,
            start,
            |n| progress.set(n),
            |trainer: &Trainer, pass: &PassOutcome| -> Result<(), RunError> {
                let steps = trainer.optimizer.steps;
                if every == 0 || steps / every as i64 <= last_checkpoint_steps / every as i64 {
                    return Ok(());
                }
                last_checkpoint_steps = steps;
                let state = TrainingState {
                    outer_steps: trainer.outer_steps,
                    optimizer_steps: steps,
                    rng: trainer.rng_state(),
                    epoch,
                    position: pass.images + pass.failures.len(),
                    epoch_order: order_ids.clone(),
                    pass: pass.clone(),
                    metrics: metrics.clone(),
                    errors: errors.clone(),
                    used: used.iter().cloned().collect(),
                    last_predictions: Vec::new(),
                    pipeline: def.clone(),
                };
                rt.block_on(save(&ckpt_root, trainer, &state, def.checkpoint.keep))
            },
        )?;
        let rx = stream_images(images.clone(), val_set.clone(), stream_config.clone());
        let eval = trainer.run_pass(
            Phase::Evaluate,
            rx,
            PassOutcome::default(),
            |n| progress.set(train_set.len() + n),
            |_, _| Ok::<(), RunError>(()),
        )?;
        if epoch == 1 {
            used.extend(train_set.iter().chain(&val_set).map(|e| e.image_id.clone()));
            for f in train.failures.iter().chain(&eval.failures) {
                used.remove(&f.image_id);
            }
        }
        errors.extend(
            train
                .failures
                .iter()
                .chain(&eval.failures)
                .map(|f| (epoch, f.clone())),
        );
        stop_on_error(&errors)?;
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
        let truth: Vec<i64> = eval.predictions.iter().map(|p| p.label).collect();
        let predicted: Vec<i64> = eval.predictions.iter().map(|p| p.predicted).collect();
        let row = EpochMetrics {
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
        };
        progress.line(format!(
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
        metrics.push(row);
        // Written every epoch, so an interrupted run still has its curves so far.
        let batch = metrics_batch(&metrics);
        rt.block_on(output.put("metrics.parquet", to_parquet(&batch)))?;
        rt.block_on(output.put("metrics.csv", to_csv(&batch)))?;
        last_eval = eval;
    }
    progress.finish();

    let epochs = def.train.epochs;
    let col = |f: fn(&EpochMetrics) -> f64| metrics.iter().map(f).collect::<Vec<f64>>();
    let png = plot::learning_curves(
        &col(|m| m.train_loss),
        &col(|m| m.val_loss),
        &col(|m| m.train_accuracy),
        &col(|m| m.val_accuracy),
    );
    let weights = weights::safetensors_bytes(&trainer.model.named_tensors()).map_err(|e| {
        RunError::Write {
            what: "weights".into(),
            reason: e.to_string(),
        }
    })?;
    let failed: BTreeSet<&str> = errors.iter().map(|(_, f)| f.image_id.as_str()).collect();
    let Some(last) = metrics.last() else {
        return Err(RunError::Data("the run has no completed epoch".into()));
    };
    let summary = RunSummary {
        name: def.name.clone(),
        method: def.method,
        device: device_name(device),
        classes,
        epochs,
        images_seen: catalog.objects,
        images_used: used.len(),
        images_failed: failed.len(),
        labels_without_image: catalog.labels_without_image.len(),
        images_deselected: deselected,
        train_images: train_set.len(),
        val_images: val_set.len(),
        final_val_accuracy: last.val_accuracy,
        final_val_qwk: last.val_qwk,
        final_val_loss: last.val_loss,
        wall_seconds: started.elapsed().as_secs_f64(),
        output: output.url.clone(),
        latent_cells_reused: trainer.reused_cells,
        images_spooled: trainer.spooled_images,
        latent_images: trainer.latents.len(),
    };
    // The final checkpoint: the finished run (resuming it only rewrites these outputs).
    let final_state = TrainingState {
        outer_steps: trainer.outer_steps,
        optimizer_steps: trainer.optimizer.steps,
        rng: trainer.rng_state(),
        epoch: epochs + 1,
        position: 0,
        epoch_order: Vec::new(),
        pass: PassOutcome::default(),
        metrics: metrics.clone(),
        errors: errors.clone(),
        used: used.iter().cloned().collect(),
        last_predictions: last_eval.predictions.clone(),
        pipeline: def.clone(),
    };
    rt.block_on(save(
        &ckpt_root,
        &trainer,
        &final_state,
        def.checkpoint.keep,
    ))?;
    rt.block_on(async {
        output
            .put(
                "predictions.parquet",
                to_parquet(&predictions_batch(epochs, &last_eval.predictions)),
            )
            .await?;
        output
            .put("errors.parquet", to_parquet(&errors_batch(&errors)))
            .await?;
        output.put("learning_curves.png", png).await?;
        output.put("model.safetensors", weights).await?;
        output
            .put(
                "pipeline.yaml",
                serde_norway::to_string(def).unwrap_or_default(),
            )
            .await?;
        output
            .put(
                "summary.json",
                serde_json::to_vec_pretty(&summary).expect("summary to JSON"),
            )
            .await
    })?;
    Ok(summary)
}
