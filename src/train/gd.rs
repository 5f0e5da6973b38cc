//! The GD baseline: each image (resized to the configured size upstream, so it arrives as a
//! 1 x 1 grid) goes whole through the backbone and a linear classifier.

use super::optim::{Adam, NonFinite};
use super::patchgd::{GridBatch, StepError, StepOutcome};
use crate::model::Model;

fn images(batch: &GridBatch) -> tch::Tensor {
    assert_eq!(
        batch.cells(),
        1,
        "GD takes whole images: a 1 x 1 grid per image"
    );
    batch.patches(&(0..batch.batch_size()).collect::<Vec<i64>>())
}

/// One GD step; a loss or gradient that is not finite is an error and changes no weight.
pub fn gd_step(
    model: &Model,
    opt: &mut Adam,
    lr: f64,
    batch: &GridBatch,
) -> Result<StepOutcome, StepError> {
    opt.zero_grad();
    let logits = model.classify_vector(&model.encode(&images(batch), true));
    let loss = logits.cross_entropy_for_logits(&batch.labels);
    let value = loss.double_value(&[]);
    // Under loss scaling, a loss that overflowed makes the scaler skip the step: its one exception.
    if !value.is_finite() && opt.scaler.is_none() {
        return Err(NonFinite("the loss".into()).into());
    }
    batch.check_reads()?;
    (loss * opt.loss_scale()).backward();
    let stepped = opt.step(lr)?;
    opt.zero_grad();
    Ok(StepOutcome {
        loss: value,
        inner_losses: vec![value as f32],
        logits: logits.detach(),
        optimizer_steps: stepped as usize,
        patch_passes: batch.batch_size() as usize,
        z: tch::Tensor::new(),
        cell_steps: Vec::new(),
    })
}

pub fn gd_predict(model: &Model, batch: &GridBatch) -> tch::Tensor {
    tch::no_grad(|| model.classify_vector(&model.encode(&images(batch), false)))
}
