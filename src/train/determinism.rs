//! Run-to-run reproducibility settings of libtorch that tch does not expose.
//!
//! On CPUs with native bf16 (AVX-512 BF16, AMX), libtorch sends bf16 convolutions and matrix
//! products to oneDNN, whose kernels may reduce in a different order from run to run: two bf16
//! runs of one pipeline then end with different weights, where f32 runs are byte-identical.
//! oneDNN has a deterministic mode (PyTorch's `torch.backends.mkldnn.deterministic`); bf16 runs
//! switch it on. What a bf16 resume guarantees is in docs/checkpoints.md.

unsafe extern "C" {
    fn patchgd_set_deterministic_mkldnn(on: bool);
    fn patchgd_deterministic_mkldnn() -> bool;
}

/// Ask oneDNN for deterministic kernels (process-wide, like every libtorch context setting).
pub fn set_deterministic_mkldnn(on: bool) {
    // SAFETY: a plain setter on libtorch's global context, no pointers involved.
    unsafe { patchgd_set_deterministic_mkldnn(on) }
}

/// Whether oneDNN's deterministic mode is on.
pub fn deterministic_mkldnn() -> bool {
    // SAFETY: a plain getter on libtorch's global context.
    unsafe { patchgd_deterministic_mkldnn() }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_setting_reaches_libtorch_and_reads_back() {
        super::set_deterministic_mkldnn(true);
        assert!(super::deterministic_mkldnn());
    }
}
