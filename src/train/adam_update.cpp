// One parameter's Adam update, as torch.optim.Adam's default CPU path (`_single_tensor_adam`,
// torch 2.11) writes it, op for op: the same ATen calls with the same scalars round the same
// way, so patchgd's weights after a step are PyTorch's bit for bit. tch 0.24 cannot call two of
// them (`addcmul_` and `addcdiv_` lose their `value` argument), hence this file; compiled by
// build.rs against the headers of the libtorch that tch links (src/train/optim.rs).
#include <ATen/core/Tensor.h>

#include <cstring>
#include <exception>

extern "C" {
// Returns 0, or 1 with libtorch's message in `error` (no exception crosses into Rust).
int patchgd_adam_update(at::Tensor *param, const at::Tensor *grad, at::Tensor *exp_avg,
                        at::Tensor *exp_avg_sq, double beta1, double beta2, double eps,
                        double weight_decay, double step_size, double bias_correction2_sqrt,
                        char *error, size_t error_len) {
  try {
    at::Tensor g = *grad;
    if (weight_decay != 0) {
      g = g.add(*param, weight_decay);
    }
    exp_avg->lerp_(g, 1 - beta1);
    exp_avg_sq->mul_(beta2).addcmul_(g, g, 1 - beta2);
    at::Tensor denom = exp_avg_sq->sqrt().div(bias_correction2_sqrt).add_(eps);
    param->addcdiv_(*exp_avg, denom, -step_size);
    return 0;
  } catch (const std::exception &e) {
    if (error_len > 0) {
      std::strncpy(error, e.what(), error_len - 1);
      error[error_len - 1] = '\0';
    }
    return 1;
  }
}
}
