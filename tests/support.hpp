#pragma once
// Helpers shared by the test programs.
#include <torch/torch.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

namespace mep_test {

/// A small classifier of 20 features into 10 classes, with a dropout layer:
/// Linear(20, 32), ReLU, Dropout(0.1), Linear(32, 10).
inline torch::nn::Sequential tiny() {
  return torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::ReLU(), torch::nn::Dropout(0.1),
                               torch::nn::Linear(32, 10));
}

/// Copies the parameter values of `from` into `to` (same architecture).
inline void copy_parameters(const torch::nn::Sequential& from, torch::nn::Sequential& to) {
  torch::NoGradGuard no_grad;
  auto src = from->parameters();
  auto dst = to->parameters();
  for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
}

/// Copies of the parameter values of `model`.
inline std::vector<torch::Tensor> parameter_values(const torch::nn::Sequential& model) {
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.detach().clone());
  return out;
}

/// Writes `values` (as parameter_values returns them) into the parameters of `model`.
inline void set_parameters(torch::nn::Sequential& model, const std::vector<torch::Tensor>& values) {
  torch::NoGradGuard no_grad;
  auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) params[i].copy_(values[i]);
}

/// The largest absolute elementwise difference between two lists of tensors.
/// A small MLP for optimizer tests: 20 → 32 → 10 with tanh.
inline torch::nn::Sequential small_mlp() {
  return torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::Tanh(), torch::nn::Linear(32, 10));
}

inline double max_abs_diff(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, (a[i] - b[i]).abs().max().item<double>());
  return worst;
}

template <class O, class = void>
struct has_mode : std::false_type {};
template <class O>
struct has_mode<O, std::void_t<decltype(std::declval<O&>().mode())>> : std::true_type {};

/// Valid options of type O, usable with a parameter list: the defaults (lr 0.1 where the
/// options need one), and for the EP family the backprop mode.
template <class O>
O some_options() {
  O o = [] {
    if constexpr (std::is_default_constructible_v<O>) return O();
    else return O(0.1);
  }();
  if constexpr (has_mode<O>::value) o.mode(std::decay_t<decltype(o.mode())>::Backprop);
  return o;
}

}  // namespace mep_test
