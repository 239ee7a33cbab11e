#pragma once
/// \file gradient.hpp
/// Equilibrium Propagation gradient (Scellier & Bengio 2017; symmetric variant: Laborieux
/// et al. 2021). Settle from the feedforward states (ep/feedforward.hpp) at +β (and −β)
/// with the `Settling` policy (ep/settling.hpp), then
///
///   one-sided:  g_θ = [∂_θE(s^β) − ∂_θE(s^0)] / β          (bias O(β))
///   symmetric:  g_θ = [∂_θE(s^{+β}) − ∂_θE(s^{−β})] / (2β)  (bias O(β²))
///
/// with ∂_θE = mean_b −(∂f_l/∂θ)ᵀ·ε_l (ep/energy.hpp). The free phase is exact at the
/// feedforward states (every ε_l = 0, so ∂_θE(s^0) = 0) and is skipped unless
/// `free_phase(true)`. As β → 0 with converged settling, g → ∇_θ mean_b C(ŷ_b, y_b).
/// Since E is a sum of layer terms, each layer's gradient uses only its own input and output
/// states (layer-local EP). Linear layers take the Hebbian outer product −ε_lᵀ·in_l;
/// convolutions ATen's weight gradient kernel; norms inside a segment their affine gradient
/// at the VJP reaching them; norms after the last layer the gradient of the loss on the
/// nudged output; a segment with a module run through its forward (ep/autograd_module.hpp)
/// autograd's −(∂f_l/∂θ)ᵀ·ε_l on a forward recomputed from the settled s_{l−1}, those
/// modules in eval mode for the whole step.
///
/// `bind(model)` reads the model's chain (ep/chain.hpp) and checks it against the loss
/// (energy::check_output); a chain EP cannot use is a ChainError there, naming the module
/// and its position. The optimizers call it when they are built, and `compute` on the first
/// call for another model.
///
/// The gradient owns two workspaces, one per batch shape last seen (the full batches and an
/// epoch's last one), reallocated only for a third shape. `compute` overwrites `.grad()` and
/// returns the loss at the feedforward prediction; on any error (bad input or target,
/// diverged settling) no gradient, parameter or BatchNorm statistic has changed. `report()`
/// says what settling did.
///
/// `compute_deferred` is the same step without any host read of a tensor value (the
/// optimizers' path): the checks of values that `compute` throws for (a non-finite input,
/// output or float target, a class index out of range, a diverged settling) are folded into
/// `valid()`, a 0-dim bool tensor on the device, and `throw_if_invalid()` throws what
/// `compute` would have. Checks of shapes, dtypes and devices (host metadata) still throw at
/// once. Class indices are clamped into range before any indexing, so that a bad label never
/// reads out of bounds (no device assert). Settling with tol > 0 or adaptive mode reads the
/// energy on the host once per check (ep/settling.hpp); the default settling reads nothing.

#include <mep/ep/chain.hpp>
#include <mep/ep/energy.hpp>
#include <mep/ep/feedforward.hpp>
#include <mep/ep/heavy_ball.hpp>
#include <mep/ep/layer_sweep.hpp>
#include <mep/ep/settling.hpp>
#include <mep/gradient/backprop.hpp>
#include <mep/loss.hpp>
#include <mep/options.hpp>

#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <sstream>
#include <utility>
#include <vector>

namespace mep {

/// How an EP-family optimizer gets its gradient: EP (default), or autograd backprop of
/// the same loss, for comparisons on the same optimizer (the reference's SMEP `mode`).
enum class Mode { EP, Backprop };

/// The names of the modes in options set by name and in records.
inline const std::vector<std::pair<Mode, const char*>>& enum_names(Mode) {
  static const std::vector<std::pair<Mode, const char*>> names = {{Mode::EP, "ep"}, {Mode::Backprop, "backprop"}};
  return names;
}

namespace detail {

/// Options of the EP gradient other than settling.
template <class Derived>
struct EPOptionsBase {
  MEP_ARG(double, beta, 0.5)
  MEP_ARG(bool, symmetric, false)
  MEP_ARG(bool, free_phase, false)
  MEP_ARG(bool, analytic, true)
  MEP_ARG(Loss, loss, Loss::MSE)
  MEP_ARG(double, label_smoothing, 0.1)
  MEP_ARG(double, temperature, 1.0)
  MEP_ARG(Mode, mode, Mode::EP)

  void validate() const {
    MEP_CHECK_OPTION(beta_ > 0 && beta_ <= 1, "beta", beta_, "a value in (0, 1]");
    MEP_CHECK_OPTION(label_smoothing_ >= 0 && label_smoothing_ < 1, "label_smoothing", label_smoothing_,
                     "a value in [0, 1)");
    MEP_CHECK_OPTION(temperature_ > 0 && std::isfinite(temperature_), "temperature", temperature_, "a finite value > 0");
    MEP_CHECK_ENUM_OPTION(loss_, "loss");
    MEP_CHECK_ENUM_OPTION(mode_, "mode");
  }
  template <class V>
  void visit_options(V&& v) const {
    v("beta", beta_), v("symmetric", symmetric_), v("free_phase", free_phase_), v("analytic", analytic_);
    v("loss", loss_), v("label_smoothing", label_smoothing_), v("temperature", temperature_), v("mode", mode_);
  }
  template <class V>
  static void visit_option_docs(V&& v) {
    v("beta", "nudging strength β of E = Σ_i ½‖s_i − f_i‖² + β·C(s_L, y); one-sided g = [∂_θE(s^β) − ∂_θE(s^0)] / β");
    v("symmetric", "settle at +β and −β: g = [∂_θE(s^{+β}) − ∂_θE(s^{−β})] / (2β), bias O(β²) instead of O(β), "
                   "twice the settling");
    v("free_phase", "settle the free phase (β = 0) too, instead of taking the feedforward states, where it is "
                    "already at equilibrium (same gradient, more work; one-sided only)");
    v("analytic", "analytic VJPs and layer gradients where a segment has them; false: autograd everywhere");
    v("loss", "the cost C of the nudging and the loss EP approximates: mse, C = ‖s_L − y‖² (one-hot y); ce, "
              "cross-entropy, the last layer's term a KL divergence; nll, for log-probabilities");
    v("label_smoothing", "ce only: the target y·(1 − ε) + ε/K for K classes, ε = label_smoothing");
    v("temperature", "ce only: T of the last layer's term KL(softmax(f_L/T) ‖ softmax(s_L/T))");
    v("mode", "ep: the EP gradient; backprop: autograd's gradient of the same loss, for comparisons on the same "
              "optimizer");
  }
};

/// Checks the input against the model's parameters before any work (a first layer run
/// through its forward may take integer input, an Embedding's indices).
inline void check_input(const torch::Tensor& x, const Chain& chain) {
  if (!x.defined()) throw std::invalid_argument("mep: input is undefined");
  const Segment& first = chain.segments[0];
  const auto w = first.reference_parameter();
  if (x.dim() < 2 || x.size(0) == 0) {
    std::ostringstream os;
    os << "mep: input must be a non-empty batch [B, ...], got shape " << x.sizes();
    throw std::invalid_argument(os.str());
  }
  const bool typed = first.kind != LayerKind::Module || x.is_floating_point();
  if ((typed && x.scalar_type() != w.scalar_type()) || x.device() != w.device()) {
    std::ostringstream os;
    os << "mep: input is " << x.scalar_type() << " on " << x.device() << " but the model's parameters are "
       << w.scalar_type() << " on " << w.device();
    throw std::invalid_argument(os.str());
  }
}

/// A non-finite feedforward output means a non-finite input or parameter (NaN and inf
/// propagate through every layer); checking the small output is cheaper than the input.
/// Throws saying which (reads the device: the failure path).
inline void check_finite_output(const torch::Tensor& out, const torch::Tensor& x, const Chain& chain) {
  if (torch::isfinite(out).all().item<bool>()) return;
  if (!torch::isfinite(x).all().item<bool>()) throw std::invalid_argument("mep: input contains NaN or infinite values");
  for (const auto& p : chain.parameters())
    if (!torch::isfinite(p).all().item<bool>())
      throw std::invalid_argument("mep: a model parameter contains NaN or infinite values");
  throw std::invalid_argument("mep: the feedforward output overflows (non-finite) for this input");
}

/// `t` as a buffer for a value shaped and typed like `p` (reused when it fits).
inline torch::Tensor& fitted(torch::Tensor& t, const torch::Tensor& p) {
  if (!t.defined() || t.sizes() != p.sizes() || !t.options().type_equal(p.options()) || !t.is_contiguous())
    t = torch::empty_like(p, torch::MemoryFormat::Contiguous);
  return t;
}

/// xᵀ for a 2-D x, from `cache` when it holds that view already (made again otherwise).
inline const torch::Tensor& transposed(torch::Tensor& cache, const torch::Tensor& x) {
  if (!cache.defined() || cache.data_ptr() != x.data_ptr() || cache.dim() != 2 || cache.size(0) != x.size(1) ||
      cache.size(1) != x.size(0) || cache.stride(0) != x.stride(1) || cache.stride(1) != x.stride(0) ||
      !cache.options().type_equal(x.options()))
    cache = x.t();
  return cache;
}

/// c as a 0-dim tensor of p's dtype on p's device, kept in `cache` while c, the dtype and
/// the device stay the same, for float32 and float64 parameters: a product with it is the
/// product with the number c (which ATen rounds to p's dtype first, in a cast of its own).
/// Undefined for other dtypes, whose products take c unrounded in float32: take c itself.
inline const torch::Tensor& scale_tensor(ScaleCache& cache, double c, const torch::Tensor& p) {
  static const torch::Tensor none;
  if (p.scalar_type() != torch::kFloat && p.scalar_type() != torch::kDouble) return none;
  for (auto& [value, t] : cache.scales)
    if (value == c && t.options().type_equal(p.options()) && t.device() == p.device()) return t;
  if (cache.scales.size() >= 4) cache.scales.clear();
  cache.scales.emplace_back(c, torch::full({}, c, p.options()));
  return cache.scales.back().second;
}

/// out = c·v, with c from `scale_tensor` where it gives one.
inline void scaled(torch::Tensor& out, const torch::Tensor& v, double c, const torch::Tensor& s) {
  if (s.defined()) at::mul_out(out, v, s);
  else at::mul_out(out, v, c);
}

/// v in p's shape (v itself when it has it).
inline torch::Tensor shaped(const torch::Tensor& v, const torch::Tensor& p) {
  return v.sizes() == p.sizes() ? v : v.reshape(p.sizes());
}

/// acc = c·v (first phase) or acc += c·v.
inline void accumulate(torch::Tensor& acc, const torch::Tensor& p, const torch::Tensor& v, double c, bool first,
                       ScaleCache& cache) {
  if (first) scaled(fitted(acc, p), shaped(v, p), c, scale_tensor(cache, c, p));
  else acc.add_(shaped(v, p), c);
}

/// The parameter gradients −c·(∂f_l/∂θ)ᵀ·ε_l of every segment at the settled states in
/// `ws`, added to (or, in the first phase, written into) `acc`, in Chain::parameters() order;
/// `x` is the batch (segment 1's input state).
class ParameterGradients {
 public:
  ParameterGradients(Workspace& ws, const torch::Tensor& x, std::vector<torch::Tensor>& acc, double c, bool first)
      : ws_(ws), x_(x), acc_(acc), c_(c), first_(first) {}

  void all() {
    const Chain& chain = *ws_.chain;
    for (size_t l = 0; l < chain.size(); ++l) {
      const Segment& seg = chain.segments[l];
      if (!seg.analytic()) {
        autograd(seg, l);
        continue;
      }
      bool norms = false;
      for (const auto& op : seg.pre) norms = norms || op.has_parameters();
      if (norms) norm_gradients(seg, l);
      layer(seg, ws_.tape[l]);
    }
  }

 private:
  const torch::Tensor& input_state(size_t l) const { return l == 0 ? x_ : ws_.s[l - 1]; }
  void add(const torch::Tensor& p, const torch::Tensor& v) { accumulate(acc_[i_++], p, v, c_, first_, ws_.scales); }

  void layer(const Segment& seg, const SegmentTape& t) {
    if (seg.kind == LayerKind::Linear && t.in.dim() == 2) {
      // Hebbian: −ε_lᵀ·in_l (written into the reused buffers: a fresh result per step
      // costs page faults that rival the product itself).
      auto& gw = fitted(acc_[i_++], seg.weight);
      at::addmm_out(gw, gw, transposed(t.eps_t, t.eps), t.in, /*beta=*/first_ ? 0.0 : 1.0, /*alpha=*/c_);
      if (seg.bias.defined()) {
        auto& gb = fitted(acc_[i_++], seg.bias);
        if (first_) at::sum_out(gb, t.eps, {0}), scaled(gb, gb, c_, scale_tensor(ws_.scales, c_, seg.bias));
        else gb.add_(t.eps.sum(0), c_);
      }
      return;
    }
    torch::Tensor gw, gb;
    if (seg.kind == LayerKind::Linear) {
      auto e = t.eps.reshape({-1, seg.weight.size(0)}), in = t.in.reshape({-1, seg.weight.size(1)});
      gw = torch::mm(e.t(), in);
      if (seg.bias.defined()) gb = e.sum(0);
    } else {
      const auto bias_sizes = seg.bias.defined() ? c10::optional<at::IntArrayRef>(seg.bias.sizes()) : c10::nullopt;
      auto r = at::convolution_backward(t.eps, t.in, seg.weight, bias_sizes, seg.stride, seg.padding, seg.dilation,
                                        false, std::vector<int64_t>(seg.stride.size(), 0), seg.groups,
                                        {false, true, seg.bias.defined()});
      gw = std::get<1>(r), gb = std::get<2>(r);
    }
    add(seg.weight, gw);
    if (seg.bias.defined()) add(seg.bias, gb);
  }

  // The norms among segment l's ops: the VJP of ε_l taken back to each, through the ops run
  // again at the settled input.
  void norm_gradients(const Segment& seg, size_t l) {
    SegmentTape& t = ws_.tape[l];
    std::vector<torch::Tensor> ins(seg.pre.size());
    torch::Tensor h = input_state(l);
    for (size_t j = 0; j < seg.pre.size(); ++j) ins[j] = h, h = seg.pre[j].forward(h, t.ops[j]);
    torch::Tensor unused;
    torch::Tensor g = seg.layer_vjp(t.eps, h, unused);
    std::vector<std::vector<torch::Tensor>> per_op(seg.pre.size());
    for (size_t j = seg.pre.size(); j-- > 0;) {
      seg.pre[j].parameter_gradients(g, ins[j], t.ops[j], per_op[j]);
      if (j > 0) g = seg.pre[j].vjp(g, ins[j], t.ops[j]);
    }
    for (size_t j = 0; j < seg.pre.size(); ++j) {
      const auto params = seg.pre[j].module->parameters();
      for (size_t k = 0; k < per_op[j].size(); ++k) add(params[k], per_op[j][k]);
    }
  }

  // A segment without an analytic form, ops and layer: autograd's (∂f_l/∂θ)ᵀ·ε_l on the
  // segment run again from the settled s_{l−1}. A parameter that does not require grad gets none.
  void autograd(const Segment& seg, size_t l) {
    const SegmentTape& t = ws_.tape[l];
    const auto params = seg.parameters();
    std::vector<torch::Tensor> wanted;
    for (const auto& p : params)
      if (p.requires_grad()) wanted.push_back(p);
    std::vector<torch::Tensor> grads;
    if (!wanted.empty()) {
      torch::AutoGradMode grad_mode(true);
      auto out = seg.apply(input_state(l).detach(), t.ops);
      if (out.requires_grad())
        grads = torch::autograd::grad({out}, wanted, {t.eps}, /*retain_graph=*/false, /*create_graph=*/false,
                                      /*allow_unused=*/true);
    }
    size_t k = 0;
    for (const auto& p : params) {
      auto& acc = acc_[i_++];
      if (!p.requires_grad()) {
        acc = torch::Tensor();
        continue;
      }
      auto g = k < grads.size() && grads[k].defined() ? grads[k] : torch::zeros_like(p);
      ++k;
      accumulate(acc, p, g, c_, first_ || !acc.defined(), ws_.scales);
    }
  }

  Workspace& ws_;
  const torch::Tensor& x_;
  std::vector<torch::Tensor>& acc_;
  double c_;
  bool first_;
  size_t i_ = 0;
};

}  // namespace detail

/// The EP gradient policy with settling policy `Settling`.
template <class Settling>
class BasicEPGradient {
 public:
  using SettlingPolicy = Settling;

  template <class Derived>
  struct Options : detail::EPOptionsBase<Derived>, Settling::template Options<Derived> {
    void validate() const {
      detail::EPOptionsBase<Derived>::validate();
      Settling::template Options<Derived>::validate();
    }
    template <class V>
    void visit_options(V&& v) const {
      detail::EPOptionsBase<Derived>::visit_options(v);
      Settling::template Options<Derived>::visit_options(v);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      detail::EPOptionsBase<Derived>::visit_option_docs(v);
      detail::visit_option_docs_of<typename Settling::template Options<Derived>>(v);
    }
  };

  BasicEPGradient() = default;
  template <class O>
  explicit BasicEPGradient(const O& o)
      : settling_(o), beta_(o.beta()), symmetric_(o.symmetric()), free_phase_(o.free_phase()), analytic_(o.analytic()),
        mode_(o.mode()) {
    o.validate();
    nudging_.loss = o.loss(), nudging_.label_smoothing = o.label_smoothing(), nudging_.temperature = o.temperature();
  }

  const Settling& settling() const noexcept { return settling_; }
  const Nudging& nudging() const noexcept { return nudging_; }
  double beta() const noexcept { return beta_; }
  /// What settling did in the last successful `compute` (empty in backprop mode). Its
  /// energies and residuals stay on the device until read (ep/settling.hpp).
  const SettleReport& report() const noexcept { return report_; }
  /// What the last `compute`/`compute_deferred` leaves for a check of the batch, without
  /// reading it: tensors that are all finite exactly when every check passed — the output,
  /// a float target, each phase's energy, and for class indices 1/[all in range] (1, or
  /// inf). The optimizer sums them with its own into its one check of the step.
  const std::vector<torch::Tensor>& checked() const noexcept { return checked_; }
  /// Whether every check of the last `compute`/`compute_deferred` passed (input, output and
  /// target finite, class indices in range, settling finite), from `checked()`: a 0-dim bool
  /// tensor on the model's device, not read here (undefined before the first call).
  torch::Tensor valid() const {
    torch::Tensor zero;
    for (const auto& t : checked_) {
      auto z = t.mul(0).sum();  // 0·v is 0 for a finite v and NaN otherwise
      zero = zero.defined() ? zero.add_(z) : z;
    }
    return zero.defined() ? zero.eq(0) : zero;
  }
  /// The workspace of the last `compute` (states, errors, tapes).
  const Workspace& workspace() const noexcept { return workspaces_[last_]; }

  /// Reads the chain of `model` and checks it against the loss, for the `compute` calls on
  /// it that follow. Throws ChainError for a model EP cannot use, naming the module and its
  /// position.
  void bind(const torch::nn::Sequential& model) { chain_for(model); }

  /// Takes back the last `compute`: `.grad()`, BatchNorm's running statistics and the report
  /// as they were before it (the optimizer calls it when its update fails).
  void undo() {
    if (!chain_ || !committed_) return;
    auto params = chain_->parameters();
    for (size_t i = 0; i < params.size(); ++i) std::swap(params[i].mutable_grad(), acc_[i]);
    undo_statistics(work());
    report_ = std::move(previous_report_);
    committed_ = false;
  }

  /// Overwrites `.grad()` of every parameter of `model` with the EP estimate of ∇L and
  /// returns L at the feedforward prediction. Throws for a bad input or target or a diverged
  /// settling, with nothing changed then: `compute_deferred`, one host read of `valid()`, and
  /// on failure `undo()` and `throw_if_invalid()`.
  torch::Tensor compute(const torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& target) {
    if (mode_ == Mode::Backprop) {  // checks the target on the host before writing .grad()
      Chain& chain = chain_for(model);
      detail::check_input(x, chain);
      report_ = {};
      auto loss = backprop_into_grads(model, chain.parameters(), x, target, nudging_.loss, nudging_.loss_smoothing());
      checked_ = {loss};
      backprop_last_ = true, last_x_ = x, last_target_ = target, last_output_ = torch::Tensor();
      return loss;
    }
    auto loss = compute_deferred(model, x, target);
    if (valid().template item<bool>()) return loss;
    undo();
    throw_if_invalid();
    throw SettleError("mep: the EP step failed a check that names no cause");  // not reached
  }

  /// Throws what `compute` would have thrown for the last `compute_deferred`'s batch (an
  /// std::invalid_argument for a non-finite input, parameter or output, a TargetError for a
  /// bad target, a SettleError for a diverged settling), or returns when `valid()` is true.
  /// Reads the device: the failure path.
  void throw_if_invalid() const {
    const auto ok = valid();
    if (!ok.defined() || ok.template item<bool>()) return;
    if (backprop_last_) {
      throw_if_bad_target_values(last_target_, last_output_shape_);
    } else {
      throw_if_bad_target_values(last_target_, last_output_shape_);
      detail::check_finite_output(last_output_, last_x_, *chain_);
      for (const auto& phase : attempt_.phases) detail::throw_if_diverged(phase);
    }
    throw SettleError("mep: the EP step failed a check that names no cause");
  }

  /// `compute` without any host read of a tensor value: writes `.grad()` and BatchNorm's
  /// statistics, sets `report()`, and returns L as a device tensor; the value checks that
  /// `compute` throws for are folded into `valid()` instead. On `valid()` false the caller
  /// calls `undo()` (and `throw_if_invalid()` to say why). Shape, dtype and device errors
  /// (host metadata) still throw, with nothing changed. In backprop mode, `undo()` does not
  /// restore `.grad()`.
  torch::Tensor compute_deferred(const torch::nn::Sequential& model, const torch::Tensor& x,
                                 const torch::Tensor& target) {
    Chain& chain = chain_for(model);
    if (mode_ == Mode::Backprop) {
      detail::check_input(x, chain);
      report_ = {};
      std::vector<int64_t> shape;
      torch::Tensor target_ok;
      auto loss = backprop_into_grads_deferred(model, chain.parameters(), x, target, nudging_.loss,
                                               nudging_.loss_smoothing(), target_ok, shape);
      checked_ = {target_ok.reciprocal()};  // 1, or inf for a bad target
      backprop_last_ = true, last_x_ = x, last_target_ = target, last_output_ = torch::Tensor();
      last_output_shape_ = std::move(shape);
      return loss;
    }
    torch::NoGradGuard no_grad;
    committed_ = false;
    detail::check_input(x, chain);
    select_workspace(chain, x);
    EvalMode eval(chain.autograd_modules);
    Workspace& ws = work();
    try {
      feedforward(ws, chain, nudging_, x, analytic_);
    } catch (const c10::Error& e) {
      std::ostringstream os;
      os << "mep: the input of shape " << x.sizes() << " does not fit the model (";
      if (chain.segments[0].kind == LayerKind::Module) os << "its first layer is " << chain.segments[0].block.where();
      else os << "its first layer's weight is " << chain.segments[0].weight.sizes();
      os << "): " << e.what_without_backtrace();
      throw std::invalid_argument(os.str());
    }
    check_target_shape(target, ws.output.sizes());
    const torch::Tensor safe = safe_target(target, ws.output.dim() == 2 ? ws.output.size(1) : 0);
    energy::set_target(ws, safe, /*in_range=*/true);

    std::vector<std::pair<double, double>> phases;  // (β_p, coef_p): g = Σ_p coef_p·∂_θE(s^{β_p})
    if (symmetric_) phases = {{beta_, 0.5 / beta_}, {-beta_, -0.5 / beta_}};
    else phases = {{beta_, 1.0 / beta_}};
    if (!symmetric_ && free_phase_) phases.push_back({0.0, -1.0 / beta_});

    SettleReport report;
    States states(ws);
    for (size_t p = 0; p < phases.size(); ++p) {
      report.phases.push_back(settling_.settle(states, phases[p].first));
      const double c = -phases[p].second / static_cast<double>(ws.batch());
      detail::ParameterGradients(ws, x, acc_, c, p == 0).all();
      if (p == 0) post_gradients(ws, safe);
    }
    // The checks, left on the device (see checked()).
    checked_ = {ws.output};
    if (target.scalar_type() == torch::kLong) checked_.push_back(safe.eq(target).all().reciprocal());
    else checked_.push_back(target);
    for (const auto& phase : report.phases) {
      checked_.push_back(phase.total);
      if (phase.diverged_step >= 0)  // seen on the host while settling
        checked_.push_back(torch::full({}, std::numeric_limits<double>::quiet_NaN(), ws.output.options()));
    }
    backprop_last_ = false, last_x_ = x, last_target_ = target, last_output_ = ws.output;
    last_output_shape_ = ws.output.sizes().vec();
    attempt_ = report;
    // The gradients, BatchNorm's statistics and the report are committed (undo() takes them back).
    eval.restore();
    auto params = chain.parameters();
    for (size_t i = 0; i < params.size(); ++i) std::swap(params[i].mutable_grad(), acc_[i]);
    commit_statistics(ws);
    previous_report_ = std::move(report_);
    report_ = std::move(report);
    committed_ = true;
    return energy::feedforward_loss(ws, safe);
  }

 private:
  Chain& chain_for(const torch::nn::Sequential& model) {
    if (model.is_empty()) throw ChainError("mep: the model is null");
    if (!chain_ || model.ptr() != model_.ptr()) {
      auto chain = std::make_unique<Chain>(Chain::from(model));
      energy::check_output(*chain, nudging_);
      chain_ = std::move(chain);
      model_ = model;  // held, so that its address cannot be reused by another model
      workspaces_[0] = Workspace(), workspaces_[1] = Workspace();
      acc_.assign(chain_->parameters().size(), torch::Tensor());
    }
    return *chain_;
  }

  // The workspace that fits x, or else the one not used last.
  void select_workspace(const Chain& chain, const torch::Tensor& x) {
    for (size_t i = 0; i < workspaces_.size(); ++i)
      if (fits(workspaces_[i], chain, x)) {
        last_ = i;
        return;
      }
    last_ = 1 - last_;
  }
  Workspace& work() { return workspaces_[last_]; }

  // Parameters of norms after the last layer: the gradient of the loss on the nudged output
  // of the first phase (autograd through the ops' functional forms).
  void post_gradients(const Workspace& ws, const torch::Tensor& target) {
    std::vector<torch::Tensor> params;
    for (const auto& op : chain_->post)
      for (const auto& p : op.module->parameters()) params.push_back(p);
    if (params.empty()) return;
    torch::AutoGradMode grad_mode(true);
    torch::Tensor h = ws.s.back().detach();
    for (size_t j = 0; j < chain_->post.size(); ++j) h = chain_->post[j].apply(h, ws.post_tape[j]);
    auto g = torch::autograd::grad({energy::loss(nudging_, h, target)}, params);
    for (size_t k = 0; k < g.size(); ++k) acc_[acc_.size() - g.size() + k] = g[k].detach();
  }

  Settling settling_;
  Nudging nudging_;
  double beta_ = 0.5;
  bool symmetric_ = false, free_phase_ = false, analytic_ = true;
  Mode mode_ = Mode::EP;
  std::unique_ptr<Chain> chain_;
  torch::nn::Sequential model_{nullptr};
  // Two workspaces, so that an epoch's last, smaller batch does not reallocate the one the
  // full batches use; last_ is the one of the current step.
  std::array<Workspace, 2> workspaces_;
  size_t last_ = 0;
  std::vector<torch::Tensor> acc_;  // the gradients being accumulated, swapped into .grad() on success
  SettleReport report_, previous_report_;
  bool committed_ = false;  // the last compute committed (undo() can take it back)
  // The checks of the last compute, and what throw_if_invalid needs to say which failed.
  std::vector<torch::Tensor> checked_;
  bool backprop_last_ = false;
  torch::Tensor last_x_, last_target_, last_output_;
  std::vector<int64_t> last_output_shape_;
  SettleReport attempt_;  // the last compute's report, kept by undo()
};

/// The settling policy EP uses unless told otherwise: the cheapest that reaches cos ≥ 0.99 to
/// the converged EP gradient on every benchmark model (README, "Settling").
using DefaultSettling = LayerSweep;

/// The EP gradient with the default settling (contract name).
using EPGradient = BasicEPGradient<DefaultSettling>;

/// Options of a stand-alone EP gradient: `mep::EPGradient ep(mep::EPGradientOptions().beta(1e-3));`
template <class Settling = DefaultSettling>
struct BasicEPGradientOptions : BasicEPGradient<Settling>::template Options<BasicEPGradientOptions<Settling>> {};
using EPGradientOptions = BasicEPGradientOptions<>;

}  // namespace mep
