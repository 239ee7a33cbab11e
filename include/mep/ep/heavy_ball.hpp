#pragma once
/// \file heavy_ball.hpp
/// Heavy-ball settling, the reference's rule: gradient descent on the per-sample
/// energy with momentum,
///
///   v ← μ·v + ∂E_b/∂s ;   s ← s − settle_lr·v,     μ = kMomentum = 0.5,
///
/// for at most settle_steps steps (ep/settling.hpp). Adaptive mode undoes a step
/// that raises the batch energy and multiplies settle_lr by kShrink = 0.5, and multiplies it
/// by kGrow = 1.1 after an accepted step, up to kMaxLrFactor = 10 times its initial value
/// (Polyak 1964 for the momentum; the step control is the reference's). With check_every = 1
/// (automatic on the CPU) the decisions are taken on the host after every step, exactly as the
/// reference did; with check_every > 1 (automatic on a GPU) on the device. Each step costs one
/// forward and one VJP per segment. Its defaults are the reference's: 10 steps of 0.05,
/// adaptive, tol 1e-5, patience 3 — which stop short of the equilibrium on deeper models
/// (README, "Settling").

#include <mep/ep/settling.hpp>

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

  PhaseReport settle(States& e, double beta) const {
    torch::NoGradGuard no_grad;
    const size_t L = e.size();
    const SettleConfig& c = config;
    e.start();
    auto& s = e.s();
    auto& g = e.dE_ds();
    auto& v = e.scratch(&Scratch::velocity);
    for (auto& t : v) t.zero_();
    e.evaluate(beta);
    detail::StopRule rule(c, s[0]);
    if (c.adaptive && rule.every() > 1) return settle_on_device(e, beta, v, rule);
    double lr = c.lr, energy = 0;
    PhaseReport r;
    if (rule.watching()) {
      energy = e.mean(beta);
      if (!detail::finite_energy(energy, 0, r)) return detail::finish(e, beta, 0, false, r);
    }
    int64_t k = 0;
    bool rejected = false, converged = false;
    for (k = 1; k <= c.steps; ++k) {
      if (c.adaptive) save(e, v);
      for (size_t l = 0; l < L; ++l) {
        at::add_out(v[l], g[l], v[l], kMomentum);  // v ← μ·v + g without a scalar tensor
        s[l].sub_(v[l], lr);
      }
      e.evaluate(beta);
      if (!rule.check_at(k, c.steps)) continue;
      const double next = e.mean(beta);
      if (!detail::finite_energy(next, k, r)) break;
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
    if (rejected && r.diverged_step < 0) e.evaluate(beta);  // describe the accepted states
    const int64_t taken = std::min(k, c.steps);
    return detail::finish(e, beta, taken, converged, r);
  }

  // Adaptive mode with the decisions taken on the device: a step is undone and the step size
  // adapted with tensor operations, and the host reads the energy and the stopping rule's
  // count only every check_every steps (settling then stops at the first check after the rule
  // was met). The same rule as the host path above, which reads the energy after every step.
  PhaseReport settle_on_device(States& e, double beta, std::vector<torch::Tensor>& v, detail::StopRule& rule) const {
    const SettleConfig& c = config;
    const size_t L = e.size();
    auto& s = e.s();
    auto& g = e.dE_ds();
    const auto scalar = [&](double value) { return torch::full({}, value, s[0].options().dtype(torch::kDouble)); };
    auto lr = scalar(c.lr), shrink = scalar(kShrink), grow = scalar(kGrow), factor = scalar(1), calm = scalar(0);
    auto energy = scalar(0), next = scalar(0), change = scalar(0), bound = scalar(0);
    auto rejected = torch::zeros({}, s[0].options().dtype(torch::kBool)), accepted = torch::zeros_like(rejected);
    auto small = torch::zeros_like(rejected);
    auto lr_state = torch::zeros({}, s[0].options());  // lr in the states' dtype (no cast inside the products)
    auto pair = torch::zeros({2}, energy.options()), host = torch::zeros({2}, torch::kDouble);  // what a check reads
    auto& step = e.scratch(&Scratch::step);
    auto &s0 = e.scratch(&Scratch::saved_states), &v0 = e.scratch(&Scratch::saved_velocity);
    auto& g0 = e.scratch(&Scratch::saved_gradients);
    energy.copy_(e.total(beta));
    PhaseReport r;
    int64_t k = 0;
    bool converged = false;
    for (k = 1; k <= c.steps; ++k) {
      save(e, v);
      lr_state.copy_(lr);
      for (size_t l = 0; l < L; ++l) {
        at::add_out(v[l], g[l], v[l], kMomentum);
        at::mul_out(step[l], v[l], lr_state);
        s[l].sub_(step[l]);
      }
      e.evaluate(beta);
      next.copy_(e.total(beta));
      at::gt_out(rejected, next, energy);  // a NaN energy is accepted, and caught at the next check
      at::logical_not_out(accepted, rejected);
      for (size_t l = 0; l < L; ++l) {
        at::where_out(s[l], rejected, s0[l], s[l]);
        at::where_out(v[l], rejected, v0[l], v[l]);
        at::where_out(g[l], rejected, g0[l], g[l]);
      }
      at::where_out(factor, rejected, shrink, grow);
      lr.mul_(factor).clamp_max_(kMaxLrFactor * c.lr);
      if (c.tol > 0) {  // calm ← calm + 1 after an accepted step with |ΔE| < tol·max(1, |E|), else 0
        at::sub_out(change, next, energy).abs_();
        at::abs_out(bound, energy).clamp_min_(static_cast<double>(e.batch())).mul_(c.tol);
        at::lt_out(small, change, bound).logical_and_(accepted);
        calm.add_(1).mul_(small);
      }
      at::where_out(energy, rejected, energy, next);
      if (!rule.check_at(k, c.steps)) continue;
      pair.select(0, 0).copy_(energy), pair.select(0, 1).copy_(calm);
      host.copy_(pair);
      const double* read = host.data_ptr<double>();
      if (!detail::finite_energy(read[0], k, r)) break;
      if (read[1] >= static_cast<double>(c.patience)) {
        converged = true;
        break;
      }
    }
    e.evaluate(beta);  // describe the accepted states
    const int64_t taken = std::min(k, c.steps);
    return detail::finish(e, beta, taken, converged, r);
  }

 private:
  static void save(States& e, const std::vector<torch::Tensor>& v) {
    auto &s0 = e.scratch(&Scratch::saved_states), &v0 = e.scratch(&Scratch::saved_velocity);
    auto& g0 = e.scratch(&Scratch::saved_gradients);
    for (size_t l = 0; l < e.size(); ++l) s0[l].copy_(e.s()[l]), v0[l].copy_(v[l]), g0[l].copy_(e.dE_ds()[l]);
  }
  static void restore(States& e, std::vector<torch::Tensor>& v) {
    auto &s0 = e.scratch(&Scratch::saved_states), &v0 = e.scratch(&Scratch::saved_velocity);
    auto& g0 = e.scratch(&Scratch::saved_gradients);
    for (size_t l = 0; l < e.size(); ++l) e.s()[l].copy_(s0[l]), v[l].copy_(v0[l]), e.dE_ds()[l].copy_(g0[l]);
  }
};

}  // namespace mep
