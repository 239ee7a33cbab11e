#pragma once
/// \file layer_sweep.hpp
/// Layer-sweep settling: block-coordinate descent on the energy, one layer at a time from
/// the output down (Gauss–Seidel order), each layer using its neighbours' latest states:
///
///   s_L ← s_L − η·∂E/∂s_L / (1 + 2β)         (MSE nudging: with η = 1 the exact minimiser
///                                              (f_L + 2β·y)/(1 + 2β) of the last layer's energy)
///   s_l ← s_l − η·ρ_l·(ε_l − J_{l+1}ᵀ·ε_{l+1})    for l = L−1, …, 1   (η = settle_lr; η = 1 gives
///                                              the fixed-point form s_l = f_l + J_{l+1}ᵀ·ε_{l+1})
///   ρ_l = min(1, 1/σ_{l+1}²),  σ_{l+1} ≈ ‖J_{l+1}‖₂ (ep/segment.hpp)
///
/// σ_{l+1} is a bound from the weight's norm (kPowerIterations power iterations on W) and
/// the ops' bounds; for a segment with a module run through its forward (ep/autograd_module.hpp)
/// it comes from kAutogradPowerIterations power iterations on JᵀJ through autograd, about
/// 2·4 + 3 = 11 passes through the segment per phase, against 2 (one forward, one VJP) per sweep.
///
/// Near the equilibrium the energy in s_l has Hessian I + J_{l+1}ᵀJ_{l+1}, so the plain step
/// (ρ = 1) multiplies the error by J_{l+1}ᵀJ_{l+1}: it contracts only while ‖J_{l+1}‖ < 1.
/// ρ keeps it contracting (by max(1 − 1/σ², 1/σ²)) for larger weights, as an unconstrained
/// EqProp reaches in long runs, and is exactly 1 below: spectrally constrained weights
/// (γ < 1) settle as with the plain step.
///
/// (the last layer takes a plain step of η for cross-entropy nudging or ops after it).
/// Asynchronous, layer-wise updates of the same fixed point as gradient descent: Scellier et
/// al. 2023, "Energy-based learning algorithms for analog computing", report 13.5× faster
/// training from them. One sweep costs one forward and one VJP per segment, as one heavy-ball
/// step, but moves information through every layer in one pass; its first sweep, from the
/// feedforward states, needs no forward. settle_steps counts sweeps; adaptive mode undoes a
/// sweep that raised the energy and halves η, as HeavyBall does.

#include <mep/ep/settling.hpp>

namespace mep {

struct LayerSweepDefaults {
  static constexpr int64_t steps = 2;
  static constexpr double lr = 1.0;
  static constexpr double tol = 0.0;
  static constexpr int64_t patience = 1;
  static constexpr bool adaptive = false;
};

struct LayerSweep : SettlingPolicy<LayerSweepDefaults> {
  static constexpr double kShrink = 0.5;         // adaptive: η after a rejected sweep
  static constexpr int64_t kPowerIterations = 8;  // for σ_{l+1}: ‖W‖₂ of the weights
  static constexpr int64_t kAutogradPowerIterations = 4;  // for σ_{l+1} of a segment run through autograd

  using SettlingPolicy<LayerSweepDefaults>::SettlingPolicy;

  PhaseReport settle(States& e, double beta) const {
    torch::NoGradGuard no_grad;
    const SettleConfig& c = config;
    e.start();
    detail::StopRule rule(c, e.s()[0]);
    // ρ_l from the weights and the feedforward point, once per phase.
    std::vector<torch::Tensor> rho(e.size());
    for (size_t l = 0; l + 1 < e.size(); ++l) {
      const int64_t iters = e.autograd_jacobian(l + 1) ? kAutogradPowerIterations : kPowerIterations;
      auto sigma = e.jacobian_norm(l + 1, iters);
      rho[l] = sigma.mul(sigma).reciprocal_().clamp_max_(1.0);  // square() is σ·σ, without its dtype checks
    }
    std::vector<torch::Tensor> none;
    auto& saved = c.adaptive ? e.scratch(&Scratch::saved_states) : none;  // the states before a sweep
    double lr = c.lr, energy = 0;
    PhaseReport r;
    int64_t k = 0;
    bool converged = false;
    for (k = 1; k <= c.steps; ++k) {
      if (k > 1 || !e.at_feedforward()) e.forward();
      // The energy of the states after k − 1 sweeps, where the rule (or adaptive mode) reads it.
      if (k == 1 && rule.watching()) {
        e.errors(beta);
        energy = e.mean(beta);
        if (!detail::finite_energy(energy, 0, r)) break;
      } else if (k > 1 && (rule.check_at(k - 1, c.steps) || c.adaptive)) {
        e.errors(beta);
        const double next = e.mean(beta);
        if (!detail::finite_energy(next, k - 1, r)) break;
        if (c.adaptive && next > energy) {
          undo(e, saved);
          lr *= kShrink;
          rule.reset_calm();
        } else {
          const double previous = energy;
          energy = next;
          if (rule.met(previous, next)) {
            converged = true;
            break;
          }
        }
      }
      if (c.adaptive)
        for (size_t l = 0; l < e.size(); ++l) saved[l].copy_(e.s()[l]);
      sweep(e, beta, lr, rho);
    }
    const bool diverged = r.diverged_step >= 0;
    const int64_t taken = converged || diverged ? k - 1 : c.steps;
    e.evaluate(beta);
    if (!converged && !diverged && rule.watching()) {  // the last sweep, judged like the others
      const double next = e.mean(beta);
      if (!detail::finite_energy(next, taken, r)) return detail::finish(e, beta, taken, false, r);
      if (c.adaptive && next > energy) {
        undo(e, saved);
        e.evaluate(beta);
      } else {
        converged = rule.met(energy, next);
      }
    }
    return detail::finish(e, beta, taken, converged, r);
  }

 private:
  static void undo(States& e, const std::vector<torch::Tensor>& saved) {
    for (size_t l = 0; l < e.size(); ++l) e.s()[l].copy_(saved[l]);
    e.forward();
  }

  // One top-down sweep; the segments' predictions describe the current states on entry.
  static void sweep(States& e, double beta, double lr, const std::vector<torch::Tensor>& rho) {
    const size_t L = e.size();
    const double curvature = e.last_curvature(beta);
    e.s()[L - 1].sub_(e.layer_gradient(L - 1, beta), curvature > 0 ? lr / curvature : lr);
    for (size_t l = L - 1; l-- > 0;) e.s()[l].addcmul_(e.layer_gradient(l, beta), rho[l], -lr);
  }
};

}  // namespace mep
