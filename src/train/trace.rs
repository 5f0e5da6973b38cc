//! What a traced trainer notes at each step: the random choices it made and what it computed
//! from them. The runner writes these notes to a run's trace (`patchgd run --trace DIR`,
//! `pipeline::trace`), which the PyTorch twin replays choice for choice (docs/parity.md,
//! "The paired run").

/// One training step (one mini-batch: an outer step of PatchGD).
#[derive(Clone, Debug, PartialEq)]
pub struct TracedStep {
    /// Outer steps taken after this one (1 for the first).
    pub step: u64,
    /// The mini-batch's images, in batch order.
    pub images: Vec<String>,
    /// The learning rate the step used.
    pub lr: f64,
    /// PatchGD: the step's permutation of the grid's cells (row-major cell indices), which
    /// the plan cuts into the inner iterations' chunks. Empty for GD.
    pub permutation: Vec<i64>,
    /// Every Dropout2d mask the head drew, in call order (each inner iteration's head pass
    /// draws one per block): B x C values, image-major, true where a channel was zeroed.
    pub dropout: Vec<Vec<bool>>,
    /// The cross-entropy of each inner iteration (f32, as computed).
    pub losses: Vec<f32>,
    /// Optimizer steps taken after this one.
    pub optimizer_steps: i64,
}

/// One mini-batch of an evaluation pass.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedEval {
    pub images: Vec<String>,
    /// Each image's class probabilities (softmax of the logits).
    pub probabilities: Vec<Vec<f32>>,
}

/// The notes taken since the runner last collected them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TraceNotes {
    pub steps: Vec<TracedStep>,
    pub evals: Vec<TracedEval>,
}

/// Pack a mask as the trace writes it: bit i (of byte i / 8, least significant bit first) is
/// value i, set where true; lower-case hex.
pub fn mask_hex(mask: &[bool]) -> String {
    let mut out = String::with_capacity(mask.len().div_ceil(8) * 2);
    for byte in mask.chunks(8) {
        let b = byte
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, &on)| acc | (u8::from(on) << i));
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_pack_least_significant_bit_first() {
        let mut m = vec![false; 10];
        m[0] = true;
        m[3] = true;
        m[9] = true;
        // byte 0: bits 0 and 3 = 0x09; byte 1: bit 1 = 0x02.
        assert_eq!(mask_hex(&m), "0902");
        assert_eq!(mask_hex(&[]), "");
    }
}
