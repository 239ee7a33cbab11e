#pragma once
/// \file energy.hpp
/// The EP energy — its one definition in mep. Per sample b:
///
///   E_b(s; θ, β) = Σ_{l<L} ½‖s_l − f_l‖²  +  E_L(s_L, f_L)  +  β·C(post(s_L), y),   f_l = f_l(a_{l−1}(s_{l−1}))
///
///   MSE nudging:  E_L = ½‖s_L − f_L‖²,  C = ‖ŷ − y‖² (one-hot y; no ½, the reference's convention)
///   CE nudging:   E_L = KL(softmax(f_L/T) ‖ softmax(s_L/T)),  C = CE(ŷ, ỹ), ỹ = (1−ε)·y + ε/K
///   NLL nudging:  E_L = ½‖s_L − f_L‖²,  C = −Σ_k y_k·ŷ_k (ŷ = post(s_L) log-probabilities, one-hot y)
///
/// (Scellier & Bengio 2017 for the squared-error energy; the KL last layer and CE cost follow
/// Laborieux et al. 2021.) Each internal term is described by δ_l = ∂E_l/∂s_l and
/// ε_l = −∂E_l/∂f_l (both s_l − f_l for the squared error), so that
///
///   ∂E/∂s_l = δ_l − J_{l+1}ᵀ·ε_{l+1}  (+ β·∂C/∂s_L for l = L),   ∂E/∂θ_l = −(∂f_l/∂θ_l)ᵀ·ε_l,
///
/// with J_{l+1} the Jacobian of segment l+1 (ep/segment.hpp). The functions below compute
/// these terms over a workspace (ep/workspace.hpp) after the feedforward pass
/// (ep/feedforward.hpp): `forward` (the segments' predictions at the current states),
/// `errors` (ε, δ and the nudge), `backproject` (J_{l+1}ᵀ·ε_{l+1}), `state_gradient`,
/// `evaluate` (all of them), `total`/`mean` and `residual_norms`.

#include <mep/ep/chain.hpp>
#include <mep/ep/workspace.hpp>
#include <mep/loss.hpp>

#include <cmath>
#include <sstream>
#include <vector>

namespace mep {
namespace energy {

/// The dense target the cost compares with: one-hot (MSE, NLL) or smoothed distribution (CE).
/// `in_range`: class indices already in [0, K) (safe_target's).
inline torch::Tensor dense(const Nudging& n, const torch::Tensor& target, const torch::Tensor& like,
                           bool in_range = false) {
  auto y = dense_target(target, like, in_range);
  if (n.loss == Loss::CrossEntropy && n.label_smoothing > 0) {
    if (target.scalar_type() == torch::kLong) y.mul_(1 - n.label_smoothing).add_(n.label_smoothing / like.size(1));
    else y = y * (1 - n.label_smoothing) + n.label_smoothing / like.size(1);  // y may be the target itself
  }
  return y;
}

/// The loss EP approximates, mean over the batch of C(ŷ_b, y_b) (loss.hpp).
inline torch::Tensor loss(const Nudging& n, const torch::Tensor& out, const torch::Tensor& target) {
  return loss_value(n.loss, out, target, n.loss_smoothing());
}
/// The same at the feedforward output ws.output, with the dense target the step already
/// holds for MSE (the one-hot of loss_value's; the value is the same).
inline torch::Tensor feedforward_loss(const Workspace& ws, const torch::Tensor& target) {
  if (ws.nudging.loss != Loss::MSE || ws.target.sizes() != ws.output.sizes()) return loss(ws.nudging, ws.output, target);
  auto diff = ws.output - ws.target;
  return at::mul(diff, diff).sum() / ws.output.size(0);  // pow(2) is diff·diff
}

/// Per-sample cost C(ŷ_b, y_b), shape [B].
inline torch::Tensor cost(const Nudging& n, const torch::Tensor& out, const torch::Tensor& y) {
  if (n.loss == Loss::MSE) return (out - y).pow(2).flatten(1).sum(1);
  if (n.loss == Loss::NLL) return -(y * out).flatten(1).sum(1);
  return -(y * torch::log_softmax(out, 1)).sum(1);
}

/// The KL last-layer term: writes δ_L and ε_L, returns E_L per sample.
inline torch::Tensor kl_term(const Nudging& n, const torch::Tensor& s, const torch::Tensor& f, torch::Tensor& delta,
                             torch::Tensor& eps) {
  const double t = n.temperature;
  auto log_p = torch::log_softmax(f / t, 1);
  auto log_q = torch::log_softmax(s / t, 1);
  auto p = log_p.exp();
  auto d = log_p - log_q;
  auto kl = (p * d).sum(1);
  delta = (log_q.exp() - p) / t;
  eps = -(p * (d - kl.unsqueeze(1))) / t;
  return kl;
}

/// Refuses a loss the model's output cannot carry: NLL needs log-probabilities (a model
/// ending in LogSoftmax over the classes, or in a module run through its forward, trusted to
/// make them), and MSE nudging would pull log-probabilities towards one-hot targets.
inline void check_output(const Chain& chain, const Nudging& n) {
  const Op* last = chain.post.empty() ? nullptr : &chain.post.back();
  const auto* log_softmax = last != nullptr ? last->as<ops::LogSoftmax>() : nullptr;
  std::ostringstream os;
  if (n.loss == Loss::NLL) {
    if (log_softmax != nullptr && (log_softmax->dim == 1 || log_softmax->dim == -1)) return;
    if (last != nullptr && !last->analytic()) return;
    os << "mep: Loss::NLL trains log-probabilities over the classes, but the model ends in ";
    if (log_softmax != nullptr) os << "LogSoftmax over dimension " << log_softmax->dim << " (position " << last->position << ")";
    else if (last != nullptr) os << last->module->name() << " (position " << last->position << ")";
    else os << chain.segments.back().module->name() << " (position " << chain.segments.back().position << ")";
    os << "; end it with torch::nn::LogSoftmax(1), or train its logits with Loss::CrossEntropy";
    throw ChainError(os.str());
  }
  if (n.loss == Loss::MSE && log_softmax != nullptr) {
    os << "mep: the model ends in LogSoftmax (position " << last->position << "): its outputs are "
       << "log-probabilities, which MSE nudging would pull towards one-hot targets they cannot reach; train it with "
       << ".loss(mep::Loss::NLL), the negative log-likelihood of torch::nll_loss";
    throw ChainError(os.str());
  }
}

/// The target the nudging compares the output with, set once per step. `in_range`: class
/// indices already in [0, K) (safe_target's).
inline void set_target(Workspace& ws, const torch::Tensor& target, bool in_range = false) {
  torch::NoGradGuard no_grad;
  ws.target = dense(ws.nudging, target, ws.output, in_range);
}

/// s ← the feedforward states.
inline void start(Workspace& ws) {
  torch::NoGradGuard no_grad;
  for (size_t l = 0; l < ws.size(); ++l) ws.s[l].copy_(ws.ff[l]);
}

/// Segment l's input and prediction at the current s_{l−1} (f_1(a_0(x)) never changes).
inline void forward(Workspace& ws, size_t l) {
  torch::NoGradGuard no_grad;
  if (l == 0) return;
  ws.at_feedforward = false;
  ws.chain->segments[l].forward(ws.s[l - 1], ws.tape[l], !ws.analytic);
}
inline void forward(Workspace& ws) {
  for (size_t l = 1; l < ws.size(); ++l) forward(ws, l);
}

namespace detail {
// δ_L += β·∂C/∂s_L, with ∂C/∂ŷ = 2(ŷ − y) (MSE), softmax(ŷ) − ỹ (CE) or −y (NLL) taken back
// through the post ops.
inline void nudge(Workspace& ws, double beta) {
  const Chain& chain = *ws.chain;
  auto& e = ws.sums;
  const size_t L = ws.size();
  SegmentTape& last = ws.tape[L - 1];
  torch::Tensor out = ws.s[L - 1];
  torch::Tensor leaf;
  if (!chain.post.empty()) {
    if (ws.analytic) {
      for (size_t j = 0; j < chain.post.size(); ++j) out = chain.post[j].forward(out, ws.post_tape[j]);
    } else {
      torch::AutoGradMode grad_mode(true);
      leaf = ws.s[L - 1].detach().requires_grad_(true);
      out = leaf;
      for (size_t j = 0; j < chain.post.size(); ++j) out = chain.post[j].apply(out, ws.post_tape[j]);
    }
  }
  e.out = out.requires_grad() ? out.detach() : out;
  torch::Tensor grad;
  double scale = beta;
  if (ws.nudging.loss == Loss::MSE) {
    at::sub_out(e.diff, e.out, ws.target);
    grad = e.diff;
    scale = 2 * beta;  // ∂C/∂ŷ = 2(ŷ − y)
  } else if (ws.nudging.loss == Loss::NLL) {
    at::neg_out(e.dcost, ws.target);
    grad = e.dcost;
  } else {
    at::_softmax_out(e.dcost, e.out, 1, false);
    e.dcost.sub_(ws.target);
    grad = e.dcost;
  }
  if (!chain.post.empty()) {
    if (leaf.defined()) {
      grad = torch::autograd::grad({out}, {leaf}, {grad})[0];
    } else {
      std::vector<torch::Tensor> ins(chain.post.size());
      torch::Tensor h = ws.s[L - 1];
      for (size_t j = 0; j < chain.post.size(); ++j) ins[j] = h, h = chain.post[j].output(h, ws.post_tape[j]);
      for (size_t j = chain.post.size(); j-- > 0;) grad = chain.post[j].vjp(grad, ins[j], ws.post_tape[j]);
    }
  }
  if (last.delta.is_same(last.eps)) {
    if (!e.nudged_delta.defined() || e.nudged_delta.sizes() != last.eps.sizes()) e.nudged_delta = torch::empty_like(last.eps);
    at::add_out(e.nudged_delta, last.eps, grad, scale);
    last.delta = e.nudged_delta;
  } else {
    last.delta = last.delta + scale * grad;
  }
}
}  // namespace detail

/// ε_l and δ_l at the current s_l and prediction; for the last layer δ_L includes
/// β·∂C/∂s_L (through the post ops).
inline void errors(Workspace& ws, size_t l, double beta) {
  torch::NoGradGuard no_grad;
  SegmentTape& t = ws.tape[l];
  if (l + 1 < ws.size() || !ws.nudging.kl_last()) {
    at::sub_out(t.eps, ws.s[l], t.pred);
    t.delta = t.eps;
  } else {
    ws.sums.kl = kl_term(ws.nudging, ws.s[l], t.pred, t.delta, t.eps);
  }
  if (l + 1 == ws.size() && beta != 0) detail::nudge(ws, beta);
}
inline void errors(Workspace& ws, double beta) {
  for (size_t l = 0; l < ws.size(); ++l) errors(ws, l, beta);
}

/// J_lᵀ·ε_l with respect to s_{l−1}, into tape[l].back (after forward and errors of l).
inline void backproject(Workspace& ws, size_t l) {
  torch::NoGradGuard no_grad;
  if (l == 0) return;
  ws.chain->segments[l].vjp(ws.tape[l].eps, ws.s[l - 1], ws.tape[l]);
}

/// ∂E/∂s_l = δ_l − J_{l+1}ᵀ·ε_{l+1} into ws.dE_ds[l] (after backproject(l + 1)).
inline const torch::Tensor& state_gradient(Workspace& ws, size_t l) {
  torch::NoGradGuard no_grad;
  if (l + 1 < ws.size()) at::sub_out(ws.dE_ds[l], ws.tape[l].delta, ws.tape[l + 1].back);
  else ws.dE_ds[l].copy_(ws.tape[l].delta);
  return ws.dE_ds[l];
}

/// ∂E/∂s for every state at the current states: forward, errors, VJPs.
inline void evaluate(Workspace& ws, double beta) {
  forward(ws);
  errors(ws, beta);
  for (size_t l = 1; l < ws.size(); ++l) backproject(ws, l);
  for (size_t l = 0; l < ws.size(); ++l) state_gradient(ws, l);
}

namespace detail {
// E_b per sample into ws.sums.rows (after errors): Σ_l ½‖ε_l‖² (or the KL term) + β·C, added
// in that order, the first term to zeros.
inline void rows(Workspace& ws, double beta) {
  auto& e = ws.sums;
  const size_t L = ws.size();
  bool first = true;
  const auto add = [&](const torch::Tensor& row, double c) {
    if (first) at::add_out(e.rows, e.zeros, row, c);
    else e.rows.add_(row, c);
    first = false;
  };
  for (size_t l = 0; l < L; ++l) {
    if (l + 1 == L && ws.nudging.kl_last()) {
      add(e.kl, 1);
      continue;
    }
    at::mul_out(e.sq[l], ws.tape[l].eps, ws.tape[l].eps);
    at::sum_out(e.row, e.sq_rows[l], {1});
    add(e.row, 0.5);
  }
  if (beta != 0) {
    if (ws.nudging.loss == Loss::MSE) {
      at::mul_out(e.sq_out, e.diff, e.diff);
      at::sum_out(e.row, e.sq_out_rows, {1});
      add(e.row, beta);
    } else {
      add(cost(ws.nudging, e.out, ws.target), beta);
    }
  }
}
}  // namespace detail

/// Σ_b E_b at the current errors (after errors), as a 0-dim tensor on the device.
inline const torch::Tensor& total(Workspace& ws, double beta) {
  torch::NoGradGuard no_grad;
  detail::rows(ws, beta);
  at::sum_out(ws.sums.total, ws.sums.rows, {0});
  return ws.sums.total;
}
/// The same, as a new tensor (what a report keeps).
inline torch::Tensor total_value(Workspace& ws, double beta) {
  torch::NoGradGuard no_grad;
  detail::rows(ws, beta);
  return at::sum(ws.sums.rows, {0});
}

/// The batch-mean energy on the host (reads the device once).
inline double mean(Workspace& ws, double beta) {
  return total(ws, beta).item<double>() / static_cast<double>(ws.batch());
}

/// [‖∂E/∂s‖², ‖s‖²] over all states and samples (after evaluate), float64 on the device:
/// the relative residual ‖∂E/∂s‖ / ‖s‖ without a host read (PhaseReport::residual reads it).
inline torch::Tensor residual_norms(Workspace& ws) {
  // Each Σx² in the states' dtype (x·x is what pow(2) computes, all squares in one multi-tensor
  // op), into ws.sums.partial; then taken to float64 and added there from l = 0 up, both
  // sums at once.
  torch::NoGradGuard no_grad;
  auto& e = ws.sums;
  const size_t L = ws.size();
  std::vector<torch::Tensor> x;
  x.reserve(2 * L);
  for (size_t l = 0; l < L; ++l) x.push_back(ws.dE_ds[l]);
  for (size_t l = 0; l < L; ++l) x.push_back(ws.s[l]);
  const auto sq = at::_foreach_mul(x, x);
  for (size_t i = 0; i < sq.size(); ++i) at::sum_out(e.partial_slots[i], sq[i], at::OptionalIntArrayRef());
  e.partial_d.copy_(e.partial);
  auto norms = e.partial_cols[0].clone(at::MemoryFormat::Contiguous);
  for (size_t l = 1; l < L; ++l) norms.add_(e.partial_cols[l]);
  return norms;
}

/// The curvature of the last layer's energy in s_L when it is the quadratic
/// ½‖s_L − f_L‖² + β‖s_L − y‖² (MSE nudging, no ops after the last layer): 1 + 2β; 0 otherwise.
inline double last_curvature(const Workspace& ws, double beta) {
  if (ws.nudging.loss != Loss::MSE || !ws.chain->post.empty()) return 0;
  return 1 + 2 * beta;
}

/// An estimate of ‖J_l‖₂ for segment l ≥ 1 at its recorded point (Segment::jacobian_norm).
inline torch::Tensor jacobian_norm(const Workspace& ws, size_t l, int64_t iters) {
  return ws.chain->segments[l].jacobian_norm(ws.s[l - 1], ws.tape[l], iters);
}

}  // namespace energy
}  // namespace mep
