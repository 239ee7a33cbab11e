#pragma once
// Helpers shared by the test programs.
#include <torch/torch.h>

#include <algorithm>
#include <vector>

namespace mep_test {

/// Copies the parameter values of `from` into `to` (same architecture).
inline void copy_parameters(const torch::nn::Sequential& from, torch::nn::Sequential& to) {
  torch::NoGradGuard no_grad;
  auto src = from->parameters();
  auto dst = to->parameters();
  for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
}

/// The largest absolute elementwise difference between two lists of tensors.
inline double max_abs_diff(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, (a[i] - b[i]).abs().max().item<double>());
  return worst;
}

}  // namespace mep_test
