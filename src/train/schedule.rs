//! What happens when, inside training: the learning-rate schedule, and the plan of one PatchGD
//! outer step (which patch cells each inner iteration samples, and when the optimizer steps).

use crate::rng::Rng;

/// Linear warm-up to `peak` over `warmup_steps`, then linear decay to 0 at `horizon_steps`.
/// The horizon is explicit (the reference decays over twice the run by accident).
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub horizon_steps: u64,
}

impl LrSchedule {
    /// Learning rate for outer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        let t = step as f64 + 1.0;
        if step < self.warmup_steps {
            return self.peak * t / self.warmup_steps as f64;
        }
        let span = self.horizon_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let done = (step - self.warmup_steps) as f64;
        self.peak * (1.0 - done / span).max(0.0)
    }
}

/// Gradient accumulation ε: over all inner iterations (ε = ζ, the default) or none (ε = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accumulation {
    Zeta,
    One,
}

/// The inner iterations of one outer step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepPlan {
    /// Cell indices (row-major) sampled with gradient in each inner iteration.
    pub chunks: Vec<Vec<i64>>,
    /// Whether the optimizer steps after inner iteration j.
    pub step_after: Vec<bool>,
    /// The loss divisor of iteration j: the size of its accumulation group.
    pub group_size: Vec<usize>,
}

/// n = ceil(cells * rho) patches per inner iteration, ζ = ceil(1 / rho) iterations, over a
/// seeded permutation. The loop is bounded by the number of chunks, not ζ: when
/// ceil(cells / n) < ζ the reference never steps the optimizer; here the last chunk always does.
pub fn plan_outer_step(
    cells: usize,
    rho: f64,
    accumulation: Accumulation,
    rng: &mut Rng,
) -> StepPlan {
    let n = ((cells as f64 * rho).ceil() as usize).clamp(1, cells);
    let zeta = (1.0 / rho).ceil() as usize;
    let perm = rng.permutation(cells);
    let chunks: Vec<Vec<i64>> = perm
        .chunks(n)
        .take(zeta)
        .map(|c| c.iter().map(|&i| i as i64).collect())
        .collect();
    let epsilon = match accumulation {
        Accumulation::Zeta => zeta,
        Accumulation::One => 1,
    };
    let k = chunks.len();
    let step_after: Vec<bool> = (0..k)
        .map(|j| (j + 1) % epsilon == 0 || j + 1 == k)
        .collect();
    let group_size = (0..k)
        .map(|j| {
            let start = j / epsilon * epsilon;
            (start + epsilon).min(k) - start
        })
        .collect();
    StepPlan {
        chunks,
        step_after,
        group_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero_at_the_horizon() {
        let s = LrSchedule {
            peak: 1.0,
            warmup_steps: 4,
            horizon_steps: 12,
        };
        assert_eq!(s.lr(0), 0.25);
        assert_eq!(s.lr(3), 1.0);
        assert_eq!(s.lr(4), 1.0);
        assert_eq!(s.lr(8), 0.5);
        assert_eq!(s.lr(12), 0.0);
        assert_eq!(s.lr(100), 0.0);
    }

    #[test]
    fn every_cell_once_and_one_optimizer_step_with_epsilon_zeta() {
        let plan = plan_outer_step(64, 0.25, Accumulation::Zeta, &mut Rng::new(3));
        assert_eq!(plan.chunks.len(), 4);
        let mut all: Vec<i64> = plan.chunks.concat();
        all.sort();
        assert_eq!(all, (0..64).collect::<Vec<_>>());
        assert_eq!(plan.step_after, vec![false, false, false, true]);
        assert_eq!(plan.group_size, vec![4; 4]);
        let one = plan_outer_step(64, 0.25, Accumulation::One, &mut Rng::new(3));
        assert_eq!(one.step_after, vec![true; 4]);
        assert_eq!(one.group_size, vec![1; 4]);
    }

    #[test]
    fn still_steps_when_fewer_chunks_than_zeta() {
        // 2 x 2 grid, rho = 0.3: n = 2, two chunks, but zeta = 4.
        let plan = plan_outer_step(4, 0.3, Accumulation::Zeta, &mut Rng::new(1));
        assert_eq!(plan.chunks.len(), 2);
        assert_eq!(plan.step_after, vec![false, true]);
        assert_eq!(plan.group_size, vec![2, 2]);
    }
}
