#pragma once
/// \file autograd_module.hpp
/// A module of the chain without an analytic form (ep/segment.hpp): any parameter-free module
/// other than the known ops (torch::nn::Functional, a user's op module), and any module with
/// parameters other than Linear/Conv1d/Conv2d and the norms (a user's block). It runs through
/// its own forward() and autograd differentiates it:
///
///   forward             y = m(x), m in eval mode
///   input VJP           J_mᵀ·g = ∂⟨m(x), g⟩/∂x     (torch::autograd::grad on a forward recomputed from x as a leaf)
///   parameter gradient  (∂m/∂θ)ᵀ·g = ∂⟨m(x), g⟩/∂θ
///   ‖J‖₂                power iteration v ← JᵀJ·v / ‖JᵀJ·v‖ (jacobian_norm_by_power_iteration)
///
/// Eval mode: EP settles a fixed function of the states, so such a module runs in eval mode
/// for the whole EP step — its Dropout is off, as EP skips Dropout in the chain, and its
/// BatchNorm normalises with the running statistics, frozen for the step. When the module
/// holds buffers and is in train mode, they advance once per successful step by one forward
/// in train mode at the module's feedforward input, as a forward pass of the model would
/// (commit_statistics, ep/batch_norm.hpp). A module whose output still differs between two calls
/// on the same input (a random op, such as torch::dropout(x, p, true) in a Functional) is a
/// ChainError when the workspace is built, as is a forward that fails or returns no tensor.

#include <mep/ep/chain_error.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace mep {

/// Puts modules in eval mode while it lives; afterwards every module and submodule is back in
/// its own mode.
class EvalMode {
 public:
  EvalMode() = default;
  explicit EvalMode(const std::vector<std::shared_ptr<torch::nn::Module>>& modules) {
    for (const auto& m : modules)
      for (const auto& sub : m->modules(/*include_self=*/true)) saved_.emplace_back(sub, sub->is_training());
    for (const auto& m : modules) m->eval();
  }
  EvalMode(const EvalMode&) = delete;
  EvalMode& operator=(const EvalMode&) = delete;
  ~EvalMode() { restore(); }

  /// Each module back in its own mode (parents first: train() sets the children too).
  void restore() {
    for (auto& [m, training] : saved_) m->train(training);
    saved_.clear();
  }

 private:
  std::vector<std::pair<std::shared_ptr<torch::nn::Module>, bool>> saved_;
};

/// A module run through its forward(), with its place in the Sequential for messages.
struct AutogradModule {
  std::shared_ptr<torch::nn::Module> module;
  mutable torch::nn::AnyModule any;  // forward() is not const
  std::string name;
  size_t position = 0;
  bool stateful = false;  // holds buffers

  /// m(x) in eval mode (a module in train mode is switched for the call).
  torch::Tensor forward(const torch::Tensor& x) const {
    if (!module->is_training()) return call(x);
    EvalMode eval({module});
    return call(x);
  }

  /// m(x) in the module's own mode.
  torch::Tensor call(const torch::Tensor& x) const {
    try {
      return any.forward(x);
    } catch (const c10::Error& e) {
      std::ostringstream os;
      os << "mep: " << where() << " failed in EP's forward on a tensor of shape " << x.sizes()
         << " (EP needs a module whose forward maps one tensor to one tensor): " << e.what_without_backtrace();
      throw ChainError(os.str());
    }
  }

  /// J_mᵀ·g at x: autograd through a forward recomputed from x.
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& x) const {
    torch::AutoGradMode grad_mode(true);
    auto leaf = x.detach().requires_grad_(true);
    auto out = forward(leaf);
    if (!out.requires_grad()) return torch::zeros_like(x);
    auto r = torch::autograd::grad({out}, {leaf}, {g}, /*retain_graph=*/false, /*create_graph=*/false,
                                   /*allow_unused=*/true)[0];
    return r.defined() ? r : torch::zeros_like(x);
  }

  /// Throws ChainError unless m(x) gives `out` again (to rounding).
  void check_deterministic(const torch::Tensor& x, const torch::Tensor& out) const {
    torch::NoGradGuard no_grad;
    auto again = forward(x);
    bool same = again.sizes() == out.sizes() && again.scalar_type() == out.scalar_type();
    if (same && out.numel() > 0 && out.is_floating_point()) {
      const double scale = std::max(1.0, out.abs().max().item<double>());
      same = torch::allclose(again, out, 1e-5, 1e-6 * scale, /*equal_nan=*/true);
    } else if (same) {
      same = torch::equal(again, out);
    }
    if (same) return;
    throw ChainError("mep: " + where() +
                     " gives a different output for the same input (a random op, such as dropout?); EP runs "
                     "every module as a fixed function of its input: use torch::nn::Dropout for dropout, which EP "
                     "skips");
  }

  /// Advances the module's buffers (train mode only) by one forward in its own mode at its
  /// feedforward input `in`, as a forward pass of the model would; saves them first.
  void commit(const torch::Tensor& in, std::vector<torch::Tensor>& saved) const {
    saved.clear();
    if (!stateful || !in.defined() || !module->is_training()) return;
    for (const auto& b : module->buffers()) saved.push_back(b.clone());
    call(in);
  }
  /// Puts the buffers back as they were before the last `commit`.
  void undo(std::vector<torch::Tensor>& saved) const {
    if (saved.empty()) return;
    auto buffers = module->buffers();
    for (size_t i = 0; i < saved.size() && i < buffers.size(); ++i) buffers[i].copy_(saved[i]);
    saved.clear();
  }

  std::string where() const {
    std::ostringstream os;
    os << name << " at position " << position << " of the Sequential";
    return os.str();
  }
};

/// An estimate of ‖∂f/∂x‖₂ at x (x a batch: the largest of the samples' norms when they are
/// independent), from `iters` power iterations on JᵀJ from a fixed start vector v₀:
///
///   v ← JᵀJ·v / ‖JᵀJ·v‖,   ‖J‖ ≈ ‖J·v‖,   v₀ = (frac(k·φ) − ½)_k / ‖·‖
///
/// J·v is the derivative of the VJP u ↦ Jᵀu in u (double backward), or the central difference
/// (f(x + h·v) − f(x − h·v))/2h where the graph has no second derivative; Jᵀ·w is autograd's VJP.
/// Cost: one forward of f with its graph, one VJP that builds a graph, and per iteration one
/// JVP and one VJP — about 2·iters + 3 passes through f. Deterministic, and an estimate from
/// below (it reaches ‖J‖ as iters grows).
template <class F>
torch::Tensor jacobian_norm_by_power_iteration(F&& f, const torch::Tensor& x, int64_t iters) {
  torch::AutoGradMode grad_mode(true);
  auto leaf = x.detach().requires_grad_(true);
  auto out = f(leaf);
  if (!out.requires_grad()) return torch::zeros({}, x.options());  // constant in x
  auto vjp = [&](const torch::Tensor& w) {
    auto g = torch::autograd::grad({out}, {leaf}, {w}, /*retain_graph=*/true, /*create_graph=*/false,
                                   /*allow_unused=*/true)[0];
    return g.defined() ? g.detach() : torch::zeros_like(x);
  };
  auto u = torch::zeros_like(out).requires_grad_(true);
  torch::Tensor transposed;  // Jᵀu as a graph in u
  try {
    transposed = torch::autograd::grad({out}, {leaf}, {u}, /*retain_graph=*/true, /*create_graph=*/true,
                                       /*allow_unused=*/true)[0];
  } catch (const c10::Error&) {
    transposed = torch::Tensor();
  }
  bool exact = transposed.defined() && transposed.requires_grad();
  // h = c·max(1, ‖x‖) (v has unit norm), a float64 0-dim tensor on x's device: no host read.
  const double c = x.scalar_type() == torch::kDouble ? 1.5e-8 : 3.5e-4;
  torch::Tensor h;
  {
    torch::NoGradGuard no_grad;
    h = x.detach().norm().to(torch::kDouble).clamp_min_(1.0).mul_(c);
  }
  auto jvp = [&](const torch::Tensor& v) -> torch::Tensor {
    if (exact) {
      try {
        auto r = torch::autograd::grad({transposed}, {u}, {v}, /*retain_graph=*/true, /*create_graph=*/false,
                                       /*allow_unused=*/true)[0];
        if (r.defined()) return r.detach();
      } catch (const c10::Error&) {
      }
      exact = false;
    }
    torch::NoGradGuard no_grad;
    auto base = x.detach();
    return (f(base + h * v) - f(base - h * v)) / (2 * h);
  };
  torch::NoGradGuard no_grad;
  auto v = torch::arange(x.numel(), torch::TensorOptions().dtype(torch::kDouble))
               .mul_(0.6180339887498949)
               .frac_()
               .sub_(0.5)
               .to(x.options())
               .reshape(x.sizes());
  v.div_(v.norm().clamp_min(1e-30));
  for (int64_t k = 0; k < iters; ++k) {
    auto w = vjp(jvp(v));
    v = w / w.norm().clamp_min(1e-30);
  }
  return jvp(v).norm();
}

}  // namespace mep
