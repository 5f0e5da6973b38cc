//! Adam, owned rather than tch's built-in, so that its whole state (moments and step count) is
//! plain tensors that a checkpoint can save and restore exactly (docs/architecture.md).

use tch::Tensor;

use super::precision::LossScaler;
use crate::dist::{DistError, GradientAverager, Group};
use crate::model::{LoadError, Param};

/// A value that must be finite was not: what it was (`loss`, `gradient of 'NAME'`, a variable).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is not finite")]
pub struct NonFinite(pub String);

/// Sees the parameters just before each update, their gradients in place (already unscaled
/// under loss scaling): how a test or a diagnostic reads the gradients a step uses.
pub type StepObserver = Box<dyn FnMut(&[Param])>;

/// Whether every tensor is finite, in one read (a read per tensor would wait for the GPU each
/// time); `Err(index)` of the first that is not.
pub fn all_finite(tensors: &[Tensor]) -> Result<(), usize> {
    if tensors.is_empty() {
        return Ok(());
    }
    let flags = tch::no_grad(|| {
        Tensor::stack(
            &tensors
                .iter()
                .map(|t| t.isfinite().all())
                .collect::<Vec<_>>(),
            0,
        )
    });
    if flags.all().int64_value(&[]) != 0 {
        return Ok(());
    }
    let flags: Vec<bool> = Vec::try_from(flags.to_device(tch::Device::Cpu)).expect("flags");
    Err(flags.iter().position(|f| !f).unwrap_or(0))
}

unsafe extern "C" {
    fn patchgd_adam_update(
        param: *mut std::ffi::c_void,
        grad: *const std::ffi::c_void,
        exp_avg: *mut std::ffi::c_void,
        exp_avg_sq: *mut std::ffi::c_void,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        step_size: f64,
        bias_correction2_sqrt: f64,
        error: *mut std::ffi::c_char,
        error_len: usize,
    ) -> i32;
}

/// One parameter's update, in place: PyTorch's single-tensor Adam, op for op
/// (`src/train/adam_update.cpp`), so that a step rounds exactly as `torch.optim.Adam` on a CPU.
fn adam_update(
    param: &mut Tensor,
    grad: &Tensor,
    (exp_avg, exp_avg_sq): (&mut Tensor, &mut Tensor),
    (beta1, beta2, eps, weight_decay): (f64, f64, f64, f64),
    step_size: f64,
    bias_correction2_sqrt: f64,
) -> Result<(), String> {
    let mut error = [0 as std::ffi::c_char; 512];
    // SAFETY: each pointer is a live tch tensor (a `torch::Tensor*`, what tch's C API passes)
    // for the duration of the call; the C++ side catches every exception and writes at most
    // `error.len()` bytes, NUL-terminated.
    let rc = unsafe {
        patchgd_adam_update(
            param.as_mut_ptr().cast(),
            grad.as_ptr().cast(),
            exp_avg.as_mut_ptr().cast(),
            exp_avg_sq.as_mut_ptr().cast(),
            beta1,
            beta2,
            eps,
            weight_decay,
            step_size,
            bias_correction2_sqrt,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: the C++ side NUL-terminated what it wrote.
    let message = unsafe { std::ffi::CStr::from_ptr(error.as_ptr()) };
    Err(message.to_string_lossy().into_owned())
}

pub struct Adam {
    params: Vec<Param>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub steps: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Mixed precision: gradients arrive multiplied by the scale (see [`Adam::loss_scale`]).
    pub scaler: Option<LossScaler>,
    observer: Option<StepObserver>,
    /// Data-parallel runs: averages each step's gradients over the ranks first.
    averager: Option<GradientAverager>,
    /// The images this rank's gradients of the coming steps are the mean over: their weight in
    /// the average across ranks (unused in a single process).
    pub step_images: f64,
}

impl Adam {
    pub fn new(params: Vec<Param>, weight_decay: f64) -> Self {
        let zeros = |p: &Param| p.master.zeros_like().detach();
        let m = params.iter().map(zeros).collect();
        let v = params.iter().map(zeros).collect();
        Self {
            params,
            m,
            v,
            steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            scaler: None,
            observer: None,
            averager: None,
            step_images: 0.0,
        }
    }

    /// Average every step's gradients over a data-parallel group before using them (a group
    /// of one changes nothing). Collective: every rank calls it (on a GPU, NCCL's set-up).
    pub fn average_over(&mut self, group: std::rc::Rc<Group>) -> Result<(), DistError> {
        if group.size() == 1 {
            self.averager = None;
            return Ok(());
        }
        let masters: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.master.shallow_clone())
            .collect();
        self.averager = Some(GradientAverager::new(group, &masters)?);
        Ok(())
    }

    /// The data-parallel averager, if any (its time spent in collectives).
    pub fn averager(&self) -> Option<&GradientAverager> {
        self.averager.as_ref()
    }

    /// Call `f` before every update with the parameters and their gradients.
    pub fn observe(&mut self, f: impl FnMut(&[Param]) + 'static) {
        self.observer = Some(Box::new(f));
    }

    /// What the loss must be multiplied by before `backward` (1 without loss scaling).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, |s| s.scale)
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.compute.as_mut().unwrap_or(&mut p.master).zero_grad();
        }
    }

    /// A parameter's gradient: that of the tensor the forward pass used (its compute copy).
    fn grad(p: &Param) -> Tensor {
        p.compute.as_ref().unwrap_or(&p.master).grad()
    }

    /// One Adam step at learning rate `lr` for every parameter that has a gradient. With loss
    /// scaling, the gradients are unscaled first and a step whose gradients are not finite is
    /// skipped (returns `Ok(false)`; the step count does not move). Without it, a gradient that
    /// is not finite is an error, and no weight changes.
    pub fn step(&mut self, lr: f64) -> Result<bool, NonFinite> {
        let mut grads: Vec<Tensor> = self.params.iter().map(Self::grad).collect();
        if let Some(averager) = &mut self.averager {
            grads = averager.average(&grads, self.step_images);
        }
        // Shallow copies: unscaling below changes `grads` in place.
        let (names, grads_defined): (Vec<&str>, Vec<Tensor>) = self
            .params
            .iter()
            .zip(&grads)
            .filter(|(_, g)| g.defined())
            .map(|(p, g)| (p.name.as_str(), g.shallow_clone()))
            .unzip();
        if let Some(mut scaler) = self.scaler.take() {
            let finite = scaler.unscale(&grads_defined);
            scaler.update(finite);
            self.scaler = Some(scaler);
            if !finite {
                return Ok(false);
            }
        } else if let Err(i) = all_finite(&grads_defined) {
            return Err(NonFinite(format!("the gradient of '{}'", names[i])));
        }
        if let Some(observe) = &mut self.observer {
            observe(&self.params);
        }
        self.steps += 1;
        // torch.optim.Adam's scalars, computed as it computes them (Python floats: f64, `**`).
        let t = self.steps as f64;
        let step_size = lr / (1.0 - self.beta1.powf(t));
        let bias_correction2_sqrt = (1.0 - self.beta2.powf(t)).powf(0.5);
        let mut failed = None;
        tch::no_grad(|| {
            for (i, (param, g)) in self.params.iter_mut().zip(&grads).enumerate() {
                if !g.defined() {
                    continue;
                }
                // The master's dtype: f32, or f64 where a test asks for exact gradients.
                let g = g.to_kind(param.master.kind());
                if let Err(e) = adam_update(
                    &mut param.master,
                    &g,
                    (&mut self.m[i], &mut self.v[i]),
                    (self.beta1, self.beta2, self.eps, self.weight_decay),
                    step_size,
                    bias_correction2_sqrt,
                ) {
                    failed.get_or_insert(format!("the Adam update of '{}': {e}", param.name));
                    continue;
                }
                if let Some(compute) = &mut param.compute {
                    compute.copy_(&param.master);
                }
            }
        });
        // Only a libtorch error lands here (a device or dtype mismatch): nothing a run survives.
        if let Some(e) = failed {
            panic!("{e}");
        }
        Ok(true)
    }

    /// Restore the moments (as written by [`Adam::state`]) and the step count.
    pub fn load_state(&mut self, steps: i64, state: &[(String, Tensor)]) -> Result<(), LoadError> {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for (i, p) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{}", p.name);
                let t = by_name
                    .get(key.as_str())
                    .ok_or_else(|| LoadError::Missing {
                        what: "optimizer state",
                        name: key.clone(),
                    })?;
                let p = &p.master;
                if t.size() != p.size() {
                    return Err(LoadError::Shape {
                        name: key,
                        found: t.size(),
                        expected: p.size(),
                    });
                }
                tch::no_grad(|| slot.copy_(&t.to_device(p.device())));
            }
        }
        if let Some(s) = &mut self.scaler {
            // (A run saved without mixed precision has none.)
            let t = by_name.get("scaler").ok_or_else(|| LoadError::Missing {
                what: "optimizer state",
                name: "scaler".into(),
            })?;
            *s = LossScaler::from_tensor(t)?;
        }
        self.steps = steps;
        Ok(())
    }

    /// Moments by parameter name (`m.NAME`, `v.NAME`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            out.push((format!("m.{}", p.name), self.m[i].shallow_clone()));
            out.push((format!("v.{}", p.name), self.v[i].shallow_clone()));
        }
        if let Some(s) = &self.scaler {
            out.push(("scaler".into(), s.to_tensor()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_matches_the_closed_form_first_step_and_skips_params_without_grad() {
        let a = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[5.0f32]).set_requires_grad(true);
        let param = |name: &str, t: &Tensor| Param {
            name: name.into(),
            master: t.shallow_clone(),
            compute: None,
        };
        let mut opt = Adam::new(vec![param("a", &a), param("b", &b)], 0.0);
        opt.zero_grad();
        (&a * &a).sum(tch::Kind::Float).backward();
        assert_eq!(opt.step(0.1), Ok(true));
        // The first Adam step moves each coordinate by lr * sign(g) (up to eps).
        let after: Vec<f32> = Vec::try_from(a.detach()).unwrap();
        assert!(
            (after[0] - 0.9).abs() < 1e-5 && (after[1] + 1.9).abs() < 1e-5,
            "{after:?}"
        );
        assert_eq!(Vec::<f32>::try_from(b.detach()).unwrap(), vec![5.0]);
        assert_eq!(opt.steps, 1);
    }

    #[test]
    fn a_non_finite_gradient_is_an_error_that_names_the_parameter_and_changes_nothing() {
        let a = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[5.0f32]).set_requires_grad(true);
        let param = |name: &str, t: &Tensor| Param {
            name: name.into(),
            master: t.shallow_clone(),
            compute: None,
        };
        let mut opt = Adam::new(vec![param("a", &a), param("b", &b)], 0.0);
        opt.zero_grad();
        ((&a * 2.0).sum(tch::Kind::Float) + (&b * f64::INFINITY).sum(tch::Kind::Float)).backward();
        let err = opt.step(0.1).unwrap_err();
        assert_eq!(err.to_string(), "the gradient of 'b' is not finite");
        assert_eq!(Vec::<f32>::try_from(a.detach()).unwrap(), vec![1.0, -2.0]);
        assert_eq!(opt.steps, 0);
    }
}
