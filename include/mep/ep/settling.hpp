#pragma once
/// \file settling.hpp
/// Settling: from the feedforward states, move the states s_1..s_L (s_0 = x fixed) to a
/// minimum of the energy E(s; θ, β) of ep/energy.hpp. How is a policy type, the `Settling`
/// parameter of the EP gradient (ep/gradient.hpp):
///
///   ep/layer_sweep.hpp  LayerSweep — top-down block-coordinate sweeps (the default)
///   ep/heavy_ball.hpp   HeavyBall  — gradient descent with momentum (the reference's rule)
///
/// A policy is a value with `PhaseReport settle(States&, double beta) const`; it sees the
/// workspace only through `States`, the interface below. Every policy takes the same options
/// (`SettleOptions`, with its own defaults), stops early by the same rule and reports what it
/// did in a `PhaseReport`:
///
///   stop when |ΔE| < tol·max(1, |E|) for `patience` consecutive checks   (tol = 0: never)
///
/// where the energy is read on the host every `check_every` steps (0: every step when the
/// states are on the CPU, where reading is free, and every `kGpuCheckEvery` steps on other
/// devices, so that the loop does not wait on the device at each step; settling then stops
/// at the first check after the rule was met). HeavyBall's adaptive mode takes its
/// accept-or-undo decisions on the device when check_every > 1; LayerSweep's reads the
/// energy after every sweep. These are the only host reads of settling: with tol = 0 and
/// adaptive off (LayerSweep's defaults) it reads nothing, and its report (energy, residual)
/// stays on the device until read. A non-finite energy seen at a check stops settling and
/// is recorded in the report; the gradient then reports the step invalid, and its `compute`
/// throws SettleError naming the step (or the check after it), with nothing written.

#include <mep/ep/energy.hpp>
#include <mep/options.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace mep {

/// Thrown when settling diverges (non-finite energy).
class SettleError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// What settling did in one phase (one value of β). The energy and the residual stay on the
/// device until read: `energy()` and `residual()` read them on the host (one sync each on a
/// GPU); reading nothing costs nothing.
struct PhaseReport {
  double beta = 0;
  int64_t steps = 0;        ///< steps (or sweeps) taken
  bool converged = false;   ///< whether the stopping rule was met
  /// Σ_b E_b at the final states (0-dim, on the states' device), over `batch` samples.
  torch::Tensor total;
  int64_t batch = 1;
  /// [‖∂E/∂s‖², ‖s‖²] over all states and samples at the final states (float64, on the device).
  torch::Tensor norms;
  /// A non-finite energy seen on the host during settling (tol > 0 or adaptive checks): the
  /// step it was seen after (−1: none) and its value; settling stopped there.
  int64_t diverged_step = -1;
  double diverged_energy = 0;

  /// Batch-mean energy at the final states (reads the device).
  double energy() const { return total.defined() ? total.item<double>() / static_cast<double>(batch) : 0.0; }
  /// ‖∂E/∂s‖ / ‖s‖ over all states and samples at the final states (reads the device).
  double residual() const {
    if (!norms.defined()) return 0.0;
    auto both = norms.cpu();
    const double n = both[0].item<double>(), d = both[1].item<double>();
    return d > 0 ? std::sqrt(n / d) : std::sqrt(n);
  }
};

/// What settling did in one EP step: one report per nudged phase (two when symmetric).
/// `steps()` and `converged()` are known on the host; `residual()` and `energy()` read the
/// device.
struct SettleReport {
  std::vector<PhaseReport> phases;

  int64_t steps() const {
    int64_t n = 0;
    for (const auto& p : phases) n += p.steps;
    return n;
  }
  double residual() const {
    double r = 0;
    for (const auto& p : phases) r = std::max(r, p.residual());
    return r;
  }
  bool converged() const {
    for (const auto& p : phases)
      if (!p.converged) return false;
    return !phases.empty();
  }
  double energy() const { return phases.empty() ? 0.0 : phases.front().energy(); }
};

/// The options every settling policy takes; `Defaults` gives the policy's values.
template <class Derived, class Defaults>
struct SettleOptions {
  MEP_ARG(int64_t, settle_steps, Defaults::steps)
  MEP_ARG(double, settle_lr, Defaults::lr)
  /// Early stopping: |ΔE| < tol·max(1, |E|) for `patience` checks (0: never). tol > 0 reads
  /// the energy on the host once per check (every `check_every` steps): one device sync each
  /// on a GPU. With tol = 0 and adaptive off, settling reads nothing on the host.
  MEP_ARG(double, tol, Defaults::tol)
  MEP_ARG(int64_t, patience, Defaults::patience)
  /// Undo a step that raised the energy and shrink the step size. Reads the energy on the
  /// host once per check (HeavyBall: every `check_every` steps, its decisions taken on the
  /// device in between when check_every > 1; LayerSweep: after every sweep).
  MEP_ARG(bool, adaptive, Defaults::adaptive)
  /// Steps between the host reads of tol > 0 / adaptive mode (0: every step on the CPU,
  /// kGpuCheckEvery elsewhere).
  MEP_ARG(int64_t, check_every, 0)

  void validate() const {
    MEP_CHECK_OPTION(settle_steps_ > 0, "settle_steps", settle_steps_, "a value > 0");
    MEP_CHECK_OPTION(settle_lr_ > 0 && std::isfinite(settle_lr_), "settle_lr", settle_lr_, "a finite value > 0");
    MEP_CHECK_OPTION(tol_ >= 0 && std::isfinite(tol_), "tol", tol_, "a finite value >= 0 (0: never stop early)");
    MEP_CHECK_OPTION(patience_ >= 1, "patience", patience_, "a value >= 1");
    MEP_CHECK_OPTION(check_every_ >= 0, "check_every", check_every_, "a value >= 0 (0: automatic)");
  }
  template <class V>
  void visit_options(V&& v) const {
    v("settle_steps", settle_steps_), v("settle_lr", settle_lr_), v("tol", tol_), v("patience", patience_);
    v("adaptive", adaptive_), v("check_every", check_every_);
  }
  template <class V>
  static void visit_option_docs(V&& v) {
    v("settle_steps", "at most this many settling steps per phase (LayerSweep: sweeps over the layers)");
    v("settle_lr", "settling step size η: HeavyBall s ← s − η·v; LayerSweep s_l ← s_l − η·ρ_l·∂E/∂s_l "
                   "(η = 1: each layer's fixed point)");
    v("tol", "stop when |ΔE| < tol·max(1, |E|) for `patience` consecutive checks (0: never; > 0 reads the energy "
             "on the host at every check)");
    v("patience", "consecutive checks the tol rule must hold before settling stops");
    v("adaptive", "undo a step that raised the energy and halve η (HeavyBall also grows η by 1.1 after an "
                  "accepted step, up to 10 times its start); reads the energy on the host at every check");
    v("check_every", "steps between the host reads of tol > 0 and adaptive mode (0: every step on the CPU, every "
                     "kGpuCheckEvery = 8 on other devices)");
  }
};

/// The settling options as a value, read from any options type that has them.
struct SettleConfig {
  int64_t steps = 0;
  double lr = 0;
  double tol = 0;
  int64_t patience = 1;
  bool adaptive = false;
  int64_t check_every = 0;

  template <class O>
  static SettleConfig from(const O& o) {
    return {o.settle_steps(), o.settle_lr(), o.tol(), o.patience(), o.adaptive(), o.check_every()};
  }
};

/// What every settling policy holds: its options as a value, with `Defaults` (a struct of
/// constants steps, lr, tol, patience, adaptive: the policy's one table of defaults) for a
/// default-constructed policy.
template <class Defaults>
struct SettlingPolicy {
  template <class Derived>
  using Options = SettleOptions<Derived, Defaults>;

  struct DefaultOptions : Options<DefaultOptions> {};
  SettleConfig config = SettleConfig::from(DefaultOptions());

  SettlingPolicy() = default;
  template <class O>
  explicit SettlingPolicy(const O& o) : config(SettleConfig::from(o)) {}
};

/// What a settling policy sees of the workspace: the states it moves, their gradients, and
/// the energy's functions (ep/energy.hpp). Policies change the workspace only through it.
class States {
 public:
  explicit States(Workspace& ws) : ws_(ws) {}

  size_t size() const { return ws_.size(); }
  int64_t batch() const { return ws_.batch(); }
  /// The states s_1..s_L, moved in place by the policy.
  std::vector<torch::Tensor>& s() { return ws_.s; }
  /// ∂E/∂s_l after `evaluate` (a policy may put back a saved copy).
  std::vector<torch::Tensor>& dE_ds() { return ws_.dE_ds; }

  /// s ← the feedforward states.
  void start() { energy::start(ws_); }
  /// Whether the segments' predictions still describe the feedforward states (every ε_l = 0).
  bool at_feedforward() const { return ws_.at_feedforward; }
  /// The segments' predictions at the current states.
  void forward() { energy::forward(ws_); }
  /// The errors at the current predictions (the energy's terms).
  void errors(double beta) { energy::errors(ws_, beta); }
  /// ∂E/∂s of every state at the current states.
  void evaluate(double beta) { energy::evaluate(ws_, beta); }
  /// Σ_b E_b (after errors), on the device; its batch mean on the host; the residual.
  const torch::Tensor& total(double beta) { return energy::total(ws_, beta); }
  double mean(double beta) { return energy::mean(ws_, beta); }
  /// [‖∂E/∂s‖², ‖s‖²] on the device (after evaluate).
  torch::Tensor residual_norms() { return energy::residual_norms(ws_); }
  /// total(beta) as a new tensor (what a report keeps).
  torch::Tensor total_value(double beta) { return energy::total_value(ws_, beta); }

  /// ∂E/∂s_l with the neighbours' latest states, for block-coordinate sweeps from the top:
  /// needs segment l+1's prediction at the current s_l (δ_L alone for the last layer).
  const torch::Tensor& layer_gradient(size_t l, double beta) {
    if (l + 1 == size()) {
      energy::errors(ws_, l, beta);
      return ws_.tape[l].delta;
    }
    energy::errors(ws_, l + 1, 0.0);  // ε_{l+1} at the new s_{l+1}
    energy::backproject(ws_, l + 1);
    energy::errors(ws_, l, beta);
    return energy::state_gradient(ws_, l);
  }
  /// The curvature of the last layer's energy when it is quadratic (0 otherwise).
  double last_curvature(double beta) const { return energy::last_curvature(ws_, beta); }
  /// An estimate of ‖J_l‖₂ for segment l ≥ 1, and whether it comes through autograd.
  torch::Tensor jacobian_norm(size_t l, int64_t iters) const { return energy::jacobian_norm(ws_, l, iters); }
  bool autograd_jacobian(size_t l) const { return ws_.chain->segments[l].autograd_jacobian(); }

  /// A named set of buffers shaped like the states (Scratch), allocated on first use.
  std::vector<torch::Tensor>& scratch(std::vector<torch::Tensor> Scratch::*set) {
    auto& buffers = ws_.scratch.*set;
    if (buffers.size() != ws_.s.size()) {
      buffers.clear();
      for (const auto& t : ws_.s) buffers.push_back(torch::empty_like(t));
    }
    return buffers;
  }

 private:
  Workspace& ws_;
};

/// Energy reads off the CPU, every this many steps, when check_every = 0.
constexpr int64_t kGpuCheckEvery = 8;

namespace detail {

/// The stopping rule of every policy, fed with the energy at each check.
class StopRule {
 public:
  StopRule(const SettleConfig& c, const torch::Tensor& like)
      : tol_(c.tol),
        patience_(std::max<int64_t>(c.patience, 1)),
        every_(c.check_every > 0 ? c.check_every : like.is_cpu() ? 1 : kGpuCheckEvery),
        watch_(c.adaptive || c.tol > 0) {}

  /// Whether the energy is read after step k (of `steps`).
  bool check_at(int64_t k, int64_t steps) const { return watch_ && (k % every_ == 0 || k == steps); }
  bool watching() const { return watch_; }
  int64_t every() const { return every_; }

  /// Feeds the energy E of a check; true once the rule is met.
  bool met(double previous, double next) {
    const bool small = tol_ > 0 && std::abs(next - previous) < tol_ * std::max(1.0, std::abs(previous));
    calm_ = small ? calm_ + 1 : 0;
    return calm_ >= patience_;
  }
  void reset_calm() { calm_ = 0; }

 private:
  double tol_;
  int64_t patience_, every_;
  bool watch_;
  int64_t calm_ = 0;
};

inline void check_finite_energy(double energy, int64_t step, double beta) {
  if (std::isfinite(energy)) return;
  std::ostringstream os;
  os << "mep: settling diverged at step " << step << " (beta = " << beta << ", energy = " << energy
     << "); lower settle_lr or beta. No gradient or parameter was changed";
  throw SettleError(os.str());
}

/// Whether an energy read on the host during settling is finite; if not, records it in `r`
/// (the policy then stops settling: the gradient reports the divergence, ep/gradient.hpp).
inline bool finite_energy(double energy, int64_t step, PhaseReport& r) {
  if (std::isfinite(energy)) return true;
  r.diverged_step = step;
  r.diverged_energy = energy;
  return false;
}

/// The report of a settled phase: energy and residual at the final states (after
/// evaluate(beta)), left on the device. `r` may hold a divergence seen during settling.
inline PhaseReport finish(States& e, double beta, int64_t steps, bool converged, PhaseReport r = {}) {
  r.beta = beta;
  r.steps = steps;
  r.converged = converged;
  r.total = e.total_value(beta);
  r.batch = e.batch();
  r.norms = e.residual_norms();
  return r;
}

/// Throws the SettleError of a phase whose energy is not finite (reads the device; the
/// failure path of the gradient).
inline void throw_if_diverged(const PhaseReport& r) {
  if (r.diverged_step >= 0) check_finite_energy(r.diverged_energy, r.diverged_step, r.beta);
  if (r.total.defined()) check_finite_energy(r.energy(), r.steps, r.beta);
}

}  // namespace detail
}  // namespace mep

