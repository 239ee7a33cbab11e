#pragma once
/// \file backprop.hpp
/// Backpropagation gradient: ∇_θ L(model(x), y) by autograd, for L the policy's loss
/// (cross-entropy on the logits by default, or MSE as in loss.hpp).
/// Optimizers built on it are used like `torch::optim` ones (`backward()`, then `step()`);
/// `step(x, target)` also works when the optimizer was given the model.

#include <mep/loss.hpp>
#include <mep/options.hpp>

namespace mep {

struct BackpropGradient {
  template <class Derived>
  struct Options {
    MEP_ARG(Loss, loss, Loss::CrossEntropy)
    void validate() const {}
  };

  Loss loss = Loss::CrossEntropy;

  BackpropGradient() = default;
  template <class O>
  explicit BackpropGradient(const O& o) : loss(o.loss()) {}

  /// Overwrites `.grad()` of every parameter of `model` with ∇L; returns L (detached).
  torch::Tensor compute(torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& target) {
    torch::AutoGradMode enable(true);
    auto out = model->forward(x);
    check_target(target, out.sizes());
    auto value = loss_value(loss, out, target);
    auto params = model->parameters();
    auto grads = torch::autograd::grad({value}, params, /*grad_outputs=*/{}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < params.size(); ++i) {
      auto g = grads[i].defined() ? grads[i] : torch::zeros_like(params[i]);
      params[i].mutable_grad() = g;
    }
    return value.detach();
  }
};

}  // namespace mep
