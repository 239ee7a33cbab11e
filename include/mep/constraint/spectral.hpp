#pragma once
/// \file spectral.hpp
/// Spectral-norm constraint (SPEC §6). After each update, for every ≥2-D parameter W
/// (viewed as out × rest), estimate σ(W) by `power_iter` power iterations from singular
/// vectors u, v persisted in the optimizer state:
///   v ← Wᵀu / max(‖Wᵀu‖, ε);  u ← W·v / max(‖W·v‖, ε);  σ = |uᵀ·W·v|,  ε = 1e-6
/// and rescale W ← W·γ/σ when σ > γ. Persisting u, v makes the estimate converge across
/// steps (three iterations from random vectors can underestimate σ by >10 %). A matrix
/// with σ ≤ γ is left bit-for-bit unchanged. The decision stays on the device (no sync).

#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/update/matrix.hpp>

namespace mep {

struct SpectralConstraint {
  template <class Derived>
  struct Options {
    MEP_ARG(double, gamma, 0.95)
    MEP_ARG(int64_t, power_iter, 3)
    void validate() const {
      MEP_CHECK_OPTION(gamma_ > 0 && gamma_ <= 1, "gamma", gamma_, "a value in (0, 1]");
      MEP_CHECK_OPTION(power_iter_ >= 1, "power_iter", power_iter_, "a value >= 1");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("gamma", gamma_), v("power_iter", power_iter_);
    }
  };

  double gamma = 0.95;
  int64_t power_iter = 3;

  SpectralConstraint() = default;
  template <class O>
  explicit SpectralConstraint(const O& o) : gamma(o.gamma()), power_iter(o.power_iter()) {}

  /// Returns the current estimate σ (a 0-d tensor on W's device) and updates u, v.
  torch::Tensor estimate(const torch::Tensor& w, ParamState& st) const {
    torch::NoGradGuard no_grad;
    auto m = as_matrix(w);
    if (!st.has("spectral_u")) {
      // Random unit vectors from a fixed-seed CPU generator: deterministic, and the
      // user's global RNG stream is left alone.
      auto gen = at::detail::createCPUGenerator(0x5eed + m.size(0) * 131 + m.size(1));
      auto opts = torch::TensorOptions().dtype(m.scalar_type());
      auto u = at::randn({m.size(0)}, gen, opts);
      auto v = at::randn({m.size(1)}, gen, opts);
      st.set("spectral_u", (u / u.norm()).to(m.device()));
      st.set("spectral_v", (v / v.norm()).to(m.device()));
    }
    auto& u = st.buffers["spectral_u"];
    auto& v = st.buffers["spectral_v"];
    for (int64_t k = 0; k < power_iter; ++k) {
      auto wv = torch::mv(m.t(), u);
      v.copy_(wv / wv.norm().clamp_min(1e-6));
      auto wu = torch::mv(m, v);
      u.copy_(wu / wu.norm().clamp_min(1e-6));
    }
    return torch::dot(u, torch::mv(m, v)).abs();
  }

  void enforce(torch::Tensor& w, ParamState& st) const {
    if (!is_matrix(w)) return;
    torch::NoGradGuard no_grad;
    auto sigma = estimate(w, st);
    w.mul_((gamma / sigma).clamp_max_(1.0));  // exactly 1 when σ ≤ γ: W unchanged
  }
};

}  // namespace mep
