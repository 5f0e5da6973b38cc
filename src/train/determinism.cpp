// libtorch settings that tch 0.24 does not expose; compiled by build.rs against the headers of
// the libtorch that tch links (see src/train/determinism.rs).
#include <ATen/Context.h>

extern "C" {
// What torch.backends.mkldnn.deterministic sets: oneDNN kernels with a fixed reduction order.
void patchgd_set_deterministic_mkldnn(bool on) {
  at::globalContext().setDeterministicMkldnn(on);
}
bool patchgd_deterministic_mkldnn() {
  return at::globalContext().deterministicMkldnn();
}
}
