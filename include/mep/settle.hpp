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
  /// `first_state`, when given, is the feedforward s_1 = f_1(a_0(x)) already computed by
  /// the caller (it saves the most expensive product of the step).
  Settler(Chain& chain, const Nudging& nudging, const torch::Tensor& x, const torch::Tensor& target,
          const torch::Tensor& first_state = {})
      : chain_(chain), nudging_(nudging) {
    torch::NoGradGuard no_grad;
    in0_ = Chain::apply(chain.layers[0].pre, x);
    pred0_ = first_state.defined() ? first_state : chain.layers[0].forward(in0_);
    target_ = target;
    fast_ = fast_eligible(chain, nudging);
  }

  /// Settles from `init` (usually the feedforward states) at nudging strength `beta`.
  Phase settle(const std::vector<torch::Tensor>& init, double beta, const SettleConfig& cfg) {
    torch::NoGradGuard no_grad;
    const size_t L = chain_.layers.size();
    Phase ph;
    ph.beta = beta;
    std::vector<torch::Tensor> s(L), v(L), g(L), s_old(L), v_old(L), g_old(L);
    for (size_t l = 0; l < L; ++l) {
      s[l] = init[l].clone();
      v[l] = torch::zeros_like(s[l]);
      if (cfg.adaptive) s_old[l] = torch::empty_like(s[l]), v_old[l] = torch::empty_like(s[l]);
    }
    double lr = cfg.lr, energy = evaluate(s, beta, g, cfg.analytic, ph);
    check_finite(energy, 0, beta);
    if (cfg.adaptive)
      for (size_t l = 0; l < L; ++l) g_old[l] = torch::empty_like(g[l]);
    int64_t calm = 0, k = 0;
    bool rejected = false;
    for (k = 1; k <= cfg.steps; ++k) {
      if (cfg.adaptive)
        for (size_t l = 0; l < L; ++l) s_old[l].copy_(s[l]), v_old[l].copy_(v[l]), g_old[l].copy_(g[l]);
      for (size_t l = 0; l < L; ++l) {
        at::add_out(v[l], g[l], v[l], 0.5);  // v ← 0.5·v + g (no scalar tensor: allocation-free)
        s[l].sub_(v[l], lr);
      }
      const double next = evaluate(s, beta, g, cfg.analytic, ph);
      check_finite(next, k, beta);
      rejected = cfg.adaptive && next > energy;
      if (rejected) {
        for (size_t l = 0; l < L; ++l) s[l].copy_(s_old[l]), v[l].copy_(v_old[l]), g[l].copy_(g_old[l]);
        lr *= 0.5;
        calm = 0;
        continue;
      }
      if (cfg.adaptive) lr = std::min(lr * 1.1, 10 * cfg.lr);
      const bool small = cfg.tol > 0 && std::abs(next - energy) < cfg.tol * std::max(1.0, std::abs(energy));
      energy = next;
      calm = small ? calm + 1 : 0;
      if (calm >= std::max<int64_t>(cfg.patience, 1)) break;
    }
    if (rejected) evaluate(s, beta, g, cfg.analytic, ph);  // describe the accepted states
    // The fast path's buffers are reused by the next phase: keep copies (the first input
    // a_0(x) is not one of them).
    if (cfg.analytic && fast_) {
      for (size_t l = 1; l < L; ++l) ph.inputs[l] = ph.inputs[l].clone();
      for (auto& t : ph.eps) t = t.clone();
    }
    ph.states = std::move(s);
    ph.steps = std::min(k, cfg.steps);
    ph.energy = energy;
    ph.final_lr = lr;
    return ph;
  }

  /// Batch-mean energy at `s`; writes ∂E_b/∂s into `grad` and the inputs/errors into `ph`.
  double evaluate(const std::vector<torch::Tensor>& s, double beta, std::vector<torch::Tensor>& grad, bool analytic,
                  Phase& ph) {
    if (analytic && fast_) return evaluate_fast(s, beta, grad, ph);
    return evaluate_general(s, beta, grad, analytic, ph);
  }

  /// Whether the allocation-free path applies (see evaluate_fast).
  bool fast_path() const { return fast_; }

  /// The general path: analytic VJPs where the segment allows, autograd elsewhere.
  double evaluate_general(const std::vector<torch::Tensor>& s, double beta, std::vector<torch::Tensor>& grad,
                          bool analytic, Phase& ph) {
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

  /// The fast path, for chains of Linear layers with ReLU/Tanh/Sigmoid (or no activation),
  /// Dropout or 2-D Flatten between them, no trailing ops and MSE nudging — the MLPs of the
  /// benchmark. Every tensor it writes is a workspace buffer allocated at the first step
  /// (or when the batch shape changes): no allocation, no autograd, per settling step.
  ///   in_l = a(s_{l−1}), a'_l;  f_l = b_l + in_l·W_lᵀ;  ε_l = s_l − f_l
  ///   ∂E/∂s_l = ε_l − a'_{l+1} ⊙ (ε_{l+1}·W_{l+1})  (+ 2β(s_L − y) for the last layer)
  double evaluate_fast(const std::vector<torch::Tensor>& s, double beta, std::vector<torch::Tensor>& grad, Phase& ph) {
    torch::NoGradGuard no_grad;
    const size_t L = chain_.layers.size();
    Workspace& w = workspace(s);
    ph.inputs.resize(L);
    ph.eps.resize(L);
    if (grad.size() != L) grad.resize(L);
    for (size_t l = 0; l < L; ++l)
      if (!grad[l].defined() || grad[l].sizes() != s[l].sizes()) grad[l] = torch::empty_like(s[l]);
    w.energy.zero_();
    for (size_t l = 0; l < L; ++l) {
      const Layer& layer = chain_.layers[l];
      if (l > 0) {
        const Op* act = activation_of(layer);
        const auto& prev = s[l - 1];
        if (act == nullptr) {
          w.in[l] = prev;
        } else if (act->act == Activation::ReLU) {
          at::clamp_min_out(w.in[l], prev, 0);
          at::sign_out(w.deriv[l], prev);
          w.deriv[l].clamp_min_(0);  // 1 where s > 0, else 0
        } else if (act->act == Activation::Tanh) {
          at::tanh_out(w.in[l], prev);
          at::addcmul_out(w.deriv[l], w.ones[l], w.in[l], w.in[l], -1);  // 1 − tanh²
        } else {
          at::sigmoid_out(w.in[l], prev);
          at::addcmul_out(w.deriv[l], w.in[l], w.in[l], w.in[l], -1);  // σ − σ²
        }
        if (layer.bias.defined()) at::addmm_out(w.pred[l], layer.bias, w.in[l], layer.weight.t());
        else at::mm_out(w.pred[l], w.in[l], layer.weight.t());
      }
      at::sub_out(w.eps[l], s[l], l == 0 ? pred0_ : w.pred[l]);
      at::mul_out(w.sq[l], w.eps[l], w.eps[l]);
      at::sum_out(w.row, w.sq[l], {1});
      w.energy.add_(w.row, 0.5);
      ph.inputs[l] = l == 0 ? in0_ : w.in[l];
      ph.eps[l] = w.eps[l];
    }
    if (beta != 0) {
      if (!y_.defined()) y_ = nudging_.dense(target_, s[L - 1]);
      at::sub_out(w.diff, s[L - 1], y_);
      at::mul_out(w.sq[L - 1], w.diff, w.diff);
      at::sum_out(w.row, w.sq[L - 1], {1});
      w.energy.add_(w.row, beta);
    }
    for (size_t l = 0; l + 1 < L; ++l) {
      const Layer& next = chain_.layers[l + 1];
      at::mm_out(w.back[l + 1], w.eps[l + 1], next.weight);
      if (activation_of(next) != nullptr) w.back[l + 1].mul_(w.deriv[l + 1]);
      at::sub_out(grad[l], w.eps[l], w.back[l + 1]);
    }
    if (beta != 0) at::add_out(grad[L - 1], w.eps[L - 1], w.diff, 2 * beta);
    else grad[L - 1].copy_(w.eps[L - 1]);
    at::sum_out(w.total, w.energy, {0});
    return w.total.item<double>() / static_cast<double>(s[0].size(0));
  }

 private:
  struct Workspace {
    std::vector<int64_t> batch_shape;
    std::vector<torch::Tensor> in, deriv, pred, eps, sq, back, ones;
    torch::Tensor row, energy, total, diff;
  };

  static bool fast_eligible(const Chain& chain, const Nudging& nudging) {
    if (nudging.loss != Loss::MSE || !chain.post.empty()) return false;
    for (size_t l = 0; l < chain.layers.size(); ++l) {
      const Layer& layer = chain.layers[l];
      if (layer.kind != LayerKind::Linear) return false;
      if (l == 0) continue;  // f_1(a_0(x)) is computed once, whatever a_0 is
      int activations = 0;
      for (const auto& op : layer.pre) {
        if (op.kind == OpKind::Dropout) continue;
        if (op.kind == OpKind::Flatten && op.start_dim == 1) continue;  // identity on [B, n] states
        if (op.kind != OpKind::Activation) return false;
        if (op.act != Activation::ReLU && op.act != Activation::Tanh && op.act != Activation::Sigmoid) return false;
        ++activations;
      }
      if (activations > 1) return false;
    }
    return true;
  }

  static const Op* activation_of(const Layer& layer) {
    for (const auto& op : layer.pre)
      if (op.kind == OpKind::Activation) return &op;
    return nullptr;
  }

  Workspace& workspace(const std::vector<torch::Tensor>& s) {
    auto shape = s[0].sizes().vec();
    if (ws_.batch_shape == shape) return ws_;
    const size_t L = s.size();
    Workspace w;
    w.batch_shape = shape;
    w.in.resize(L), w.deriv.resize(L), w.pred.resize(L), w.eps.resize(L), w.sq.resize(L), w.back.resize(L);
    w.ones.resize(L);
    for (size_t l = 0; l < L; ++l) {
      w.eps[l] = torch::empty_like(s[l]);
      w.sq[l] = torch::empty_like(s[l]);
      w.pred[l] = torch::empty_like(s[l]);
      if (l > 0) {
        w.in[l] = torch::empty_like(s[l - 1]);
        w.deriv[l] = torch::empty_like(s[l - 1]);
        w.back[l] = torch::empty_like(s[l - 1]);
        w.ones[l] = torch::ones_like(s[l - 1]);
      }
    }
    w.row = torch::empty({s[0].size(0)}, s[0].options());
    w.energy = torch::empty({s[0].size(0)}, s[0].options());
    w.total = torch::empty({}, s[0].options());
    w.diff = torch::empty_like(s[L - 1]);
    ws_ = std::move(w);
    return ws_;
  }

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

  static void check_finite(double energy, int64_t step, double beta) {
    if (std::isfinite(energy)) return;
    std::ostringstream os;
    os << "mep: settling diverged at step " << step << " (beta = " << beta << ", energy = " << energy
       << "); lower settle_lr or beta. No gradient or parameter was changed";
    throw SettleError(os.str());
  }

  Chain& chain_;
  Nudging nudging_;
  torch::Tensor target_, y_, in0_, pred0_;
  bool fast_ = false;
  Workspace ws_;
};

}  // namespace mep
