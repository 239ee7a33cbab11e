#pragma once
/// \file settle.hpp
/// Settling (SPEC §3): from the feedforward states, heavy-ball descent on the per-sample
/// energy of energy.hpp,
///
///   v ← 0.5·v + ∂E_b/∂s ;   s ← s − settle_lr·v        (s₀ = x fixed)
///
/// for at most `steps` steps, stopping when |ΔE| < tol·max(1, |E|) for `patience`
/// consecutive steps (tol = 0: never early). Adaptive mode undoes a step that raises E
/// and halves settle_lr, and grows it ×1.1 after an accepted step (capped at 10× the
/// initial value). Each sample descends its own energy, so settling does not depend on the
/// batch size. ∂E/∂s is analytic for Linear/Conv layers behind pointwise ops,
///   ∂E/∂s_i = δ_i − a_i'(s_i) ⊙ (f_{i+1}'ᵀ·ε_{i+1})   (two products per layer per step),
/// and an autograd vector-Jacobian product through the segment otherwise (pooling, norms,
/// softmax). f_1(a_0(x)) is computed once. A non-finite energy throws SettleError.

#include <mep/chain.hpp>
#include <mep/energy.hpp>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace mep {

/// Thrown when settling diverges (non-finite energy).
class SettleError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SettleConfig {
  int64_t steps = 10;
  double lr = 0.05;
  double tol = 0.0;
  int64_t patience = 1;
  bool adaptive = false;
  bool analytic = true;  // false: autograd VJPs everywhere (tests, benchmarks)
};

/// A settled phase: states s_l, the layer inputs a_{l−1}(s_{l−1}) and errors ε_l at them.
struct Phase {
  double beta = 0;
  std::vector<torch::Tensor> states, inputs, eps;
  int64_t steps = 0;
  double energy = 0;   // batch-mean energy at the final states
  double final_lr = 0;
};

/// Settles one batch on one chain. Holds the buffers reused across steps.
class Settler {
 public:
  Settler(Chain& chain, const Nudging& nudging, const torch::Tensor& x, const torch::Tensor& target)
      : chain_(chain), nudging_(nudging) {
    torch::NoGradGuard no_grad;
    in0_ = Chain::apply(chain.layers[0].pre, x);
    pred0_ = chain.layers[0].forward(in0_);
    x_ = x;
    target_ = target;
  }

  const torch::Tensor& first_input() const { return in0_; }

  /// Settles from `init` (usually the feedforward states) at nudging strength `beta`.
  Phase settle(const std::vector<torch::Tensor>& init, double beta, const SettleConfig& cfg) {
    torch::NoGradGuard no_grad;
    const size_t L = chain_.layers.size();
    Phase ph;
    ph.beta = beta;
    std::vector<torch::Tensor> s(L), v(L), g(L), s_old, v_old, g_old;
    for (size_t l = 0; l < L; ++l) {
      s[l] = init[l].clone();
      v[l] = torch::zeros_like(s[l]);
    }
    double lr = cfg.lr, energy = evaluate(s, beta, g, cfg.analytic, ph);
    check_finite(energy, 0, beta);
    int64_t calm = 0, k = 0;
    for (k = 1; k <= cfg.steps; ++k) {
      if (cfg.adaptive) {
        s_old = clone_all(s), v_old = clone_all(v), g_old = clone_all(g);
      }
      for (size_t l = 0; l < L; ++l) {
        v[l].mul_(0.5).add_(g[l]);
        s[l].sub_(v[l], lr);
      }
      const double next = evaluate(s, beta, g, cfg.analytic, ph);
      check_finite(next, k, beta);
      if (cfg.adaptive) {
        if (next > energy) {
          s = std::move(s_old), v = std::move(v_old), g = std::move(g_old);
          lr *= 0.5;
          calm = 0;
          continue;
        }
        lr = std::min(lr * 1.1, 10 * cfg.lr);
      }
      const bool small = cfg.tol > 0 && std::abs(next - energy) < cfg.tol * std::max(1.0, std::abs(energy));
      energy = next;
      calm = small ? calm + 1 : 0;
      if (calm >= std::max<int64_t>(cfg.patience, 1)) break;
    }
    if (cfg.adaptive) evaluate(s, beta, g, cfg.analytic, ph);  // ph describes the accepted states
    ph.states = std::move(s);
    ph.steps = std::min(k, cfg.steps);
    ph.energy = energy;
    ph.final_lr = lr;
    return ph;
  }

  /// Batch-mean energy at `s`; writes ∂E_b/∂s into `grad` and the inputs/errors into `ph`.
  double evaluate(const std::vector<torch::Tensor>& s, double beta, std::vector<torch::Tensor>& grad, bool analytic,
                  Phase& ph) {
    const size_t L = chain_.layers.size();
    ph.inputs.assign(L, {});
    ph.eps.assign(L, {});
    std::vector<torch::Tensor> delta(L), pred(L), leaf(L);
    std::vector<std::vector<torch::Tensor>> derivs(L);
    std::vector<std::vector<std::vector<int64_t>>> shapes(L);
    ph.inputs[0] = in0_;
    pred[0] = pred0_;
    for (size_t l = 1; l < L; ++l) {
      const Layer& layer = chain_.layers[l];
      if (analytic && layer.analytic()) {
        torch::Tensor h = s[l - 1];
        for (const auto& op : layer.pre) {
          if (op.kind == OpKind::Activation) {
            auto out = op.activate(h);
            derivs[l].push_back(op.derivative(h, out));
            h = out;
          } else if (op.kind == OpKind::Flatten) {
            derivs[l].push_back(torch::Tensor());
            shapes[l].push_back(h.sizes().vec());
            h = op.forward(h);
          }
        }
        ph.inputs[l] = h;
        pred[l] = layer.forward(h);
      } else {
        torch::AutoGradMode grad_mode(true);
        leaf[l] = s[l - 1].detach().requires_grad_(true);
        auto h = Chain::apply(layer.pre, leaf[l]);
        ph.inputs[l] = h.detach();
        pred[l] = layer.forward(h);
      }
    }
    torch::Tensor energy = torch::zeros({s[0].size(0)}, s[0].options());
    for (size_t l = 0; l < L; ++l) {
      auto f = pred[l].detach();
      if (l + 1 < L) {
        ph.eps[l] = s[l] - f;
        delta[l] = ph.eps[l];
        energy += 0.5 * ph.eps[l].pow(2).flatten(1).sum(1);
      } else {
        energy += nudging_.last_term(s[l], f, delta[l], ph.eps[l]);
      }
    }
    if (beta != 0) {
      torch::Tensor out, sL = s[L - 1];
      torch::Tensor out_leaf;
      if (chain_.post.empty()) {
        out = sL;
      } else {
        torch::AutoGradMode grad_mode(true);
        out_leaf = sL.detach().requires_grad_(true);
        out = Chain::apply(chain_.post, out_leaf);
      }
      if (!y_.defined()) y_ = nudging_.dense(target_, out.detach());
      energy += beta * nudging_.cost(out.detach(), y_);
      auto dc = nudging_.cost_grad(out.detach(), y_);
      if (out_leaf.defined()) dc = torch::autograd::grad({out}, {out_leaf}, {dc})[0];
      delta[L - 1] = delta[L - 1] + beta * dc;
    }
    for (size_t l = 0; l < L; ++l) {
      grad[l] = delta[l];
      if (l + 1 < L) grad[l] = grad[l] - backproject(l + 1, ph.eps[l + 1], ph.inputs[l + 1], pred[l + 1], leaf[l + 1],
                                                       derivs[l + 1], shapes[l + 1]);
    }
    return energy.mean().item<double>();
  }

 private:
  // J_lᵀ·e for the segment s_{l−1} → f_l.
  torch::Tensor backproject(size_t l, const torch::Tensor& e, const torch::Tensor& in, const torch::Tensor& pred,
                            const torch::Tensor& leaf, const std::vector<torch::Tensor>& derivs,
                            const std::vector<std::vector<int64_t>>& shapes) {
    if (leaf.defined()) return torch::autograd::grad({pred}, {leaf}, {e})[0];
    const Layer& layer = chain_.layers[l];
    auto back = layer.input_vjp(e, in);
    size_t shape = shapes.size();
    size_t d = derivs.size();
    for (auto it = layer.pre.rbegin(); it != layer.pre.rend(); ++it) {
      if (it->kind == OpKind::Activation) {
        back = back * derivs[--d];
      } else if (it->kind == OpKind::Flatten) {
        --d;
        back = back.reshape(shapes[--shape]);
      }
    }
    return back;
  }

  static std::vector<torch::Tensor> clone_all(const std::vector<torch::Tensor>& t) {
    std::vector<torch::Tensor> out;
    out.reserve(t.size());
    for (const auto& x : t) out.push_back(x.clone());
    return out;
  }

  static void check_finite(double energy, int64_t step, double beta) {
    if (std::isfinite(energy)) return;
    std::ostringstream os;
    os << "mep: settling diverged at step " << step << " (beta = " << beta << ", energy = " << energy
       << "); lower settle_lr or beta. No gradient or parameter was changed";
    throw SettleError(os.str());
  }

  Chain& chain_;
  Nudging nudging_;
  torch::Tensor x_, target_, y_, in0_, pred0_;
};

}  // namespace mep
