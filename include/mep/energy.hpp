#pragma once
/// \file energy.hpp
/// The EP energy of SPEC §2, per sample b:
///
///   E_b(s; θ, β) = Σ_{i<L} ½‖s_i − f_i‖²  +  E_L(s_L, f_L)  +  β·C(ŷ, y),   f_i = f_i(a_{i−1}(s_{i−1}))
///
///   MSE nudging:  E_L = ½‖s_L − f_L‖²,  C = ‖ŷ − y‖² (one-hot y; no ½, the reference's convention)
///   CE nudging:   E_L = KL(softmax(f_L/T) ‖ softmax(s_L/T)),  C = CE(ŷ, ỹ), ỹ = (1−ε)·y + ε/K, ε = 0.1
///
/// Each internal term is described by δ_i = ∂E_i/∂s_i and ε_i = −∂E_i/∂f_i (both s_i − f_i
/// for the squared error): ∂E/∂s_i = δ_i − J_{i+1}ᵀ·ε_{i+1} (+ β·∂C/∂s_L), and the weight
/// gradient is ∂E/∂θ_i = −(∂f_i/∂θ_i)ᵀ·ε_i. At the feedforward states every ε_i is 0.

#include <mep/loss.hpp>

namespace mep {

/// How the output is nudged towards the target.
struct Nudging {
  Loss loss = Loss::MSE;
  double label_smoothing = 0.1;  // cross-entropy only
  double temperature = 1.0;      // softmax temperature of the KL last-layer term

  /// The dense target the cost compares with: one-hot (MSE) or smoothed distribution (CE).
  torch::Tensor dense(const torch::Tensor& target, const torch::Tensor& like) const {
    auto y = dense_target(target, like);
    if (loss == Loss::CrossEntropy && label_smoothing > 0) y = y * (1 - label_smoothing) + label_smoothing / like.size(1);
    return y;
  }

  /// Label smoothing of the loss EP approximates (cross-entropy only).
  double loss_smoothing() const { return loss == Loss::CrossEntropy ? label_smoothing : 0.0; }

  /// That loss, mean over the batch of C(ŷ_b, y_b) (loss.hpp).
  torch::Tensor loss_of(const torch::Tensor& out, const torch::Tensor& target) const {
    return loss_value(loss, out, target, loss_smoothing());
  }

  /// Per-sample cost C(ŷ_b, y_b), shape [B].
  torch::Tensor cost(const torch::Tensor& out, const torch::Tensor& y) const {
    if (loss == Loss::MSE) return (out - y).pow(2).flatten(1).sum(1);
    return -(y * torch::log_softmax(out, 1)).sum(1);
  }

  /// ∂C/∂ŷ per sample (not divided by the batch size).
  torch::Tensor cost_grad(const torch::Tensor& out, const torch::Tensor& y) const {
    if (loss == Loss::MSE) return 2 * (out - y);
    return torch::softmax(out, 1) - y;
  }

  /// Last internal term: writes δ_L and ε_L, returns E_L per sample.
  torch::Tensor last_term(const torch::Tensor& s, const torch::Tensor& f, torch::Tensor& delta,
                          torch::Tensor& eps) const {
    if (loss == Loss::MSE) {
      eps = s - f;
      delta = eps;
      return 0.5 * eps.pow(2).flatten(1).sum(1);
    }
    const double t = temperature;
    auto log_p = torch::log_softmax(f / t, 1);
    auto log_q = torch::log_softmax(s / t, 1);
    auto p = log_p.exp();
    auto d = log_p - log_q;
    auto kl = (p * d).sum(1);
    delta = (log_q.exp() - p) / t;
    eps = -(p * (d - kl.unsqueeze(1))) / t;
    return kl;
  }
};

}  // namespace mep
