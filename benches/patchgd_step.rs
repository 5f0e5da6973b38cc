//! Times one PatchGD outer step (fill + ζ inner iterations + optimizer step) on a fixed batch,
//! and prints the median step time, images/s and backbone patch passes/s per backbone.
//!
//! `scripts/bench` runs it (`cargo bench --profile dev --bench patchgd_step`); under
//! `cargo test` (no `--bench` argument) it runs one step per backbone as a smoke test.

use std::time::Instant;

use patchgd::model::{BackboneKind, Method, Model, ModelSpec};
use patchgd::rng::Rng;
use patchgd::train::optim::Adam;
use patchgd::train::patchgd::{GridBatch, outer_step};
use patchgd::train::{Accumulation, plan_outer_step};
use tch::{Device, Kind, Tensor};

const IMAGES: i64 = 4;
const GRID: i64 = 8; // 8 x 8 patches of 32 px: 256 px images
const PATCH: i64 = 32;
const RHO: f64 = 0.25;

fn bench(
    backbone: BackboneKind,
    latent: i64,
    head: i64,
    steps: usize,
    device: Device,
) -> (f64, f64, f64) {
    tch::manual_seed(0);
    let model = Model::new(
        ModelSpec {
            method: Method::Patchgd,
            backbone,
            channels: 3,
            latent_dim: latent,
            head_width: head,
            head_dropout: patchgd::model::head::HEAD_DROPOUT,
            classes: 10,
        },
        device,
    );
    let mut opt = Adam::new(model.trainable(), 0.0);
    let batch = GridBatch::from_input(
        Tensor::randn(
            [IMAGES, GRID * GRID, 3, PATCH, PATCH],
            (Kind::Float, device),
        ),
        Tensor::from_slice(&[0i64, 1, 2, 3][..IMAGES as usize]).to_device(device),
        GRID,
        GRID,
        None,
    );
    let mut rng = Rng::new(1);
    let mut times = Vec::new();
    let mut passes = 0;
    for i in 0..=steps {
        let plan = plan_outer_step((GRID * GRID) as usize, RHO, Accumulation::Zeta, &mut rng);
        let start = Instant::now();
        let out = outer_step(&model, &mut opt, 1e-3, &batch, &plan, 256, None).unwrap();
        if device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        if i > 0 {
            times.push(start.elapsed().as_secs_f64()); // step 0 is warm-up
        }
        passes = out.patch_passes;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    (median, IMAGES as f64 / median, passes as f64 / median)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let device = Device::cuda_if_available();
    println!(
        "PatchGD outer step: {IMAGES} images of {0} x {0} px, {GRID} x {GRID} patches of {PATCH} px, rho {RHO}, device {device:?}, torch threads {1}",
        GRID * PATCH,
        tch::get_num_threads()
    );
    println!(
        "{:<12} {:>8} {:>14} {:>10} {:>12}",
        "backbone", "steps", "median step s", "images/s", "patches/s"
    );
    for (backbone, latent, head, steps) in [
        (BackboneKind::SmallCnn, 64, 64, 20),
        (BackboneKind::Resnet18, 256, 256, 5),
    ] {
        let steps = if full { steps } else { 1 };
        let (median, images, patches) = bench(backbone, latent, head, steps, device);
        println!(
            "{:<12} {:>8} {:>14.4} {:>10.2} {:>12.0}",
            format!("{backbone:?}"),
            steps,
            median,
            images,
            patches
        );
    }
}
