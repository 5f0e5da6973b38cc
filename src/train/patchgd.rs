//! One PatchGD outer step (docs/method.md): fill Z without gradient, then for each chunk of a seeded
//! permutation re-encode only the chunk's patches with gradient, write them into a detached Z,
//! run the head, and accumulate; the optimizer steps where the plan says.
//!
//! Z is kept flat as B x K x D (K = rows * cols, cell (r, c) at r * cols + c) and viewed as
//! B x D x rows x cols for the head, so Z[:, :, r, c] is patch (r, c) by construction.

use tch::{Kind, Tensor};

pub use super::batch::GridBatch;
use super::batch::PatchReadError;
use super::optim::{Adam, NonFinite};
use super::schedule::StepPlan;
use crate::model::Model;

/// What an outer step did.
pub struct StepOutcome {
    /// Mean cross-entropy over the inner iterations.
    pub loss: f64,
    /// Each inner iteration's cross-entropy, as computed (f32).
    pub inner_losses: Vec<f32>,
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
/// are zero and cost nothing, reused cells come from `reuse`. Returns Z and the number of
/// patches encoded.
///
/// `groups` says which patches go through the backbone together. A training step passes its
/// plan's chunks: each chunk's cells of every image, image-major, exactly the batch that the
/// chunk's inner iteration encodes with gradient. Training-mode BatchNorm (docs/method.md: the reference keeps the
/// backbone in training mode during the fill) then normalises every patch with the same batch
/// statistics in the fill as in its gradient pass, and the running statistics see batches of
/// n·B patches throughout, as in PyTorch's PatchGD. `None` encodes the cells in order
/// (inference: eval mode, where grouping changes nothing). `chunk` caps the patches per
/// backbone call (a group larger than it is split).
pub fn fill(
    model: &Model,
    batch: &GridBatch,
    chunk: i64,
    train: bool,
    reuse: Option<&Reuse>,
    groups: Option<&[Vec<i64>]>,
) -> (Tensor, i64) {
    let (b, k) = (batch.batch_size(), batch.cells());
    let device = batch.device();
    let needed = |f: &i64| batch.is_present(*f) && reuse.is_none_or(|r| r.compute[*f as usize]);
    let groups: Vec<Vec<i64>> = match groups {
        Some(groups) => groups
            .iter()
            .map(|cells| batch.flat_cells(cells).into_iter().filter(needed).collect())
            .collect(),
        None => vec![(0..b * k).filter(needed).collect()],
    };
    let calls: Vec<&[i64]> = groups
        .iter()
        .flat_map(|g| g.chunks(chunk.max(1) as usize))
        .collect();
    let need: Vec<i64> = calls.concat();
    let in_order = need.len() as i64 == b * k && need.iter().zip(0..).all(|(&f, i)| f == i);
    tch::no_grad(|| {
        let outs: Vec<Tensor> = calls
            .iter()
            .map(|cells| model.encode(&batch.patches(cells), train))
            .collect();
        let d = model.spec.latent_dim;
        // Z holds what the backbone gives: fp32 in training, f64 in the exactness tests.
        let kind = outs.first().map_or(Kind::Float, |o| o.kind());
        let base = || match reuse {
            Some(r) => r.z.view([b * k, d]).to_device(device).to_kind(kind),
            None => Tensor::zeros([b * k, d], (kind, device)),
        };
        let z = if in_order {
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

/// B x K x D -> B x D x rows x cols, contiguous: the layout a PyTorch user's Z has. (A permuted
/// view is channels-last in memory, which sends the head's convolutions to other kernels: the
/// same values to float rounding, but rounding that grows through deep backbones' backward
/// passes. Contiguous, patchgd's step is bit-identical to the PyTorch twin's: tests/it/twin.rs.)
pub fn grid_view(z: &Tensor, rows: i64, cols: i64) -> Tensor {
    let size = z.size();
    z.view([size[0], rows, cols, size[2]])
        .permute([0, 3, 1, 2])
        .contiguous()
}

/// One inner iteration's forward pass: encode the present patches at `cells` of every image
/// (image-major) with gradient and write them into a detached copy of `z`. Returns (new Z with
/// the fresh cells carrying gradient, head logits, patches encoded).
pub fn inner_forward(
    model: &Model,
    batch: &GridBatch,
    z: &Tensor,
    cells: &[i64],
) -> (Tensor, Tensor, usize) {
    let (b, k) = (batch.batch_size(), batch.cells());
    let d = model.spec.latent_dim;
    let flat: Vec<i64> = batch
        .flat_cells(cells)
        .into_iter()
        .filter(|&f| batch.is_present(f))
        .collect();
    let z_flat = z.detach().view([b * k, d]);
    let z_new = if flat.is_empty() {
        z_flat
    } else {
        let fresh = model.encode(&batch.patches(&flat), true);
        let idx = Tensor::from_slice(&flat).to_device(model.device());
        z_flat.index_copy(0, &idx, &fresh)
    }
    .view([b, k, d]);
    let logits = model.classify_grid(&grid_view(&z_new, batch.rows, batch.cols), true);
    (z_new, logits, flat.len())
}

/// Why a step changed no weight.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    NonFinite(#[from] NonFinite),
    #[error(transparent)]
    PatchRead(#[from] PatchReadError),
}

/// One outer step at learning rate `lr`. With `reuse`, the fill pass takes those cells from the
/// latent store (`reuse_steps`: their writer steps, B x K) instead of encoding them. A loss or
/// gradient that is not finite stops the step with an error before any weight changes.
pub fn outer_step(
    model: &Model,
    opt: &mut Adam,
    lr: f64,
    batch: &GridBatch,
    plan: &StepPlan,
    fill_chunk: i64,
    reuse: Option<(&Reuse, &[u64])>,
) -> Result<StepOutcome, StepError> {
    let b = batch.batch_size();
    let k = batch.cells();
    let (mut z, encoded) = fill(
        model,
        batch,
        fill_chunk,
        true,
        reuse.map(|r| r.0),
        Some(&plan.chunks),
    );
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
    let mut losses: Vec<Tensor> = Vec::with_capacity(plan.chunks.len());
    let mut steps = 0;
    let mut last_logits = None;
    for (j, cells) in plan.chunks.iter().enumerate() {
        let step = opt.steps as u64;
        for image in 0..b as usize {
            for &c in cells {
                cell_steps[image * k as usize + c as usize] = step;
            }
        }
        let (z_new, logits, encoded) = inner_forward(model, batch, &z, cells);
        let loss = logits.cross_entropy_for_logits(&batch.labels);
        // Kept on the device and read once per step: a read per iteration would make the host
        // wait for the GPU at every inner iteration.
        losses.push(loss.detach().to_kind(Kind::Float));
        (loss * (opt.loss_scale() / plan.group_size[j] as f64)).backward();
        patch_passes += encoded;
        if plan.step_after[j] {
            // A patch that did not come back from its spool file must not shape a weight.
            batch.check_reads()?;
            if opt.step(lr)? {
                steps += 1;
            }
            opt.zero_grad();
        }
        z = z_new.detach();
        last_logits = Some(logits.detach());
    }
    let inner_losses: Vec<f32> =
        Vec::try_from(Tensor::stack(&losses, 0).to_device(tch::Device::Cpu)).expect("losses");
    // Summed as f64, as a PyTorch loop sums `loss.item()`s.
    let loss = inner_losses.iter().map(|&l| f64::from(l)).sum::<f64>() / inner_losses.len() as f64;
    // Under loss scaling, a loss that overflowed made the scaler skip the step: its one exception.
    if !loss.is_finite() && opt.scaler.is_none() {
        return Err(NonFinite("the loss".into()).into());
    }
    batch.check_reads()?;
    Ok(StepOutcome {
        loss,
        inner_losses,
        logits: last_logits.expect("a plan has at least one chunk"),
        optimizer_steps: steps,
        patch_passes,
        z,
        cell_steps,
    })
}

/// Inference: fill Z with every patch (eval mode, no gradient), one head pass. Returns the
/// logits and Z.
pub fn predict(model: &Model, batch: &GridBatch, fill_chunk: i64) -> (Tensor, Tensor) {
    let (z, _) = fill(model, batch, fill_chunk, false, None, None);
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
