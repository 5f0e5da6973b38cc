//! Setting up training from a definition: the device it asks for, and the trainer (seeded
//! model, optimizer, learning-rate schedule, latent store, spool and precision settings).

#![warn(missing_docs)]

use tch::Device;

use super::definition::{Definition, DeviceChoice};
use super::runner::RunError;
use crate::model::{Model, ModelSpec};
use crate::patch::SpoolPolicy;
use crate::state::LatentStore;
use crate::train::{LossScaler, LrSchedule, Precision, Trainer, TrainerConfig};

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
    model.set_batch_norm(def.model.batch_norm);
    model.set_head_batch_norm(def.model.head_batch_norm);
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
            normalization: def.source.normalize.clone(),
            store_evaluation_latents: true,
        },
        LatentStore::new(
            def.latent.budget_mib << 20,
            def.latent.spill_dir.as_deref().map(std::path::Path::new),
        )?,
    );
    if def.train.precision == Precision::F16 {
        trainer.optimizer.scaler = Some(LossScaler::default());
    }
    Ok(trainer)
}

/// The device `train.device` asks for; an error when CUDA is required but absent.
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

/// How a device is named in messages and the summary: `cpu` or `cuda:N`.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}
