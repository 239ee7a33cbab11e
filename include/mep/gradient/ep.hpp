#pragma once
/// \file ep.hpp
/// Equilibrium Propagation gradient (Scellier & Bengio 2017; symmetric variant: Laborieux
/// et al. 2021). Settle from the feedforward states at +β (and −β), then
///
///   one-sided:  g_θ = [∂_θE(s^β) − ∂_θE(s^0)] / β          (bias O(β))
///   symmetric:  g_θ = [∂_θE(s^{+β}) − ∂_θE(s^{−β})] / (2β)  (bias O(β²))
///
/// with ∂_θE = mean_b −(∂f_i/∂θ)ᵀ·ε_i (energy.hpp). The free phase is exact at the
/// feedforward states (every ε_i = 0, so ∂_θE(s^0) = 0) and is skipped unless
/// `free_phase(true)`. As β → 0 with converged settling, g → ∇_θ mean_b C(ŷ_b, y_b).
/// Linear layers take the Hebbian outer product −ε_iᵀ·a_{i−1}(s_{i−1}) directly; other
/// parameters (conv, norms) an autograd product with the states held fixed.
/// `compute` overwrites `.grad()` and returns the feedforward loss; on any error (bad
/// target, diverged settling) no gradient is written.

#include <mep/chain.hpp>
#include <mep/energy.hpp>
#include <mep/gradient/backprop.hpp>
#include <mep/loss.hpp>
#include <mep/options.hpp>
#include <mep/settle.hpp>

#include <memory>
#include <sstream>
#include <utility>
#include <vector>

namespace mep {

/// How an EP-family optimizer gets its gradient: EP (default), or autograd backprop of
/// the same loss, for comparisons on the same optimizer (the reference's SMEP `mode`).
enum class Mode { EP, Backprop };

namespace detail {

/// Options shared by the EP gradient policies (defaults: SPEC §8 and the README).
template <class Derived>
struct EPOptionsBase {
  MEP_ARG(double, beta, 0.5)
  MEP_ARG(int64_t, settle_steps, 10)
  MEP_ARG(double, settle_lr, 0.05)
  MEP_ARG(double, tol, 1e-5)
  MEP_ARG(int64_t, patience, 3)
  MEP_ARG(bool, adaptive, true)
  MEP_ARG(bool, symmetric, false)
  MEP_ARG(bool, free_phase, false)
  MEP_ARG(bool, analytic, true)
  MEP_ARG(Loss, loss, Loss::MSE)
  MEP_ARG(double, label_smoothing, 0.1)
  MEP_ARG(double, temperature, 1.0)
  MEP_ARG(Mode, mode, Mode::EP)

  void validate() const {
    MEP_CHECK_OPTION(beta_ > 0 && beta_ <= 1, "beta", beta_, "a value in (0, 1]");
    MEP_CHECK_OPTION(settle_steps_ > 0, "settle_steps", settle_steps_, "a value > 0");
    MEP_CHECK_OPTION(settle_lr_ > 0 && std::isfinite(settle_lr_), "settle_lr", settle_lr_, "a finite value > 0");
    MEP_CHECK_OPTION(tol_ >= 0, "tol", tol_, "a value >= 0 (0: never stop early)");
    MEP_CHECK_OPTION(patience_ >= 1, "patience", patience_, "a value >= 1");
    MEP_CHECK_OPTION(label_smoothing_ >= 0 && label_smoothing_ < 1, "label_smoothing", label_smoothing_,
                     "a value in [0, 1)");
    MEP_CHECK_OPTION(temperature_ > 0, "temperature", temperature_, "a value > 0");
  }
};

/// Checks the input against the model's parameters before any work.
inline void check_input(const torch::Tensor& x, const Chain& chain) {
  if (!x.defined()) throw std::invalid_argument("mep: input is undefined");
  const auto& w = chain.layers[0].weight;
  if (x.dim() < 2 || x.size(0) == 0) {
    std::ostringstream os;
    os << "mep: input must be a non-empty batch [B, ...], got shape " << x.sizes();
    throw std::invalid_argument(os.str());
  }
  if (x.scalar_type() != w.scalar_type() || x.device() != w.device()) {
    std::ostringstream os;
    os << "mep: input is " << x.scalar_type() << " on " << x.device() << " but the model's parameters are "
       << w.scalar_type() << " on " << w.device();
    throw std::invalid_argument(os.str());
  }
}

/// A non-finite feedforward output means a non-finite input or parameter (NaN and inf
/// propagate through every layer); checking the small output is cheaper than the input.
inline void check_finite_output(const torch::Tensor& out, const torch::Tensor& x, const Chain& chain) {
  if (torch::isfinite(out).all().item<bool>()) return;
  if (!torch::isfinite(x).all().item<bool>()) throw std::invalid_argument("mep: input contains NaN or infinite values");
  for (const auto& p : chain.parameters())
    if (!torch::isfinite(p).all().item<bool>())
      throw std::invalid_argument("mep: a model parameter contains NaN or infinite values");
  throw std::invalid_argument("mep: the feedforward output overflows (non-finite) for this input");
}

}  // namespace detail

/// Settling and nudging configuration of an EP gradient policy.
struct EPConfig {
  double beta = 0.5;
  SettleConfig settle;
  bool symmetric = false, free_phase = false;
  Mode mode = Mode::EP;
  Nudging nudging;

  template <class O>
  static EPConfig from(const O& o) {
    EPConfig c;
    c.beta = o.beta();
    c.settle.steps = o.settle_steps(), c.settle.lr = o.settle_lr(), c.settle.tol = o.tol();
    c.settle.patience = o.patience(), c.settle.adaptive = o.adaptive(), c.settle.analytic = o.analytic();
    c.symmetric = o.symmetric(), c.free_phase = o.free_phase(), c.mode = o.mode();
    c.nudging.loss = o.loss(), c.nudging.label_smoothing = o.label_smoothing(), c.nudging.temperature = o.temperature();
    return c;
  }
};

/// The settled phases of one EP step and their weights: ∂θ-estimate = Σ_p coef_p·∂_θE(phase_p).
struct EPPhases {
  std::vector<Phase> phases;
  std::vector<double> coef;
  torch::Tensor output;  // feedforward prediction ŷ
};

/// Shared machinery of the EP gradient policies: chain caching, validation and settling.
class EPEngine {
 public:
  EPConfig config;

  EPEngine() = default;
  explicit EPEngine(EPConfig c) : config(std::move(c)) {}

  Chain& chain_for(const torch::nn::Sequential& model) {
    if (model.is_empty()) throw ChainError("mep: the model is null");
    if (!chain_ || model.ptr() != model_.ptr()) {
      chain_ = std::make_unique<Chain>(Chain::from(model));
      model_ = model;  // held, so that its address cannot be reused by another model
    }
    return *chain_;
  }

  /// Validates, settles every phase; throws before anything is written.
  EPPhases run(Chain& chain, const torch::Tensor& x, const torch::Tensor& target) {
    torch::NoGradGuard no_grad;
    detail::check_input(x, chain);
    auto ff = chain.feedforward(x, /*freeze_norms=*/true);
    EPPhases out;
    out.output = Chain::apply(chain.post, ff.back());
    check_target(target, out.output.sizes());
    detail::check_finite_output(out.output, x, chain);
    Settler settler(chain, config.nudging, x, target, ff[0]);
    const double b = config.beta;
    if (config.symmetric) {
      out.phases.push_back(settler.settle(ff, b, config.settle));
      out.phases.push_back(settler.settle(ff, -b, config.settle));
      out.coef = {0.5 / b, -0.5 / b};
    } else {
      out.phases.push_back(settler.settle(ff, b, config.settle));
      out.coef = {1.0 / b};
      if (config.free_phase) {
        out.phases.push_back(settler.settle(ff, 0.0, config.settle));
        out.coef.push_back(-1.0 / b);
      }
    }
    chain.commit_norm_statistics();  // settling succeeded: BatchNorm's running statistics advance once
    return out;
  }

  /// Mode::Backprop: autograd gradient of the same loss through the model's own forward
  /// (dropout and BatchNorm as in any LibTorch loop), written to `.grad()`; returns the loss.
  torch::Tensor backprop(const torch::nn::Sequential& model, Chain& chain, const torch::Tensor& x,
                         const torch::Tensor& target) {
    detail::check_input(x, chain);
    const auto& n = config.nudging;
    return backprop_into_grads(model, chain.parameters(), x, target, n.loss, n.loss_smoothing());
  }

  /// The loss the EP estimate approximates, at the feedforward prediction.
  torch::Tensor loss(const EPPhases& ph, const torch::Tensor& target) const {
    return config.nudging.loss_of(ph.output, target);
  }

 private:
  std::unique_ptr<Chain> chain_;
  torch::nn::Sequential model_{nullptr};
};

/// The tensor the gradient of `p` may be written into: its `.grad()` when that has the
/// parameter's shape and options (it is overwritten), a new one otherwise.
inline torch::Tensor reusable_grad(const torch::Tensor& p) {
  const auto& g = p.grad();
  if (g.defined() && g.sizes() == p.sizes() && g.options().type_equal(p.options()) && g.is_contiguous()) return g;
  return torch::empty_like(p, torch::MemoryFormat::Contiguous);
}

/// The global EP gradient policy.
class EPGradient {
 public:
  template <class Derived>
  using Options = detail::EPOptionsBase<Derived>;

  EPGradient() = default;
  template <class O>
  explicit EPGradient(const O& o) : engine_(EPConfig::from(o)) {
    o.validate();
  }

  EPConfig& config() { return engine_.config; }
  EPEngine& engine() { return engine_; }

  /// Overwrites `.grad()` of every parameter of `model` with the EP estimate of ∇L and
  /// returns L at the feedforward prediction.
  torch::Tensor compute(const torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& target) {
    Chain& chain = engine_.chain_for(model);
    if (engine_.config.mode == Mode::Backprop) return engine_.backprop(model, chain, x, target);
    auto ph = engine_.run(chain, x, target);
    auto grads = parameter_gradients(chain, ph, x, target);
    write_grads(chain.parameters(), grads);
    return engine_.loss(ph, target);
  }

  /// Σ_p coef_p·∂_θE(phase_p) for every chain parameter, in Chain::parameters() order.
  std::vector<torch::Tensor> parameter_gradients(Chain& chain, const EPPhases& ph, const torch::Tensor& x,
                                                        const torch::Tensor& target) {
    std::vector<torch::Tensor> grads;
    const double batch = static_cast<double>(x.size(0));
    for (size_t l = 0; l < chain.layers.size(); ++l) {
      const Layer& layer = chain.layers[l];
      bool hebbian = layer.kind == LayerKind::Linear;
      for (const auto& op : layer.pre) hebbian = hebbian && op.module->parameters().empty();
      if (hebbian) {
        torch::NoGradGuard no_grad;
        // Written into the existing .grad() buffers when they fit: a fresh 800 KB result
        // per step costs page faults that rival the product itself (measured with perf).
        torch::Tensor gw = reusable_grad(layer.weight), gb = layer.bias.defined() ? reusable_grad(layer.bias) : torch::Tensor();
        for (size_t p = 0; p < ph.phases.size(); ++p) {
          auto e = ph.phases[p].eps[l].reshape({-1, layer.weight.size(0)});
          auto in = ph.phases[p].inputs[l].reshape({-1, layer.weight.size(1)});
          const double c = -ph.coef[p] / batch;
          at::addmm_out(gw, gw, e.t(), in, /*beta=*/p == 0 ? 0.0 : 1.0, /*alpha=*/c);
          if (gb.defined()) {
            if (p == 0) at::sum_out(gb, e, {0}), gb.mul_(c);
            else gb.add_(e.sum(0), c);
          }
        }
        grads.push_back(gw);
        if (layer.bias.defined()) grads.push_back(gb);
        continue;
      }
      // Autograd with the states fixed: ∂/∂θ of Σ_p coef_p·(−⟨f(a(s_{l−1})), ε_l⟩)/B.
      torch::AutoGradMode grad_mode(true);
      auto params = layer.parameters();
      torch::Tensor objective;
      for (size_t p = 0; p < ph.phases.size(); ++p) {
        auto in = l == 0 ? x : ph.phases[p].states[l - 1];
        auto f = layer.forward(Chain::apply(layer.pre, in.detach()));
        auto term = (f * ph.phases[p].eps[l].detach()).sum() * (-ph.coef[p] / batch);
        objective = objective.defined() ? objective + term : term;
      }
      auto g = torch::autograd::grad({objective}, params, {}, false, false, /*allow_unused=*/true);
      grads.insert(grads.end(), g.begin(), g.end());
    }
    append_post_gradients(chain, ph, target, grads);
    return grads;
  }

  /// Trailing parameters after the last layer (norms): the loss on the nudged output.
  void append_post_gradients(Chain& chain, const EPPhases& ph, const torch::Tensor& target,
                             std::vector<torch::Tensor>& grads) const {
    std::vector<torch::Tensor> params;
    for (const auto& op : chain.post)
      for (const auto& p : op.module->parameters()) params.push_back(p);
    if (params.empty()) return;
    torch::AutoGradMode grad_mode(true);
    auto out = Chain::apply(chain.post, ph.phases[0].states.back().detach());
    auto g = torch::autograd::grad({engine_.config.nudging.loss_of(out, target)}, params, {}, false, false, true);
    grads.insert(grads.end(), g.begin(), g.end());
  }

  EPEngine engine_;
};

/// Options of a stand-alone EPGradient: `mep::EPGradient ep(mep::EPGradientOptions().beta(1e-3));`
struct EPGradientOptions : detail::EPOptionsBase<EPGradientOptions> {};

}  // namespace mep
