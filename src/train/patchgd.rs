//! One PatchGD outer step (METHOD.md): fill Z without gradient, then for each chunk of a seeded
//! permutation re-encode only the chunk's patches with gradient, write them into a detached Z,
//! run the head, and accumulate; the optimizer steps where the plan says.
//!
//! Z is kept flat as B x K x D (K = rows * cols, cell (r, c) at r * cols + c) and viewed as
//! B x D x rows x cols for the head, so Z[:, :, r, c] is patch (r, c) by construction.

use tch::{Kind, Tensor};

pub use super::batch::GridBatch;
use super::optim::Adam;
use super::schedule::StepPlan;
use crate::model::Model;

/// What an outer step did.
pub struct StepOutcome {
    /// Mean cross-entropy over the inner iterations.
    pub loss: f64,
    /// Logits of the last inner iteration (every cell fresh by then), detached.
    pub logits: Tensor,
    pub optimizer_steps: usize,
    /// Backbone patch passes: fill and gradient passes together.
    pub patch_passes: usize,
    /// Z after the step (B x K x D), detached: what the latent store keeps.
    pub z: Tensor,
    /// B x K: the optimizer step count whose weights computed each cell of `z`.
    pub cell_steps: Vec<u64>,
}

/// Cells of Z taken from the latent store instead of being encoded in the fill pass.
pub struct Reuse {
    /// B x K x D: the stored vectors (anything where `compute` is true).
    pub z: Tensor,
    /// B x K, image-major, on the host: true where the fill must encode the patch (it only
    /// chooses which cells to read, so it never needs to be on the device).
    pub compute: Vec<bool>,
}

/// Encode every present patch with no gradient: B x K x D, no autograd graph; absent cells
/// (mask 0) are zero and cost nothing, reused cells come from `reuse`. `chunk` bounds how many
/// patches go through the backbone at once. BatchNorm follows `train` (METHOD.md keeps the
/// backbone in training mode during the fill of a training step). Returns Z and the number of
/// patches encoded.
pub fn fill(
    model: &Model,
    batch: &GridBatch,
    chunk: i64,
    train: bool,
    reuse: Option<&Reuse>,
) -> (Tensor, i64) {
    let (b, k) = (batch.batch_size(), batch.cells());
    let device = batch.device();
    let mut need = batch.present_flat();
    if let Some(r) = reuse {
        need.retain(|&i| r.compute[i as usize]);
    }
    let every_cell = need.len() as i64 == b * k && reuse.is_none();
    tch::no_grad(|| {
        let outs: Vec<Tensor> = need
            .chunks(chunk.max(1) as usize)
            .map(|cells| model.encode(&batch.patches(cells), train))
            .collect();
        let d = model.spec.latent_dim;
        let base = || match reuse {
            Some(r) => r.z.view([b * k, d]).to_device(device).to_kind(Kind::Float),
            None => Tensor::zeros([b * k, d], (Kind::Float, device)),
        };
        let z = if every_cell {
            Tensor::cat(&outs, 0)
        } else if outs.is_empty() {
            base()
        } else {
            let idx = Tensor::from_slice(&need).to_device(device);
            base().index_copy(0, &idx, &Tensor::cat(&outs, 0))
        };
        (z.view([b, k, d]), need.len() as i64)
    })
}

/// B x K x D -> B x D x rows x cols.
pub fn grid_view(z: &Tensor, rows: i64, cols: i64) -> Tensor {
    let size = z.size();
    z.view([size[0], rows, cols, size[2]]).permute([0, 3, 1, 2])
}

/// One inner iteration's forward pass: encode the patches at `cells` with gradient and write
/// them into a detached copy of `z`. Returns (new Z with the fresh cells carrying gradient,
/// head logits).
pub fn inner_forward(
    model: &Model,
    batch: &GridBatch,
    z: &Tensor,
    cells: &[i64],
) -> (Tensor, Tensor) {
    let device = model.device();
    let b = batch.batch_size();
    let idx = Tensor::from_slice(cells).to_device(device);
    let n = cells.len() as i64;
    let fresh = model.encode(&batch.cells_of_all(cells), true);
    let d = fresh.size()[1];
    let mut fresh = fresh.view([b, n, d]);
    if let Some(mask) = &batch.mask {
        // Absent cells stay zero (their encoding of a blank patch is discarded).
        fresh = fresh * mask.index_select(1, &idx);
    }
    let z_new = z.detach().index_copy(1, &idx, &fresh);
    let logits = model.classify_grid(&grid_view(&z_new, batch.rows, batch.cols), true);
    (z_new, logits)
}

/// One outer step at learning rate `lr`. With `reuse`, the fill pass takes those cells from the
/// latent store (`reuse_steps`: their writer steps, B x K) instead of encoding them.
pub fn outer_step(
    model: &Model,
    opt: &mut Adam,
    lr: f64,
    batch: &GridBatch,
    plan: &StepPlan,
    fill_chunk: i64,
    reuse: Option<(&Reuse, &[u64])>,
) -> StepOutcome {
    let b = batch.batch_size();
    let k = batch.cells();
    let (mut z, encoded) = fill(model, batch, fill_chunk, true, reuse.map(|r| r.0));
    let mut patch_passes = encoded as usize;
    let now = opt.steps as u64;
    let mut cell_steps: Vec<u64> = match reuse {
        Some((r, stored)) => r
            .compute
            .iter()
            .zip(stored)
            .map(|(&c, &s)| if c { now } else { s })
            .collect(),
        None => vec![now; (b * k) as usize],
    };
    opt.zero_grad();
    let mut loss_sum = Tensor::zeros([], (Kind::Float, model.device()));
    let mut steps = 0;
    let mut last_logits = None;
    for (j, cells) in plan.chunks.iter().enumerate() {
        let step = opt.steps as u64;
        for image in 0..b as usize {
            for &c in cells {
                cell_steps[image * k as usize + c as usize] = step;
            }
        }
        let (z_new, logits) = inner_forward(model, batch, &z, cells);
        let loss = logits.cross_entropy_for_logits(&batch.labels);
        // Summed on the device and read once per step: a read per iteration would make the
        // host wait for the GPU at every inner iteration.
        loss_sum += loss.detach();
        (loss * (opt.loss_scale() / plan.group_size[j] as f64)).backward();
        patch_passes += (b as usize) * cells.len();
        if plan.step_after[j] {
            if opt.step(lr) {
                steps += 1;
            }
            opt.zero_grad();
        }
        z = z_new.detach();
        last_logits = Some(logits.detach());
    }
    StepOutcome {
        loss: loss_sum.double_value(&[]) / plan.chunks.len() as f64,
        logits: last_logits.expect("a plan has at least one chunk"),
        optimizer_steps: steps,
        patch_passes,
        z,
        cell_steps,
    }
}

/// Inference: fill Z with every patch (eval mode, no gradient), one head pass. Returns the
/// logits and Z.
pub fn predict(model: &Model, batch: &GridBatch, fill_chunk: i64) -> (Tensor, Tensor) {
    let (z, _) = fill(model, batch, fill_chunk, false, None);
    let logits =
        tch::no_grad(|| model.classify_grid(&grid_view(&z, batch.rows, batch.cols), false));
    (logits, z)
}

/// Fraction of argmax predictions equal to the labels, as a count.
pub fn correct(logits: &Tensor, labels: &Tensor) -> i64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .sum(Kind::Int64)
        .int64_value(&[])
}
