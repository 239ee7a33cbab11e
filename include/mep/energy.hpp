#pragma once
/// \file energy.hpp
/// The EP energy of SPEC §2 — its one definition in mep. Per sample b:
///
///   E_b(s; θ, β) = Σ_{l<L} ½‖s_l − f_l‖²  +  E_L(s_L, f_L)  +  β·C(post(s_L), y),   f_l = f_l(a_{l−1}(s_{l−1}))
///
///   MSE nudging:  E_L = ½‖s_L − f_L‖²,  C = ‖ŷ − y‖² (one-hot y; no ½, the reference's convention)
///   CE nudging:   E_L = KL(softmax(f_L/T) ‖ softmax(s_L/T)),  C = CE(ŷ, ỹ), ỹ = (1−ε)·y + ε/K, ε = 0.1
///   NLL nudging:  E_L = ½‖s_L − f_L‖²,  C = −Σ_k y_k·ŷ_k (ŷ = post(s_L) log-probabilities, one-hot y)
///
/// Each internal term is described by δ_l = ∂E_l/∂s_l and ε_l = −∂E_l/∂f_l (both s_l − f_l
/// for the squared error), so that
///
///   ∂E/∂s_l = δ_l − J_{l+1}ᵀ·ε_{l+1}  (+ β·∂C/∂s_L for l = L),   ∂E/∂θ_l = −(∂f_l/∂θ_l)ᵀ·ε_l,
///
/// with J_{l+1} the Jacobian of segment l+1 (segment.hpp). At the feedforward states every
/// ε_l is 0. `Energy` holds the workspace of one chain and batch shape — states, errors,
/// the segments' tapes, frozen BatchNorm statistics — allocated when the shape changes and
/// reused otherwise; settling policies (settle.hpp) move the states with its primitives,
/// and the EP gradients (gradient/ep.hpp) read the errors it leaves.

#include <mep/chain.hpp>
#include <mep/loss.hpp>

#include <cmath>
#include <deque>
#include <vector>

namespace mep {

/// How the output is nudged towards the target.
struct Nudging {
  Loss loss = Loss::MSE;
  double label_smoothing = 0.1;  // cross-entropy only
  double temperature = 1.0;      // softmax temperature of the KL last-layer term

  /// The dense target the cost compares with: one-hot (MSE, NLL) or smoothed distribution (CE).
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
    if (loss == Loss::NLL) return -(y * out).flatten(1).sum(1);
    return -(y * torch::log_softmax(out, 1)).sum(1);
  }

  /// ∂C/∂ŷ per sample (not divided by the batch size).
  torch::Tensor cost_grad(const torch::Tensor& out, const torch::Tensor& y) const {
    if (loss == Loss::MSE) return 2 * (out - y);
    if (loss == Loss::NLL) return -y;
    return torch::softmax(out, 1) - y;
  }

  /// Whether the last internal term is the KL divergence (cross-entropy) rather than ½‖s_L − f_L‖².
  bool kl_last() const { return loss == Loss::CrossEntropy; }

  /// Last internal term: writes δ_L and ε_L, returns E_L per sample.
  torch::Tensor last_term(const torch::Tensor& s, const torch::Tensor& f, torch::Tensor& delta,
                          torch::Tensor& eps) const {
    if (!kl_last()) {
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

/// The energy of one chain on one batch, and the workspace it is computed in.
class Energy {
 public:
  std::vector<torch::Tensor> s;   // states s_1..s_L
  std::vector<torch::Tensor> ff;  // feedforward states
  std::vector<torch::Tensor> g;   // ∂E/∂s_l after gradient()
  std::vector<SegmentTape> tape;  // per segment: input, prediction, errors, VJP buffers
  std::vector<OpTape> post_tape;
  torch::Tensor output;           // ŷ = post(s_L) at the feedforward states

  /// Runs the feedforward pass of `x` through `chain` into the workspace (reallocated only
  /// when the batch shape, dtype or device changes) and freezes BatchNorm statistics for
  /// the step: the batch's in train mode, the running ones in eval mode.
  void feedforward(const Chain& chain, const Nudging& nudging, const torch::Tensor& x, bool analytic) {
    try {
      run_feedforward(chain, nudging, x, analytic);
    } catch (...) {
      *this = Energy();  // a half-built workspace is never reused
      throw;
    }
  }

 private:
  void run_feedforward(const Chain& chain, const Nudging& nudging, const torch::Tensor& x, bool analytic) {
    torch::NoGradGuard no_grad;
    chain_ = &chain;
    nudging_ = nudging;
    analytic_ = analytic;
    const size_t L = chain.size();
    const bool fresh = !matches(x);
    if (fresh) {
      shape_ = x.sizes().vec();
      options_ = x.options();
      tape.assign(L, {});
      s.assign(L, {}), ff.assign(L, {}), g.assign(L, {});
      scratch_.clear();
    }
    torch::Tensor h = x;
    for (size_t l = 0; l < L; ++l) {
      const Segment& seg = chain.segments[l];
      if (fresh) seg.prepare(h, tape[l]);
      const torch::Tensor state = h;  // s_{l−1}
      for (size_t j = 0; j < seg.pre.size(); ++j) {
        freeze(seg.pre[j], h, tape[l].ops[j]);
        keep_input(seg.pre[j], h, tape[l].ops[j]);
        h = seg.pre[j].forward(h, tape[l].ops[j]);
      }
      tape[l].in = h;
      tape[l].ff_in = seg.kind == LayerKind::Module && seg.block.stateful ? h.clone() : torch::Tensor();
      if (l > 0 && (!analytic || !seg.analytic())) {
        seg.forward(state, tape[l], true);  // the graph of the first sweep's VJP
      } else {
        tape[l].leaf = tape[l].graph = torch::Tensor();
        if (seg.kind == LayerKind::Linear && h.dim() == 2) seg.layer_forward(h, &tape[l].pred);
        else tape[l].pred = seg.layer_forward(h);
      }
      if (fresh) {
        ff[l] = torch::empty_like(tape[l].pred, torch::MemoryFormat::Contiguous);
        s[l] = torch::empty_like(ff[l]);
        g[l] = torch::empty_like(ff[l]);
        if (l > 0) tape[l].back = torch::Tensor();
      }
      ff[l].copy_(tape[l].pred);
      h = ff[l];
    }
    if (fresh) post_tape.assign(chain.post.size(), {});
    for (size_t j = 0; j < chain.post.size(); ++j) {
      if (fresh) chain.post[j].prepare(h, post_tape[j]);
      freeze(chain.post[j], h, post_tape[j]);
      keep_input(chain.post[j], h, post_tape[j]);
      h = chain.post[j].forward(h, post_tape[j]);
    }
    output = chain.post.empty() ? ff[L - 1] : h.clone();
    if (fresh) {
      const auto states = ff[0].options();  // x's, unless the first layer reads integer input
      rows_ = torch::empty({x.size(0)}, states);
      row_ = torch::empty({x.size(0)}, states);
      total_ = torch::empty({}, states);
      diff_ = torch::empty_like(output);
      dcost_ = torch::empty_like(output);
      sq_.clear();
      for (size_t l = 0; l < L; ++l) sq_.push_back(torch::empty_like(ff[l]));
      sq_out_ = torch::empty_like(output);
    }
    y_ = torch::Tensor();
    tapes_at_ff_ = true;
  }

 public:

  /// The target the nudging compares the output with (one-hot or smoothed), set once per step.
  void set_target(const torch::Tensor& target) {
    torch::NoGradGuard no_grad;
    y_ = nudging_.dense(target, output);
  }

  /// Advances BatchNorm's running statistics with the batch statistics frozen by the last
  /// `feedforward` in train mode, as one forward pass of the model would; and the buffers of
  /// a module run through its forward (in train mode) by one forward in its own mode at its
  /// feedforward input.
  void commit_norm_statistics() {
    torch::NoGradGuard no_grad;
    auto commit = [](const Op& op, OpTape& t) {
      if (op.kind == OpKind::Module) {
        commit_module(op.call, t.ff_in, t.saved_running);
        return;
      }
      if (op.kind != OpKind::BatchNorm) return;
      t.saved_running.clear();
      if (t.count == 0) return;
      auto advance = [&](auto& bn) {
        t.saved_running = {bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()};
        const double mom = bn.options.momentum().value_or(0.1);
        const double n = static_cast<double>(t.count);
        bn.running_mean.mul_(1 - mom).add_(t.mean, mom);
        bn.running_var.mul_(1 - mom).add_(t.var * (n / std::max(n - 1, 1.0)), mom);
        bn.num_batches_tracked.add_(1);
      };
      if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(op.module)) advance(*bn);
      if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(op.module)) advance(*bn);
      t.count = 0;
    };
    for (size_t l = 0; l < chain_->size(); ++l) {
      for (size_t j = 0; j < chain_->segments[l].pre.size(); ++j) commit(chain_->segments[l].pre[j], tape[l].ops[j]);
      if (chain_->segments[l].kind == LayerKind::Module)
        commit_module(chain_->segments[l].block, tape[l].ff_in, tape[l].saved_buffers);
    }
    for (size_t j = 0; j < chain_->post.size(); ++j) commit(chain_->post[j], post_tape[j]);
  }

  /// Whether the workspace is allocated for `chain` and a batch shaped and typed like `x`.
  bool fits(const Chain& chain, const torch::Tensor& x) const {
    return chain_ == &chain && !tape.empty() && tape.size() == chain.size() && x.sizes() == c10::IntArrayRef(shape_) &&
           x.options().type_equal(options_);
  }

  /// Puts BatchNorm's running statistics back as they were before the last commit.
  void undo_norm_statistics() {
    torch::NoGradGuard no_grad;
    auto undo = [](const Op& op, OpTape& t) {
      if (op.kind == OpKind::Module) {
        undo_module(op.call, t.saved_running);
        return;
      }
      if (op.kind != OpKind::BatchNorm || t.saved_running.empty()) return;
      auto back = [&](auto& bn) {
        bn.running_mean.copy_(t.saved_running[0]), bn.running_var.copy_(t.saved_running[1]);
        bn.num_batches_tracked.copy_(t.saved_running[2]);
      };
      if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(op.module)) back(*bn);
      if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(op.module)) back(*bn);
      t.saved_running.clear();
    };
    for (size_t l = 0; l < chain_->size(); ++l) {
      for (size_t j = 0; j < chain_->segments[l].pre.size(); ++j) undo(chain_->segments[l].pre[j], tape[l].ops[j]);
      if (chain_->segments[l].kind == LayerKind::Module) undo_module(chain_->segments[l].block, tape[l].saved_buffers);
    }
    for (size_t j = 0; j < chain_->post.size(); ++j) undo(chain_->post[j], post_tape[j]);
  }

  size_t size() const { return s.size(); }
  int64_t batch() const { return shape_.empty() ? 0 : shape_[0]; }
  const Chain& chain() const { return *chain_; }
  const Nudging& nudging() const { return nudging_; }
  bool analytic() const { return analytic_; }

  /// s ← the feedforward states.
  void start() {
    torch::NoGradGuard no_grad;
    for (size_t l = 0; l < s.size(); ++l) s[l].copy_(ff[l]);
  }

  /// Whether the segments' inputs and predictions still describe the feedforward states
  /// (no forward() since the last feedforward): then every ε_l is 0 at s = ff.
  bool tapes_at_feedforward() const { return tapes_at_ff_; }

  /// Segment l's input and prediction at the current s_{l−1} (f_1(a_0(x)) never changes).
  void forward(size_t l) {
    torch::NoGradGuard no_grad;
    if (l == 0) return;
    tapes_at_ff_ = false;
    chain_->segments[l].forward(s[l - 1], tape[l], !analytic_);
  }
  void forward_all() {
    for (size_t l = 1; l < s.size(); ++l) forward(l);
  }

  /// ε_l and δ_l at the current s_l and prediction; for the last layer δ_L includes
  /// β·∂C/∂s_L (through the post ops).
  void errors(size_t l, double beta) {
    torch::NoGradGuard no_grad;
    SegmentTape& t = tape[l];
    if (l + 1 < s.size() || !nudging_.kl_last()) {
      at::sub_out(t.eps, s[l], t.pred);
      t.delta = t.eps;
    } else {
      kl_ = nudging_.last_term(s[l], t.pred, t.delta, t.eps);
    }
    if (l + 1 == s.size() && beta != 0) nudge(beta);
  }
  void errors_all(double beta) {
    for (size_t l = 0; l < s.size(); ++l) errors(l, beta);
  }

  /// J_lᵀ·ε_l with respect to s_{l−1}, into tape[l].back (after forward(l), errors(l)).
  void backproject(size_t l) {
    torch::NoGradGuard no_grad;
    if (l == 0) return;
    chain_->segments[l].vjp(tape[l].eps, s[l - 1], tape[l]);
  }

  /// g_l = δ_l − J_{l+1}ᵀ·ε_{l+1} (after backproject(l + 1)).
  void gradient(size_t l) {
    torch::NoGradGuard no_grad;
    if (l + 1 < s.size()) at::sub_out(g[l], tape[l].delta, tape[l + 1].back);
    else g[l].copy_(tape[l].delta);
  }

  /// An estimate of ‖J_l‖₂ for segment l ≥ 1 at its recorded point (Segment::jacobian_norm).
  torch::Tensor jacobian_norm(size_t l, int64_t iters) const {
    return chain_->segments[l].jacobian_norm(s[l - 1], tape[l], iters);
  }

  /// ∂E/∂s for every state at the current states: forward, errors, VJPs.
  void evaluate(double beta) {
    forward_all();
    errors_all(beta);
    for (size_t l = 1; l < s.size(); ++l) backproject(l);
    for (size_t l = 0; l < s.size(); ++l) gradient(l);
  }

  /// Σ_b E_b at the current errors (after errors_all), as a 0-dim tensor on the device.
  const torch::Tensor& total(double beta) {
    torch::NoGradGuard no_grad;
    const size_t L = s.size();
    rows_.zero_();
    for (size_t l = 0; l < L; ++l) {
      if (l + 1 == L && nudging_.kl_last()) {
        rows_.add_(kl_);
        continue;
      }
      at::mul_out(sq_[l], tape[l].eps, tape[l].eps);
      at::sum_out(row_, sq_[l].view({batch(), -1}), {1});
      rows_.add_(row_, 0.5);
    }
    if (beta != 0) {
      if (nudging_.loss == Loss::MSE) {
        at::mul_out(sq_out_, diff_, diff_);
        at::sum_out(row_, sq_out_.view({batch(), -1}), {1});
        rows_.add_(row_, beta);
      } else {
        rows_.add_(nudging_.cost(out_, y_), beta);
      }
    }
    at::sum_out(total_, rows_, {0});
    return total_;
  }

  /// The batch-mean energy on the host (reads the device once).
  double mean(double beta) { return total(beta).item<double>() / static_cast<double>(batch()); }

  /// The relative residual ‖∂E/∂s‖ / ‖s‖ over all states and samples (after evaluate).
  double residual() {
    torch::Tensor num = torch::zeros({}, options_.dtype(torch::kDouble)), den = torch::zeros_like(num);
    for (size_t l = 0; l < s.size(); ++l) {
      num += g[l].pow(2).sum().to(torch::kDouble);
      den += s[l].pow(2).sum().to(torch::kDouble);
    }
    auto both = torch::stack({num, den}).cpu();
    const double n = both[0].item<double>(), d = both[1].item<double>();
    return d > 0 ? std::sqrt(n / d) : std::sqrt(n);
  }

  /// Per-layer buffers shaped like the states, kept with the workspace (settling policies'
  /// velocities and saved states); `slot` names a set.
  std::vector<torch::Tensor>& scratch(size_t slot) {
    if (scratch_.size() <= slot) scratch_.resize(slot + 1);
    auto& set = scratch_[slot];
    if (set.size() != s.size()) {
      set.clear();
      for (const auto& t : s) set.push_back(torch::empty_like(t));
    }
    return set;
  }

  /// The curvature of the last layer's energy in s_L when it is the quadratic
  /// ½‖s_L − f_L‖² + β‖s_L − y‖² (MSE nudging, no ops after the last layer): 1 + 2β; 0 otherwise.
  double last_curvature(double beta) const {
    if (nudging_.loss != Loss::MSE || !chain_->post.empty()) return 0;
    return 1 + 2 * beta;
  }

 private:
  bool matches(const torch::Tensor& x) const { return chain_ != nullptr && fits(*chain_, x); }

  // δ_L += β·∂C/∂s_L, with ∂C/∂ŷ = 2(ŷ − y) (MSE), softmax(ŷ) − ỹ (CE) or −y (NLL) taken back
  // through the post ops.
  void nudge(double beta) {
    const size_t L = s.size();
    SegmentTape& last = tape[L - 1];
    torch::Tensor out = s[L - 1];
    torch::Tensor leaf;
    if (!chain_->post.empty()) {
      if (analytic_) {
        for (size_t j = 0; j < chain_->post.size(); ++j) out = chain_->post[j].forward(out, post_tape[j]);
      } else {
        torch::AutoGradMode grad_mode(true);
        leaf = s[L - 1].detach().requires_grad_(true);
        out = leaf;
        for (size_t j = 0; j < chain_->post.size(); ++j)
          out = chain_->post[j].forward(out, static_cast<const OpTape&>(post_tape[j]));
      }
    }
    out_ = out.detach();
    torch::Tensor grad;
    double scale = beta;
    if (nudging_.loss == Loss::MSE) {
      at::sub_out(diff_, out_, y_);
      grad = diff_;
      scale = 2 * beta;  // ∂C/∂ŷ = 2(ŷ − y)
    } else if (nudging_.loss == Loss::NLL) {
      at::neg_out(dcost_, y_);
      grad = dcost_;
    } else {
      at::_softmax_out(dcost_, out_, 1, false);
      dcost_.sub_(y_);
      grad = dcost_;
    }
    if (!chain_->post.empty()) {
      if (leaf.defined()) {
        grad = torch::autograd::grad({out}, {leaf}, {grad})[0];
      } else {
        std::vector<torch::Tensor> ins(chain_->post.size());
        torch::Tensor h = s[L - 1];
        for (size_t j = 0; j < chain_->post.size(); ++j) {
          ins[j] = h;
          const Op& op = chain_->post[j];
          h = op.kind == OpKind::Dropout ? h : op.kind == OpKind::Flatten ? h.flatten(op.start_dim, op.end_dim) : post_tape[j].out;
        }
        for (size_t j = chain_->post.size(); j-- > 0;) grad = chain_->post[j].vjp(grad, ins[j], post_tape[j]);
      }
    }
    if (last.delta.is_same(last.eps)) {
      if (!nudged_.defined() || nudged_.sizes() != last.eps.sizes()) nudged_ = torch::empty_like(last.eps);
      at::add_out(nudged_, last.eps, grad, scale);
      last.delta = nudged_;
    } else {
      last.delta = last.delta + scale * grad;
    }
  }

  // A module run through its forward keeps its feedforward input when it has buffers to commit.
  static void keep_input(const Op& op, const torch::Tensor& in, OpTape& t) {
    t.ff_in = op.kind == OpKind::Module && op.call.stateful ? in.clone() : torch::Tensor();
  }

  // One forward of a module in train mode at its feedforward input, its buffers saved first.
  static void commit_module(const AutogradModule& m, const torch::Tensor& in, std::vector<torch::Tensor>& saved) {
    saved.clear();
    if (!m.stateful || !in.defined() || !m.module->is_training()) return;
    for (const auto& b : m.module->buffers()) saved.push_back(b.clone());
    m.call(in);
  }
  static void undo_module(const AutogradModule& m, std::vector<torch::Tensor>& saved) {
    if (saved.empty()) return;
    auto buffers = m.module->buffers();
    for (size_t i = 0; i < saved.size() && i < buffers.size(); ++i) buffers[i].copy_(saved[i]);
    saved.clear();
  }

  void freeze(const Op& op, const torch::Tensor& in, OpTape& t) const {
    if (op.kind != OpKind::BatchNorm) return;
    auto update = [&](auto& bn) {
      const bool batch_stats = bn.is_training() || !bn.running_mean.defined();
      if (batch_stats) {
        std::vector<int64_t> dims{0};
        for (int64_t d = 2; d < in.dim(); ++d) dims.push_back(d);
        t.mean = in.mean(dims);
        t.var = in.var(dims, /*unbiased=*/false);
        t.count = bn.is_training() && bn.options.track_running_stats() && bn.running_mean.defined()
                      ? in.numel() / in.size(1) : 0;
      } else {
        t.mean = bn.running_mean.clone(), t.var = bn.running_var.clone(), t.count = 0;
      }
      auto rstd = (t.var + op.norm_eps).rsqrt();
      t.scale = op.weight.defined() ? rstd * op.weight : rstd;
      t.shift = op.bias.defined() ? op.bias - t.mean * t.scale : -t.mean * t.scale;
    };
    if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(op.module)) update(*bn);
    if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(op.module)) update(*bn);
  }

  const Chain* chain_ = nullptr;
  Nudging nudging_;
  bool analytic_ = true;
  bool tapes_at_ff_ = false;
  std::vector<int64_t> shape_;
  torch::TensorOptions options_;
  torch::Tensor y_, out_, diff_, dcost_, nudged_, kl_, rows_, row_, total_, sq_out_;
  std::vector<torch::Tensor> sq_;
  std::deque<std::vector<torch::Tensor>> scratch_;  // a deque: references stay valid as slots are added
};

}  // namespace mep
