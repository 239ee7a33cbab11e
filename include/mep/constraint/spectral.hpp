#pragma once
/// \file spectral.hpp
/// Spectral-norm constraint: after each update, every ≥2-D parameter W (viewed as
/// out × rest) is brought back to σ(W) ≤ γ by one of two rules (`spectral_mode`):
///
///  - scale (the reference's): estimate σ by `power_iter` power iterations from singular
///    vectors u, v persisted in the optimizer state (as in Miyato et al. 2018, "Spectral
///    Normalization for Generative Adversarial Networks", ICLR),
///      v ← Wᵀu / max(‖Wᵀu‖, ε);  u ← W·v / max(‖W·v‖, ε);  σ = |uᵀ·W·v|,  ε = 1e-6,
///    and rescale W ← W·γ/σ when σ > γ. Persisting u, v makes the estimate converge across
///    steps (three iterations from random vectors can underestimate σ by >10 %).
///  - clip: W ← U·min(Σ, γ)·Vᵀ for W = U·Σ·Vᵀ, the nearest matrix (in Frobenius norm)
///    with σ ≤ γ (Sedghi, Gupta & Long 2019, "The Singular Values of Convolutional
///    Layers", ICLR, clip a layer's singular values this way). Singular values at or
///    below γ and all singular vectors are kept; the scale rule shrinks every direction
///    by γ/σ instead. Computed from the Gram matrix of the shorter side,
///    A = W·Wᵀ = U·Σ²·Uᵀ (eigh in float64):
///      W ← W − U·diag(1 − min(1, γ/σ_k))·Uᵀ·W,
///    exact up to rounding, O(m²n + m³) for m ≤ n; no state.
///
/// Either way a matrix with σ ≤ γ is left bit-for-bit unchanged. The scale rule's decision
/// stays on the device (no sync); eigh checks its convergence on the host.
///
/// The bound serves the settling dynamics, ∂E/∂s_i = e_i − J_{i+1}ᵀ·e_{i+1}, whose
/// Jacobians hold W_2 … W_L. The input layer's W_1 never enters them (f_1(x) is fixed
/// while the states settle); `bound_input_layer(false)` leaves it free. The input layer
/// is the model's first Linear/Conv layer for an optimizer built from the model, else
/// the first parameter with two or more dimensions.

#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/update/matrix.hpp>

#include <utility>
#include <vector>

namespace mep {

enum class SpectralMode { Scale, Clip };

/// The names of the rules: in options set by name, in records, in messages and when printed
/// (options.hpp).
inline const std::vector<std::pair<SpectralMode, const char*>>& enum_names(SpectralMode) {
  static const std::vector<std::pair<SpectralMode, const char*>> names = {{SpectralMode::Scale, "scale"},
                                                                          {SpectralMode::Clip, "clip"}};
  return names;
}

struct SpectralConstraint {
  template <class Derived>
  struct Options {
    MEP_ARG(double, gamma, 0.95)
    MEP_ARG(SpectralMode, spectral_mode, SpectralMode::Scale)
    MEP_ARG(int64_t, power_iter, 3)
    MEP_ARG(bool, bound_input_layer, true)
    void validate() const {
      MEP_CHECK_OPTION(gamma_ > 0 && gamma_ <= 1, "gamma", gamma_, "a value in (0, 1]");
      MEP_CHECK_ENUM_OPTION(spectral_mode_, "spectral_mode");
      MEP_CHECK_OPTION(power_iter_ >= 1, "power_iter", power_iter_, "a value >= 1");
      MEP_CHECK_OPTION(power_iter_ == 3 || spectral_mode_ == SpectralMode::Scale, "power_iter", power_iter_,
                       "its default 3 with spectral_mode clip, which computes σ exactly");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("gamma", gamma_), v("spectral_mode", spectral_mode_), v("power_iter", power_iter_),
          v("bound_input_layer", bound_input_layer_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("gamma", "bound γ: after every update each parameter W of two or more dims is brought back to σ(W) ≤ γ");
      v("spectral_mode", "scale: W ← W·γ/σ when σ > γ, σ by power iteration; clip: W ← U·min(Σ, γ)·Vᵀ, exact");
      v("power_iter", "scale mode: power iterations per step for σ, from u, v kept in the optimizer state "
                      "(clip: stays 3)");
      v("bound_input_layer", "constrain the input layer's weight too (false: leave W_1, which settling never "
                             "sees, free)");
    }
  };

  double gamma = 0.95;
  SpectralMode mode = SpectralMode::Scale;
  int64_t power_iter = 3;
  bool bound_input_layer = true;

  SpectralConstraint() = default;
  template <class O>
  explicit SpectralConstraint(const O& o)
      : gamma(o.gamma()),
        mode(o.spectral_mode()),
        power_iter(o.power_iter()),
        bound_input_layer(o.bound_input_layer()) {}

  /// Returns the current estimate σ (a 0-d tensor on W's device) and updates u, v.
  torch::Tensor estimate(const torch::Tensor& w, ParamState& st) const {
    torch::NoGradGuard no_grad;
    auto m = as_matrix(w);
    if (!st.spectral_u.defined()) {
      // Random unit vectors from a fixed-seed CPU generator: deterministic, and the
      // user's global RNG stream is left alone.
      auto gen = at::detail::createCPUGenerator(0x5eed + m.size(0) * 131 + m.size(1));
      auto opts = torch::TensorOptions().dtype(m.scalar_type());
      auto u = at::randn({m.size(0)}, gen, opts);
      auto v = at::randn({m.size(1)}, gen, opts);
      st.spectral_u = (u / u.norm()).to(m.device());
      st.spectral_v = (v / v.norm()).to(m.device());
    }
    auto& u = st.spectral_u;
    auto& v = st.spectral_v;
    for (int64_t k = 0; k < power_iter; ++k) {
      auto wv = torch::mv(m.t(), u);
      v.copy_(wv / wv.norm().clamp_min(1e-6));
      auto wu = torch::mv(m, v);
      u.copy_(wu / wu.norm().clamp_min(1e-6));
    }
    return torch::dot(u, torch::mv(m, v)).abs();
  }

  /// `input_layer`: whether W is the input layer's weight (left free unless bound_input_layer).
  void enforce(torch::Tensor& w, ParamState& st, bool input_layer = false) const {
    if (!is_matrix(w) || (input_layer && !bound_input_layer)) return;
    torch::NoGradGuard no_grad;
    if (mode == SpectralMode::Clip) return clip(w);
    auto sigma = estimate(w, st);
    w.mul_((gamma / sigma).clamp_max_(1.0));  // exactly 1 when σ ≤ γ: W unchanged
  }

 private:
  // W ← W − U·diag(1 − min(1, γ/σ))·Uᵀ·W on the shorter side; the correction is exactly
  // zero when every σ ≤ γ.
  void clip(torch::Tensor& w) const {
    auto m = as_matrix(w);
    const bool wide = m.size(0) <= m.size(1);
    auto a = wide ? m : m.t();  // a is k × n with k ≤ n; a view of w's storage
    auto [lambda, u] = torch::linalg_eigh(torch::mm(a, a.t()).to(torch::kFloat64));
    auto shrink = 1.0 - (gamma / lambda.clamp_min(0.0).sqrt()).clamp_max(1.0);  // 0 where σ ≤ γ (σ = 0: γ/0 = inf)
    auto correction = torch::mm(u * shrink, u.t()).to(m.scalar_type());
    auto updated = m - (wide ? torch::mm(correction, m) : torch::mm(m, correction));
    w.copy_(updated.view(w.sizes()));
  }
};

}  // namespace mep
