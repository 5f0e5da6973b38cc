//! Per-cell class evidence for `patchgd predict --heatmaps`: Grad-CAM (Selvaraju et al., 2017)
//! taken at the latent grid Z, the head's input.
//!
//! For class c with logit y_c, each latent channel d gets the weight
//! `alpha_d = mean over cells of dy_c / dZ[d, r, k]`, and cell (r, k) the score
//! `relu(sum_d alpha_d * Z[d, r, k])`: how much the features at that cell push towards c.
//! Z is where PatchGD's picture of an image lives, one vector per patch, so the map has
//! exactly one value per grid cell and needs no upsampling (Grad-CAM at the head's last conv
//! would be 8x coarser: three stride-2 blocks). The head runs in eval mode, so images in a
//! batch do not interact and one backward pass per class serves the whole batch.

use tch::{Kind, Tensor};

use super::Model;

/// One image's evidence: `scores[class][row * cols + col]`, with what was predicted.
#[derive(Clone, Debug)]
pub struct ImageEvidence {
    pub image_id: String,
    pub rows: usize,
    pub cols: usize,
    /// Classes x cells, Grad-CAM scores (>= 0).
    pub scores: Vec<Vec<f32>>,
    pub predicted: i64,
    pub probability: f32,
}

/// Grad-CAM of every class at Z. `z`: B x D x rows x cols (any float kind). Returns
/// B x classes x rows x cols, f32, with the logits (B x classes) it was taken from.
pub fn grad_cam(model: &Model, z: &Tensor) -> (Tensor, Tensor) {
    let z = z.detach().set_requires_grad(true);
    let logits = model.classify_grid(&z, false);
    let classes = logits.size()[1];
    let maps: Vec<Tensor> = (0..classes)
        .map(|c| {
            let target = logits.select(1, c).sum(logits.kind());
            let grad = Tensor::run_backward(&[target], &[&z], true, false)
                .pop()
                .expect("one gradient per input");
            let alpha = grad.mean_dim(&[2i64, 3][..], true, Kind::Float);
            (alpha * z.to_kind(Kind::Float))
                .sum_dim_intlist(&[1i64][..], false, Kind::Float)
                .relu()
        })
        .collect();
    (Tensor::stack(&maps, 1).detach(), logits.detach())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackboneKind, Method, ModelSpec};
    use crate::rng::Rng;
    use tch::Device;

    fn model() -> Model {
        let spec = ModelSpec {
            method: Method::Patchgd,
            backbone: BackboneKind::SmallCnn,
            channels: 1,
            latent_dim: 4,
            head_width: 6,
            head_dropout: 0.0,
            classes: 3,
        };
        let mut m = Model::seeded(spec, Device::Cpu, 3);
        m.vs.double();
        m
    }

    /// A seeded Z in [-1, 1) (our own generator: libtorch's is shared with other tests).
    fn latents(shape: [i64; 4], seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n = shape.iter().product::<i64>();
        let v: Vec<f64> = (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect();
        Tensor::from_slice(&v).view(shape)
    }

    /// Grad-CAM from its definition with central differences for dy_c/dZ: an oracle that
    /// shares no code with autograd.
    fn by_finite_differences(m: &Model, z: &Tensor, image: i64, class: i64) -> Vec<f64> {
        let (d, rows, cols) = (z.size()[1], z.size()[2], z.size()[3]);
        let logit =
            |z: &Tensor| tch::no_grad(|| m.classify_grid(z, false)).double_value(&[image, class]);
        let h = 1e-6;
        let mut alpha = vec![0.0; d as usize];
        for (k, a) in alpha.iter_mut().enumerate() {
            for r in 0..rows {
                for c in 0..cols {
                    let bump = |s: f64| {
                        let zz = z.copy();
                        let v = zz.double_value(&[image, k as i64, r, c]);
                        let _ = zz.get(image).get(k as i64).get(r).get(c).fill_(v + s);
                        logit(&zz)
                    };
                    *a += (bump(h) - bump(-h)) / (2.0 * h) / (rows * cols) as f64;
                }
            }
        }
        let mut out = Vec::new();
        for r in 0..rows {
            for c in 0..cols {
                let s: f64 = (0..d)
                    .map(|k| alpha[k as usize] * z.double_value(&[image, k, r, c]))
                    .sum();
                out.push(s.max(0.0));
            }
        }
        out
    }

    #[test]
    fn grad_cam_matches_its_definition_computed_by_finite_differences() {
        let m = model();
        let z = latents([2, 4, 3, 5], 1);
        let (maps, logits) = grad_cam(&m, &z);
        assert_eq!(maps.size(), [2, 3, 3, 5]);
        let expected = tch::no_grad(|| m.classify_grid(&z, false));
        assert!(logits.allclose(&expected, 1e-12, 1e-12, false));
        let mut positive = 0;
        for image in 0..2 {
            for class in 0..3 {
                let want = by_finite_differences(&m, &z, image, class);
                let got: Vec<f64> = Vec::try_from(
                    maps.get(image)
                        .get(class)
                        .flatten(0, -1)
                        .to_kind(Kind::Double),
                )
                .unwrap();
                for (g, w) in got.iter().zip(&want) {
                    // Scores are f32: compare at f32 precision of the map's scale.
                    let scale = want.iter().fold(1e-3f64, |a, b| a.max(b.abs()));
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "image {image} class {class}: {g} vs {w}"
                    );
                }
                positive += want.iter().filter(|v| **v > 0.0).count();
            }
        }
        // The ReLU kept some cells and the test compared real evidence, not zeros.
        assert!(positive > 10, "{positive} positive cells");
    }

    #[test]
    fn an_images_map_does_not_depend_on_the_rest_of_its_batch() {
        let m = model();
        let z = latents([3, 4, 3, 3], 2);
        let (together, _) = grad_cam(&m, &z);
        let (alone, _) = grad_cam(&m, &z.narrow(0, 1, 1));
        assert!(together.get(1).allclose(&alone.get(0), 1e-6, 1e-9, false));
    }
}
