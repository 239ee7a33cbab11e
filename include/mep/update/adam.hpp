#pragma once
/// \file adam.hpp
/// Adam (Kingma & Ba 2015, arXiv:1412.6980), written to match `torch::optim::Adam`:
///   g ← g + λW (coupled weight decay);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
///   u = (m / (1−β₁ᵗ)) / (√v / √(1−β₂ᵗ) + ε)   (v ← max(v_max, v) with amsgrad)
///   W ← W − lr·u
/// AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), as `torch::optim::AdamW`: the same
/// direction of the gradient alone, with decoupled weight decay W ← W(1 − lr·λ) − lr·u.
/// Both carry their own moments: the optimizers built on them have no momentum option.

#include <mep/options.hpp>
#include <mep/state.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mep {

struct AdamUpdate {
  template <class Derived>
  struct Options {
    MEP_ARG(Pair, betas, Pair(0.9, 0.999))
    MEP_ARG(double, eps, 1e-8)
    MEP_ARG(bool, amsgrad, false)
    void validate() const {
      const auto [beta1, beta2] = betas_;
      MEP_CHECK_OPTION(beta1 >= 0 && beta1 < 1, "betas", detail::option_text(betas_), "β₁ in [0, 1)");
      MEP_CHECK_OPTION(beta2 >= 0 && beta2 < 1, "betas", detail::option_text(betas_), "β₂ in [0, 1)");
      MEP_CHECK_OPTION(eps_ >= 0 && std::isfinite(eps_), "eps", eps_, "a finite value >= 0");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("betas", betas_), v("eps", eps_), v("amsgrad", amsgrad_);
    }
  };

  static constexpr bool coupled_weight_decay = true;
  static constexpr bool owns_momentum = true;
  /// The step is `apply`'s, rounded as torch::optim rounds it.
  static constexpr bool torch_rounding = true;

  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool amsgrad = false;

  AdamUpdate() = default;
  template <class O>
  explicit AdamUpdate(const O& o)
      : beta1(std::get<0>(o.betas())), beta2(std::get<1>(o.betas())), eps(o.eps()), amsgrad(o.amsgrad()) {}

  torch::Tensor direction(const torch::Tensor& g, ParamState& st) const {
    auto u = advance(g, st);  // the denominator, then the direction
    return at::div_out(u, st.buffers["exp_avg"], u).div_(bias_correction(beta1, st.step));
  }

  /// The whole step W ← W − lr·u, rounded as `torch::optim::Adam` rounds it:
  /// W.addcdiv_(m, √v̂/√(1−β₂ᵗ) + ε, −lr/(1−β₁ᵗ)). The optimizer uses it instead of
  /// `direction` where nothing else needs u (no error feedback).
  void apply(torch::Tensor& w, const torch::Tensor& g, double lr, ParamState& st) const {
    const auto denominator = advance(g, st);
    w.addcdiv_(st.buffers["exp_avg"], denominator, -lr / bias_correction(beta1, st.step));
  }

  /// A bound on |u| and on what `direction` computes on the way (g², the denominator) at step
  /// t for max|g| ≤ g, given the ranges of the state's buffers in `b`, which it replaces with
  /// ranges of the values `direction` writes: |m| ≤ β₁·max|m| + (1−β₁)·g,
  /// 0 ≤ v ≤ β₂·max v + (1−β₂)·g², and, as the denominator is at least ε,
  /// |u| ≤ |m| / (ε·(1−β₁ᵗ)). Infinite when nothing bounds it: ε = 0 (0/0 where m = v = 0) or
  /// a negative second moment (its square root).
  double direction_bound(double g, BufferExtents& b, int64_t step) const {
    constexpr double inf = std::numeric_limits<double>::infinity();
    if (!(eps > 0) || b.range("exp_avg_sq").first < 0 || (amsgrad && b.range("max_exp_avg_sq").first < 0)) return inf;
    const double m = beta1 * b.abs_max("exp_avg") + (1 - beta1) * g;
    const double v = beta2 * b.abs_max("exp_avg_sq") + (1 - beta2) * g * g;
    const double second = amsgrad ? std::max(v, b.abs_max("max_exp_avg_sq")) : v;
    b.ranges["exp_avg"] = {-m, m};
    b.ranges["exp_avg_sq"] = {0.0, v};
    if (amsgrad) b.ranges["max_exp_avg_sq"] = {0.0, second};
    const double bc1 = 1 - std::pow(beta1, static_cast<double>(step));
    const double bc2 = 1 - std::pow(beta2, static_cast<double>(step));
    const double denominator = std::sqrt(second) / std::sqrt(bc2) + eps;
    return std::max({g * g, denominator, m / eps / bc1});
  }

 private:
  static double bias_correction(double beta, int64_t step) { return 1 - std::pow(beta, static_cast<double>(step)); }

  // Advances the moments by g (m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², v_max with amsgrad) and
  // returns the denominator √v̂ / √(1−β₂ᵗ) + ε in a new tensor.
  torch::Tensor advance(const torch::Tensor& g, ParamState& st) const {
    auto& m = st.zeros_like("exp_avg", g);
    auto& v = st.zeros_like("exp_avg_sq", g);
    m.mul_(beta1).add_(g, 1 - beta1);
    v.mul_(beta2).addcmul_(g, g, 1 - beta2);
    torch::Tensor second = v;
    if (amsgrad) {
      auto& vmax = st.zeros_like("max_exp_avg_sq", g);
      torch::max_out(vmax, vmax, v);
      second = vmax;
    }
    return second.sqrt().div_(std::sqrt(bias_correction(beta2, st.step))).add_(eps);
  }
};

/// Adam rounded as mep's first benchmark tables were computed, u = (m / (√v̂/√(1−β₂ᵗ) + ε)) /
/// (1−β₁ᵗ), then W ← W − lr·u (a relative 1e-7 from torch's rounding per step): the update of
/// `mep::reference::Adam`, whose tables it reproduces bit for bit.
struct ReferenceAdamUpdate : AdamUpdate {
  static constexpr bool torch_rounding = false;
  using AdamUpdate::AdamUpdate;
};

/// AdamW: Adam's direction, decoupled weight decay (see the file's comment).
struct AdamWUpdate : AdamUpdate {
  static constexpr bool coupled_weight_decay = false;  // W ← W(1 − lr·λ) − lr·u
  using AdamUpdate::AdamUpdate;
};

}  // namespace mep
