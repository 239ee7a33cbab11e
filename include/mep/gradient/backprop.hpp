#pragma once
/// \file backprop.hpp
/// Backpropagation gradient: ∇_θ L(model(x), y) by autograd, for L the policy's loss
/// (cross-entropy on the logits by default, MSE, or NLL of log-probabilities, as in loss.hpp).
/// Optimizers built on it are used like `torch::optim` ones (`backward()`, then `step()`);
/// `step(x, target)` also works when the optimizer was given the model.

#include <mep/loss.hpp>
#include <mep/options.hpp>

#include <vector>

namespace mep {

/// Writes `grads` into `.grad()` of `params` (overwrites; an undefined gradient — a
/// parameter the loss does not reach — becomes zeros, one already in place stays).
inline void write_grads(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads) {
  for (size_t i = 0; i < params.size(); ++i) {
    auto p = params[i];
    if (!grads[i].defined()) p.mutable_grad() = torch::zeros_like(p);
    else if (!p.grad().is_same(grads[i])) p.mutable_grad() = grads[i].detach();
  }
}

/// Forward `x` through `model`, check `target`, and write ∇_params L into `.grad()`, for
/// L = loss_value(loss, output, target, label_smoothing). Returns L (detached).
inline torch::Tensor backprop_into_grads(const torch::nn::Sequential& model, const std::vector<torch::Tensor>& params,
                                         const torch::Tensor& x, const torch::Tensor& target, Loss loss,
                                         double label_smoothing = 0.0) {
  torch::AutoGradMode enable(true);
  torch::nn::Sequential net = model;  // a handle: forward() is not const
  auto out = net->forward(x);
  check_target(target, out.sizes());
  auto value = loss_value(loss, out, target, label_smoothing);
  write_grads(params, torch::autograd::grad({value}, params, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                            /*create_graph=*/false, /*allow_unused=*/true));
  return value.detach();
}

/// backprop_into_grads without a host read: the target's values are checked on the device
/// into `valid` (target_valid, loss.hpp) and class indices clamped into range first; only
/// its shape is checked on the host (throws TargetError). `output_shape` gets the output's.
inline torch::Tensor backprop_into_grads_deferred(const torch::nn::Sequential& model,
                                                  const std::vector<torch::Tensor>& params, const torch::Tensor& x,
                                                  const torch::Tensor& target, Loss loss, double label_smoothing,
                                                  torch::Tensor& valid, std::vector<int64_t>& output_shape) {
  torch::AutoGradMode enable(true);
  torch::nn::Sequential net = model;  // a handle: forward() is not const
  auto out = net->forward(x);
  check_target_shape(target, out.sizes());
  output_shape = out.sizes().vec();
  const auto safe = safe_target(target, out.dim() == 2 ? out.size(1) : 0);
  auto value = loss_value(loss, out, safe, label_smoothing);
  write_grads(params, torch::autograd::grad({value}, params, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                            /*create_graph=*/false, /*allow_unused=*/true));
  valid = target_valid(target, safe);
  return value.detach();
}

struct BackpropGradient {
  template <class Derived>
  struct Options {
    MEP_ARG(Loss, loss, Loss::CrossEntropy)
    /// A step whose gradients hold NaN or inf is skipped (counted by the optimizer's
    /// `skipped_steps()`) instead of throwing; either way no parameter or state changes.
    MEP_ARG(bool, skip_nonfinite, false)
    void validate() const {
      MEP_CHECK_ENUM_OPTION(loss_, "loss");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("loss", loss_), v("skip_nonfinite", skip_nonfinite_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("loss", "the loss L of step(x, target) on a model (loss.hpp): ce, cross-entropy on the logits; mse, "
                "mean_b Σ(ŷ − y)² with one-hot y for class targets; nll, −log-probability of the class");
      v("skip_nonfinite", "a step whose gradients hold NaN or inf is skipped (counted by skipped_steps()) instead of "
                          "throwing; either way no parameter or state changes");
    }
  };

  Loss loss = Loss::CrossEntropy;

  BackpropGradient() = default;
  template <class O>
  explicit BackpropGradient(const O& o) : loss(o.loss()) {}

  /// Overwrites `.grad()` of every parameter of `model` with ∇L; returns L (detached).
  torch::Tensor compute(const torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& target) {
    return backprop_into_grads(model, model->parameters(), x, target, loss);
  }
};

}  // namespace mep
