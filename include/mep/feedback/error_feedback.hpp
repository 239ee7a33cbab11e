#pragma once
/// \file error_feedback.hpp
/// Error feedback (Seide et al. 2014, "1-Bit Stochastic Gradient Descent and its Application
/// to Data-Parallel Distributed Training of Speech DNNs"; Karimireddy et al. 2019, "Error
/// Feedback Fixes SignSGD and other Gradient Compression Schemes"): what the update policy's
/// direction u leaves out of the gradient is carried into the next step. With the buffer e
/// (zeros at first) and β_ef = error_beta:
///
///   g_aug = g + β_ef·e;   u = update(g_aug)
///
/// then e is updated by one of two rules (`error_rule`), and clamped to ±2·max_grad_norm:
///
///  - Projected (the default): e ← g_aug − (⟨g_aug, u⟩ / ‖u‖²)·u
///    Karimireddy et al.'s e ← p − C(p) for p = g_aug, with C(p) the multiple of u closest
///    to p: the residual is taken at g_aug's scale, whatever the scale of u. For Newton-Schulz
///    it is the spectrum's deviation from its mean, for Dion the part of g_aug outside the
///    low-rank update.
///  - Reference (the reference implementation's rule): e ← β_ef·e + (g_aug − u)
///    This counts β_ef·e twice (g_aug already holds it), so for a constant residual e grows
///    like (2β_ef)ᵗ until the clamp; and it takes the residual against u itself, whose scale
///    is the update policy's (unit singular values after Newton-Schulz), not g_aug's.
///
/// Off unless `error_feedback(true)`. The README's "Departures from the reference" measures
/// both rules.

#include <mep/options.hpp>
#include <mep/state.hpp>

#include <cmath>
#include <utility>
#include <vector>

namespace mep {

/// The error-feedback rule (see the file's comment).
enum class ErrorRule { Projected, Reference };

/// The names of the rules: in options set by name, in records, in messages and when printed
/// (options.hpp).
inline const std::vector<std::pair<ErrorRule, const char*>>& enum_names(ErrorRule) {
  static const std::vector<std::pair<ErrorRule, const char*>> names = {{ErrorRule::Projected, "projected"},
                                                                       {ErrorRule::Reference, "reference"}};
  return names;
}

struct ErrorFeedback {
  template <class Derived>
  struct Options {
    MEP_ARG(bool, error_feedback, false)
    MEP_ARG(double, error_beta, 0.9)
    MEP_ARG(double, max_grad_norm, 10.0)
    MEP_ARG(ErrorRule, error_rule, ErrorRule::Projected)
    void validate() const {
      MEP_CHECK_OPTION(error_beta_ >= 0 && error_beta_ < 1, "error_beta", error_beta_, "a value in [0, 1)");
      MEP_CHECK_OPTION(max_grad_norm_ > 0 && std::isfinite(max_grad_norm_), "max_grad_norm", max_grad_norm_,
                       "a finite value > 0");
      MEP_CHECK_ENUM_OPTION(error_rule_, "error_rule");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("error_feedback", error_feedback_), v("error_beta", error_beta_), v("max_grad_norm", max_grad_norm_);
      v("error_rule", error_rule_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("error_feedback", "carry what the update leaves out of the gradient into the next step: g_aug = g + β_ef·e, "
                          "u = update(g_aug)");
      v("error_beta", "β_ef of g_aug = g + β_ef·e");
      v("max_grad_norm", "the error buffer e is clamped to ±2·max_grad_norm");
      v("error_rule", "projected: e ← g_aug − (⟨g_aug, u⟩ / ‖u‖²)·u; reference: e ← β_ef·e + (g_aug − u)");
    }
  };

  bool enabled = false;
  double beta = 0.9;
  double max_grad_norm = 10.0;
  ErrorRule rule = ErrorRule::Projected;

  ErrorFeedback() = default;
  template <class O>
  explicit ErrorFeedback(const O& o)
      : enabled(o.error_feedback()), beta(o.error_beta()), max_grad_norm(o.max_grad_norm()), rule(o.error_rule()) {}

  /// Whether g_aug can differ from g (the clamp makes the rule nonlinear in g: data
  /// parallelism then averages whole gradients).
  bool active() const { return enabled; }

  torch::Tensor accumulate(const torch::Tensor& g, ParamState& st) const {
    if (!enabled || !st.error_feedback.defined()) return g;
    return g + beta * st.error_feedback;
  }
  void remember(const torch::Tensor& g_aug, const torch::Tensor& u, ParamState& st) const {
    if (!enabled) return;
    auto& e = ParamState::zeros_like(st.error_feedback, g_aug);
    if (rule == ErrorRule::Projected) {
      auto scale = (g_aug * u).sum() / (u * u).sum().clamp_min(1e-30);  // stays on the device
      e.copy_(g_aug).sub_(u * scale);
    } else {
      e.mul_(beta).add_(g_aug).sub_(u);
    }
    e.clamp_(-2 * max_grad_norm, 2 * max_grad_norm);
  }
};

}  // namespace mep
