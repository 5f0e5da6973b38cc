//! Adam, owned rather than tch's built-in, so that its whole state (moments and step count) is
//! plain tensors that a checkpoint can save and restore exactly (DESIGN.md).

use tch::{Kind, Tensor};

use super::precision::LossScaler;
use crate::model::Param;

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
        }
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
    /// skipped (returns false; the step count does not move).
    pub fn step(&mut self, lr: f64) -> bool {
        if let Some(mut scaler) = self.scaler.take() {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(Self::grad)
                .filter(|g| g.defined())
                .collect();
            let finite = scaler.unscale(&grads);
            scaler.update(finite);
            self.scaler = Some(scaler);
            if !finite {
                return false;
            }
        }
        self.steps += 1;
        let t = self.steps as f64;
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        tch::no_grad(|| {
            for (i, param) in self.params.iter_mut().enumerate() {
                let g = Self::grad(param);
                if !g.defined() {
                    continue;
                }
                let p = &mut param.master;
                let g = g.to_kind(Kind::Float);
                let g = if self.weight_decay != 0.0 {
                    &g + &*p * self.weight_decay
                } else {
                    g
                };
                let _ = self.m[i]
                    .g_mul_scalar_(self.beta1)
                    .g_add_(&(&g * (1.0 - self.beta1)));
                let _ = self.v[i]
                    .g_mul_scalar_(self.beta2)
                    .g_add_(&(&g * &g * (1.0 - self.beta2)));
                let denom = (&self.v[i] / bc2).sqrt().g_add_scalar(self.eps);
                let update = (&self.m[i] / bc1) / denom * lr;
                let _ = p.g_sub_(&update);
                if let Some(compute) = &mut param.compute {
                    compute.copy_(p);
                }
            }
        });
        true
    }

    /// Restore the moments (as written by [`Adam::state`]) and the step count.
    pub fn load_state(&mut self, steps: i64, state: &[(String, Tensor)]) -> Result<(), String> {
        let by_name: std::collections::HashMap<&str, &Tensor> =
            state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for (i, p) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{}", p.name);
                let t = by_name
                    .get(key.as_str())
                    .ok_or_else(|| format!("optimizer state has no tensor '{key}'"))?;
                let p = &p.master;
                if t.size() != p.size() {
                    return Err(format!("optimizer tensor '{key}' has the wrong shape"));
                }
                tch::no_grad(|| slot.copy_(&t.to_device(p.device())));
            }
        }
        if let Some(s) = &mut self.scaler {
            let t = by_name.get("scaler").ok_or(
                "optimizer state has no loss scaler (the run was saved without mixed precision)",
            )?;
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
        opt.step(0.1);
        // The first Adam step moves each coordinate by lr * sign(g) (up to eps).
        let after: Vec<f32> = Vec::try_from(a.detach()).unwrap();
        assert!(
            (after[0] - 0.9).abs() < 1e-5 && (after[1] + 1.9).abs() < 1e-5,
            "{after:?}"
        );
        assert_eq!(Vec::<f32>::try_from(b.detach()).unwrap(), vec![5.0]);
        assert_eq!(opt.steps, 1);
    }
}
