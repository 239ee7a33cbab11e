#pragma once
/// \file heavy_ball.hpp
/// Heavy-ball settling, the reference's rule (SPEC §3): gradient descent on the per-sample
/// energy with momentum,
///
///   v ← μ·v + ∂E_b/∂s ;   s ← s − settle_lr·v,     μ = kMomentum = 0.5,
///
/// for at most settle_steps steps (settle.hpp's stopping rule). Adaptive mode undoes a step
/// that raises the batch energy and multiplies settle_lr by kShrink = 0.5, and multiplies it
/// by kGrow = 1.1 after an accepted step, up to kMaxLrFactor = 10 times its initial value
/// (Polyak 1964 for the momentum; the step control is the reference's). Each step costs one
/// forward and one VJP per segment. Its defaults are the reference's: 10 steps of 0.05,
/// adaptive, tol 1e-5, patience 3 — which stop short of the equilibrium on deeper models
/// (README, "Settling").

#include <mep/settle.hpp>

namespace mep {

struct HeavyBallDefaults {
  static constexpr int64_t steps = 10;
  static constexpr double lr = 0.05;
  static constexpr double tol = 1e-5;
  static constexpr int64_t patience = 3;
  static constexpr bool adaptive = true;
};

struct HeavyBall : SettlingPolicy<HeavyBallDefaults> {
  static constexpr double kMomentum = 0.5;
  static constexpr double kShrink = 0.5;
  static constexpr double kGrow = 1.1;
  static constexpr double kMaxLrFactor = 10.0;

  using SettlingPolicy<HeavyBallDefaults>::SettlingPolicy;

  PhaseReport settle(Energy& e, double beta) const {
    torch::NoGradGuard no_grad;
    const size_t L = e.size();
    const SettleConfig& c = config;
    e.start();
    auto& v = e.scratch(0);
    for (auto& t : v) t.zero_();
    e.evaluate(beta);
    detail::StopRule rule(c, e.s[0]);
    double lr = c.lr, energy = 0;
    if (rule.watching()) {
      energy = e.mean(beta);
      detail::check_finite_energy(energy, 0, beta);
    }
    int64_t k = 0;
    bool rejected = false, converged = false;
    for (k = 1; k <= c.steps; ++k) {
      if (c.adaptive) save(e, v);
      for (size_t l = 0; l < L; ++l) {
        at::add_out(v[l], e.g[l], v[l], kMomentum);  // v ← μ·v + g without a scalar tensor
        e.s[l].sub_(v[l], lr);
      }
      e.evaluate(beta);
      if (!rule.check_at(k, c.steps)) continue;
      const double next = e.mean(beta);
      detail::check_finite_energy(next, k, beta);
      rejected = c.adaptive && next > energy;
      if (rejected) {
        restore(e, v);
        lr *= kShrink;
        rule.reset_calm();
        continue;
      }
      if (c.adaptive) lr = std::min(lr * kGrow, kMaxLrFactor * c.lr);
      const double previous = energy;
      energy = next;
      if (rule.met(previous, next)) {
        converged = true;
        break;
      }
    }
    if (rejected) e.evaluate(beta);  // describe the accepted states
    const int64_t taken = std::min(k, c.steps);
    return detail::finish(e, beta, taken, converged, taken);
  }

 private:
  static void save(Energy& e, const std::vector<torch::Tensor>& v) {
    auto &s0 = e.scratch(1), &v0 = e.scratch(2), &g0 = e.scratch(3);
    for (size_t l = 0; l < e.size(); ++l) s0[l].copy_(e.s[l]), v0[l].copy_(v[l]), g0[l].copy_(e.g[l]);
  }
  static void restore(Energy& e, std::vector<torch::Tensor>& v) {
    auto &s0 = e.scratch(1), &v0 = e.scratch(2), &g0 = e.scratch(3);
    for (size_t l = 0; l < e.size(); ++l) e.s[l].copy_(s0[l]), v[l].copy_(v0[l]), e.g[l].copy_(g0[l]);
  }
};

}  // namespace mep
