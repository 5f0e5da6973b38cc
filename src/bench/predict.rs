//! `patchgd predict`'s throughput against training's fill pass, on the same images and model.
//! Three timings, alternating over rounds: the fill pass as a training step runs it (train
//! mode, no gradient, grouped by the step's chunks) on batches already in memory; prediction's
//! own compute (eval-mode fill and one head pass) on the same batches; and prediction fed by
//! the full pipeline (object store → decode → patches → batches), as the command runs it.

use std::time::Instant;

use super::efficiency::{Setup, sync};
use super::{BenchOptions, median};
use crate::model::BackboneKind;
use crate::patch::ImagePatches;
use crate::rng::Rng;
use crate::source::stream_images;
use crate::train::batch::GridBatch;
use crate::train::patchgd::{fill, predict};
use crate::train::{Accumulation, PassOutcome, Phase, TrainError, plan_outer_step};

#[derive(Clone, Debug)]
pub struct PredictRow {
    pub backbone: String,
    pub image_px: u32,
    pub patch_px: usize,
    pub images: usize,
    pub rounds: usize,
    /// Patch passes per second, medians over rounds.
    pub training_fill: f64,
    pub predict_in_memory: f64,
    pub predict_pipeline: f64,
    /// Images per second of the pipeline prediction.
    pub predict_images_per_s: f64,
    /// Median over rounds of predict (pipeline) / training fill.
    pub ratio: f64,
}

/// Training's fill pass over every batch: patch passes per second.
fn training_fill(setup: &Setup, batches: &[(&[ImagePatches], GridBatch)]) -> Result<f64, String> {
    let trainer = setup.trainer()?;
    let mut rng = Rng::new(7);
    let start = Instant::now();
    let mut passes = 0;
    for (_, batch) in batches {
        let plan = plan_outer_step(
            batch.cells() as usize,
            setup.def.patchgd.sampling_fraction,
            Accumulation::Zeta,
            &mut rng,
        );
        let chunk = setup.def.patchgd.fill_chunk;
        passes += fill(&trainer.model, batch, chunk, true, None, Some(&plan.chunks)).1;
    }
    sync(setup.device);
    Ok(passes as f64 / start.elapsed().as_secs_f64())
}

/// Prediction's compute over every batch: patch passes per second.
fn predict_in_memory(
    setup: &Setup,
    batches: &[(&[ImagePatches], GridBatch)],
) -> Result<f64, String> {
    let trainer = setup.trainer()?;
    let start = Instant::now();
    let mut passes = 0;
    for (_, batch) in batches {
        let _ = predict(&trainer.model, batch, setup.def.patchgd.fill_chunk);
        passes += batch.present_cells() as usize;
    }
    sync(setup.device);
    Ok(passes as f64 / start.elapsed().as_secs_f64())
}

/// Prediction fed by the full pipeline, as `patchgd predict` runs it: (patch passes/s, images/s).
fn predict_pipeline(setup: &Setup, expected: usize) -> Result<(f64, f64), String> {
    let mut trainer = setup.trainer()?;
    trainer.config.store_evaluation_latents = false;
    let start = Instant::now();
    let rx = stream_images(
        setup.images.clone(),
        setup.entries.clone(),
        setup.def.stream_config(),
    );
    let pass = trainer
        .run_pass(
            Phase::Evaluate,
            rx,
            PassOutcome::default(),
            |_| {},
            |_, _| Ok::<(), TrainError>(()),
        )
        .map_err(|e| e.to_string())?;
    sync(setup.device);
    if pass.predictions.len() != expected {
        return Err(format!(
            "the pipeline predicted {} of {expected} images",
            pass.predictions.len()
        ));
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((pass.patch_passes as f64 / secs, expected as f64 / secs))
}

/// One backbone: `images` generated images of `size` px cut into `patch` px patches.
pub fn measure(
    opts: &BenchOptions,
    backbone: BackboneKind,
    size: u32,
    patch: usize,
    images: usize,
    rounds: usize,
) -> Result<PredictRow, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let setup = Setup::new(opts, &rt, backbone, size, patch, images)?;
    let assembled = setup.assembled()?;
    let batches: Vec<(&[ImagePatches], GridBatch)> = assembled
        .chunks(setup.def.train.batch_size)
        .map(|c| (c, GridBatch::from_images(c, setup.device)))
        .collect();
    predict_in_memory(&setup, &batches[..1])?; // warm-up
    let (mut fills, mut mem, mut pipe, mut per_image, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (f, m, (p, i)) = if round % 2 == 0 {
            let f = training_fill(&setup, &batches)?;
            let m = predict_in_memory(&setup, &batches)?;
            (f, m, predict_pipeline(&setup, assembled.len())?)
        } else {
            let p = predict_pipeline(&setup, assembled.len())?;
            let m = predict_in_memory(&setup, &batches)?;
            (training_fill(&setup, &batches)?, m, p)
        };
        fills.push(f);
        mem.push(m);
        pipe.push(p);
        per_image.push(i);
        ratios.push(p / f);
    }
    Ok(PredictRow {
        backbone: backbone.name().into(),
        image_px: size,
        patch_px: patch,
        images: assembled.len(),
        rounds,
        training_fill: median(fills),
        predict_in_memory: median(mem),
        predict_pipeline: median(pipe),
        predict_images_per_s: median(per_image),
        ratio: median(ratios),
    })
}
