#pragma once
/// \file error_feedback.hpp
/// Error feedback (SPEC §6; Seide et al. 2014, Karimireddy et al. 2019): what the update
/// policy dropped is carried into the next step.
///   g_aug = g + β_ef·e;   u = update(g_aug);   e ← clamp(β_ef·e + (g_aug − u), ±2·max_grad_norm)
/// Off unless `error_feedback(true)`: with Newton-Schulz it collapses EP classification
/// (seed report), so presets keep it available but disabled. Two causes: the buffer is
/// counted twice (g_aug already holds β_ef·e, and e ← β_ef·e + g_aug − u adds it again, so
/// e grows like (2β_ef)ᵗ = 1.8ᵗ until the clamp), and an orthogonalised u has unit singular
/// values whatever the size of g, so g_aug − u ≈ −u pushes against the update.
/// `error_projected(true)` is the corrected rule (standard error feedback, Karimireddy et
/// al. 2019, with the residual taken against u at g_aug's scale):
///   e ← clamp(g_aug − (⟨g_aug, u⟩ / ‖u‖²)·u, ±2·max_grad_norm)
/// For Newton-Schulz that is the spectrum's deviation from its mean, for Dion the part of
/// g_aug outside the low-rank update. The README measures both rules.

#include <mep/options.hpp>

#include <cmath>
#include <mep/state.hpp>

namespace mep {

struct ErrorFeedback {
  template <class Derived>
  struct Options {
    MEP_ARG(bool, error_feedback, false)
    MEP_ARG(double, error_beta, 0.9)
    MEP_ARG(double, max_grad_norm, 10.0)
    MEP_ARG(bool, error_projected, false)
    void validate() const {
      MEP_CHECK_OPTION(error_beta_ >= 0 && error_beta_ < 1, "error_beta", error_beta_, "a value in [0, 1)");
      MEP_CHECK_OPTION(max_grad_norm_ > 0 && std::isfinite(max_grad_norm_), "max_grad_norm", max_grad_norm_,
                       "a finite value > 0");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("error_feedback", error_feedback_), v("error_beta", error_beta_), v("max_grad_norm", max_grad_norm_);
      v("error_projected", error_projected_);
    }
  };

  bool enabled = false;
  double beta = 0.9;
  double max_grad_norm = 10.0;
  bool projected = false;

  ErrorFeedback() = default;
  template <class O>
  explicit ErrorFeedback(const O& o)
      : enabled(o.error_feedback()),
        beta(o.error_beta()),
        max_grad_norm(o.max_grad_norm()),
        projected(o.error_projected()) {}

  /// Whether g_aug can differ from g (the clamp makes the rule nonlinear in g: data
  /// parallelism then averages whole gradients).
  bool active() const { return enabled; }

  torch::Tensor accumulate(const torch::Tensor& g, ParamState& st) const {
    if (!enabled || !st.has("error_feedback")) return g;
    return g + beta * st.buffers["error_feedback"];
  }
  void remember(const torch::Tensor& g_aug, const torch::Tensor& u, ParamState& st) const {
    if (!enabled) return;
    auto& e = st.zeros_like("error_feedback", g_aug);
    if (projected) {
      auto scale = (g_aug * u).sum() / (u * u).sum().clamp_min(1e-30);  // stays on the device
      e.copy_(g_aug).sub_(u * scale);
    } else {
      e.mul_(beta).add_(g_aug).sub_(u);
    }
    e.clamp_(-2 * max_grad_norm, 2 * max_grad_norm);
  }
};

}  // namespace mep
