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
#include <vector>

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
    template <class V>
    static void visit_option_docs(V&& v) {
      v("betas", "(β₁, β₂) of the moments m ← β₁·m + (1 − β₁)·g and v ← β₂·v + (1 − β₂)·g²");
      v("eps", "ε of u = (m / (1 − β₁ᵗ)) / (√v / √(1 − β₂ᵗ) + ε)");
      v("amsgrad", "use max(v_max, v) for v, as torch::optim::Adam's amsgrad");
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
    std::vector<torch::Tensor> g1{g}, denominator;
    std::vector<ParamState*> st1{&st};
    advance(g1, st1, denominator);
    auto& u = denominator[0];
    return at::div_out(u, st.exp_avg, u).div_(bias_correction(beta1, st.step));
  }

  /// The whole step W ← W − lr·u of every tensor of a group, as multi-tensor operations,
  /// rounded as `torch::optim::Adam` rounds it: W.addcdiv_(m, √v̂/√(1−β₂ᵗ) + ε, −lr/(1−β₁ᵗ)).
  /// The optimizer uses it instead of `direction` where nothing else needs u (no error
  /// feedback).
  void apply(const std::vector<torch::Tensor>& w, const std::vector<torch::Tensor>& g, double lr,
             const std::vector<ParamState*>& st) const {
    std::vector<torch::Tensor> denominator, m;
    advance(g, st, denominator);
    std::vector<c10::Scalar> step_size;
    for (auto* s : st) m.push_back(s->exp_avg), step_size.emplace_back(-lr / bias_correction(beta1, s->step));
    at::_foreach_addcdiv_(w, m, denominator, step_size);
  }

 private:
  static double bias_correction(double beta, int64_t step) { return 1 - std::pow(beta, static_cast<double>(step)); }

  // Advances the moments of every tensor by its g (m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g²,
  // v_max with amsgrad) and puts the denominators √v̂ / √(1−β₂ᵗ) + ε in `denominator`.
  void advance(const std::vector<torch::Tensor>& g, const std::vector<ParamState*>& st,
               std::vector<torch::Tensor>& denominator) const {
    std::vector<torch::Tensor> m, v;
    std::vector<c10::Scalar> root_bc2;
    for (size_t i = 0; i < g.size(); ++i) {
      m.push_back(ParamState::zeros_like(st[i]->exp_avg, g[i]));
      v.push_back(ParamState::zeros_like(st[i]->exp_avg_sq, g[i]));
      root_bc2.emplace_back(std::sqrt(bias_correction(beta2, st[i]->step)));
    }
    at::_foreach_mul_(m, beta1);
    at::_foreach_add_(m, g, 1 - beta1);
    at::_foreach_mul_(v, beta2);
    at::_foreach_addcmul_(v, g, g, 1 - beta2);
    if (amsgrad) {  // tensor by tensor: LibTorch 1.13 has no in-place _foreach_maximum_
      for (size_t i = 0; i < g.size(); ++i) {
        auto& vmax = ParamState::zeros_like(st[i]->max_exp_avg_sq, g[i]);
        at::maximum_out(vmax, vmax, v[i]);
        v[i] = vmax;
      }
    }
    denominator = at::_foreach_sqrt(v);
    at::_foreach_div_(denominator, root_bc2);
    at::_foreach_add_(denominator, eps);
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
