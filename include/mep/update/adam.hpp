#pragma once
/// \file adam.hpp
/// Adam (Kingma & Ba 2015, arXiv:1412.6980), written to match `torch::optim::Adam`:
///   g ← g + λW (coupled weight decay);  m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²
///   u = (m / (1−β₁ᵗ)) / (√v / √(1−β₂ᵗ) + ε)   (v ← max(v_max, v) with amsgrad)
/// Adam carries its own moments: the optimizer's momentum option is not used.

#include <mep/options.hpp>
#include <mep/state.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mep {

struct AdamUpdate {
  template <class Derived>
  struct Options {
    MEP_ARG(double, beta1, 0.9)
    MEP_ARG(double, beta2, 0.999)
    MEP_ARG(double, eps, 1e-8)
    MEP_ARG(bool, amsgrad, false)
    void validate() const {
      MEP_CHECK_OPTION(beta1_ >= 0 && beta1_ < 1, "beta1", beta1_, "a value in [0, 1)");
      MEP_CHECK_OPTION(beta2_ >= 0 && beta2_ < 1, "beta2", beta2_, "a value in [0, 1)");
      MEP_CHECK_OPTION(eps_ >= 0 && std::isfinite(eps_), "eps", eps_, "a finite value >= 0");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("beta1", beta1_), v("beta2", beta2_), v("eps", eps_), v("amsgrad", amsgrad_);
    }
  };

  static constexpr bool coupled_weight_decay = true;
  static constexpr bool owns_momentum = true;

  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool amsgrad = false;

  AdamUpdate() = default;
  template <class O>
  explicit AdamUpdate(const O& o) : beta1(o.beta1()), beta2(o.beta2()), eps(o.eps()), amsgrad(o.amsgrad()) {}

  torch::Tensor direction(const torch::Tensor& g, ParamState& st) const {
    auto& m = st.zeros_like("exp_avg", g);
    auto& v = st.zeros_like("exp_avg_sq", g);
    m.mul_(beta1).add_(g, 1 - beta1);
    v.mul_(beta2).addcmul_(g, g, 1 - beta2);
    const double bc1 = 1 - std::pow(beta1, static_cast<double>(st.step));
    const double bc2 = 1 - std::pow(beta2, static_cast<double>(st.step));
    torch::Tensor second = v;
    if (amsgrad) {
      auto& vmax = st.zeros_like("max_exp_avg_sq", g);
      torch::max_out(vmax, vmax, v);
      second = vmax;
    }
    auto u = second.sqrt().div_(std::sqrt(bc2)).add_(eps);  // the denominator, then the direction
    return at::div_out(u, m, u).div_(bc1);
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
};

}  // namespace mep
