#pragma once
/// \file optimizer.hpp
/// `mep::Optimizer<Gradient, Update, Constraint, Feedback, Defaults>`: one optimizer assembled
/// from four policies, with a preset's defaults. For each parameter W with gradient g:
///
///   g     ← g + λ·W                      (coupled weight decay, when Update asks for it)
///   g_aug = feedback.accumulate(g)
///   u     = update.direction(g_aug)
///   feedback.remember(g_aug, u)
///   m     ← μ·m + (1 − dampening)·u       (skipped when Update owns its moments: Adam, Muon, Dion)
///   W     ← W·(1 − lr·λ) − lr·s·m         (decoupled weight decay otherwise; s = update.lr_scale(W), or 1)
///   constraint.enforce(W)                (told whether W is the input layer's weight)
///
/// Policies (see each header for its rule and source):
///  - Gradient: `compute(model, x, target)` writes `.grad()` and returns the loss/energy;
///    an EP gradient also has `bind(model)`, which reads the model when the optimizer is built.
///  - Update: `direction(g, state)`, with `coupled_weight_decay` and `owns_momentum`; optionally
///    `lr_scale(W)`, `check_parameter(W, which)` (refuses a parameter it cannot update, at
///    construction) and `apply(W, g, lr, state)` (the whole step in the rounding of the
///    implementation it follows, used where no feedback needs u).
///  - Constraint: `enforce(W, state, input_layer)`.   - Feedback: `accumulate(g, state)`, `remember(g_aug, u, state)`.
/// Each contributes an options mixin `Policy::Options<Derived>` to OptimizerOptions; `Defaults`
/// (options.hpp) names the preset and sets its defaults.
///
/// The class derives from `torch::optim::Optimizer`: parameter groups (lr, weight_decay, and
/// momentum, dampening and nesterov where the optimizer applies momentum, may differ per
/// group), zero_grad, and `torch::save(opt, path)` / `torch::load(opt, path)` of the full state.
/// A step either updates every parameter or none: non-finite gradients are rejected
/// before anything is written, and an update that throws (a failed Cholesky or QR) or leaves
/// a non-finite parameter is rolled back — parameters, their state, and for the EP family
/// `.grad()` and BatchNorm's running statistics. Where the update cannot throw and its
/// results are bounded by its inputs (a direction with `direction_bound`, no constraint, no
/// feedback: SGD, Adam, EqProp), the step first bounds every value it will write from the
/// ranges of the gradients, the parameters and the state; when that bound is
/// finite for the dtype nothing can fail, and the update runs in place without the copies
/// a rollback needs (an out-of-memory error inside it is then not rolled back).
/// With `options.process_group(group)` the gradients are averaged over the group's ranks
/// before the update (data_parallel.hpp).

#include <mep/constraint/none.hpp>
#include <mep/ep/chain.hpp>
#include <mep/feedback/none.hpp>
#include <mep/options.hpp>
#include <mep/state.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>
#include <type_traits>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace mep {

namespace detail {
template <class G, class = void>
struct has_undo : std::false_type {};
template <class G>
struct has_undo<G, std::void_t<decltype(std::declval<G&>().undo())>> : std::true_type {};
template <class O, class = void>
struct has_skip_nonfinite : std::false_type {};
template <class O>
struct has_skip_nonfinite<O, std::void_t<decltype(std::declval<const O&>().skip_nonfinite())>> : std::true_type {};
template <class U, class = void>
struct has_averages_factors_of : std::false_type {};
template <class U>
struct has_averages_factors_of<U, std::void_t<decltype(&U::averages_factors_of)>> : std::true_type {};
template <class U, class = void>
struct has_check_parameter : std::false_type {};
template <class U>
struct has_check_parameter<U, std::void_t<decltype(&U::check_parameter)>> : std::true_type {};
template <class U, class = void>
struct has_lr_scale : std::false_type {};
template <class U>
struct has_lr_scale<U, std::void_t<decltype(&U::lr_scale)>> : std::true_type {};
template <class U, class = void>
struct has_apply : std::false_type {};
template <class U>
struct has_apply<U, std::void_t<decltype(&U::apply)>> : std::true_type {};
// Whether the update has `apply` and wants it used (Adam; not the reference's rounding).
template <class U>
constexpr bool rounds_as_torch() {
  if constexpr (has_apply<U>::value) return U::torch_rounding;
  else return false;
}
template <class G, class = void>
struct has_bind : std::false_type {};
template <class G>
struct has_bind<G, std::void_t<decltype(std::declval<G&>().bind(std::declval<const torch::nn::Sequential&>()))>>
    : std::true_type {};
template <class O, class = void>
struct has_mode_option : std::false_type {};
template <class O>
struct has_mode_option<O, std::void_t<decltype(std::declval<const O&>().mode())>> : std::true_type {};
template <class U, class = void>
struct has_direction_bound : std::false_type {};
template <class U>
struct has_direction_bound<U, std::void_t<decltype(&U::direction_bound)>> : std::true_type {};

// The largest finite value of float and double; 0 for the other dtypes (their steps take
// the transactional path).
inline double dtype_max(c10::ScalarType t) {
  if (t == c10::ScalarType::Float) return std::numeric_limits<float>::max();
  if (t == c10::ScalarType::Double) return std::numeric_limits<double>::max();
  return 0.0;
}
}  // namespace detail

template <class Gradient, class Update, class Constraint, class Feedback, class Defaults = ComposedDefaults>
class Optimizer : public torch::optim::Optimizer {
 public:
  using Options = OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>;
  using GradientPolicy = Gradient;
  using UpdatePolicy = Update;
  using ConstraintPolicy = Constraint;
  using FeedbackPolicy = Feedback;

  /// Backprop-style use: optimizes `params`, gradients come from the user's `backward()`.
  /// An EP preset needs the model instead, unless its options select `Mode::Backprop`.
  Optimizer(std::vector<torch::Tensor> params, const Options& options = Options())
      : Optimizer(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
                  options) {}

  /// Parameter groups, each with optional options of this optimizer's Options type.
  Optimizer(std::vector<torch::optim::OptimizerParamGroup> groups, const Options& options)
      : Optimizer(Policies{}, options) {
    if constexpr (detail::has_mode_option<Options>::value) {
      using Mode = std::decay_t<decltype(options.mode())>;
      if (options.mode() != Mode::Backprop)
        throw OptionError(std::string("mep: ") + Defaults::name +
                          " computes EP gradients, which need the model: construct it from the model (a "
                          "torch::nn::Sequential, or mep::listing(net, layers) for your own Module), not from a "
                          "parameter list; or select backprop with .mode(mep::Mode::Backprop)");
    }
    for (const auto& group : groups) add_param_group(group);
    init_parameters();
  }

  /// Model-owning use (required by the EP family): optimizes `model->parameters()`, and
  /// `step(input, target)` computes the gradient with the Gradient policy. A model the
  /// gradient cannot use is refused here, naming the module and its position.
  Optimizer(torch::nn::Sequential model, const Options& options = Options()) : Optimizer(Policies{}, options) {
    auto params = checked_parameters(model);
    if constexpr (detail::has_bind<Gradient>::value) gradient_.bind(model);
    add_param_group(torch::optim::OptimizerParamGroup(std::move(params)));
    init_parameters();
    input_weight_ = Chain::input_layer_weight(model);
    model_ = std::move(model);
    parallel_.broadcast(model_->buffers(), "model's buffers");
  }

  /// Anything else (a custom Module, a single tensor) is a compile-time error that says what
  /// to pass.
  template <class T, class... Rest,
            std::enable_if_t<!std::is_convertible_v<T, std::vector<torch::Tensor>> &&
                                 !std::is_convertible_v<T, torch::nn::Sequential> &&
                                 !std::is_convertible_v<T, std::vector<torch::optim::OptimizerParamGroup>>,
                             int> = 0>
  Optimizer(T&&, Rest&&...) : torch::optim::Optimizer(std::vector<torch::optim::OptimizerParamGroup>{}, nullptr) {
    Defaults::template not_a_model<T>();
  }

  /// Adds a parameter group, checked as the constructor checks its groups: its options must be
  /// this optimizer's Options type, valid, and set no policy option other than the
  /// optimizer's; each parameter must suit the update. Throws OptionError naming the group
  /// and the option; the optimizer is then unchanged. (It hides the base class's
  /// non-virtual `add_param_group`; groups added around it are refused by `step`.)
  void add_param_group(const torch::optim::OptimizerParamGroup& group) {
    const size_t gi = param_groups_.size();
    const auto where = "mep: parameter group " + std::to_string(gi);
    if (group.has_options()) {
      const auto* o = dynamic_cast<const Options*>(&group.options());
      if (o == nullptr)
        throw OptionError(where + " has options of type " + c10::demangle(typeid(group.options()).name()) + "; " +
                          Defaults::name + " takes its own options type");
      try {
        o->validate();
      } catch (const OptionError& e) {
        std::string what = e.what();
        throw OptionError(where + ": " + (what.rfind("mep: ", 0) == 0 ? what.substr(5) : what));
      }
      check_group_policy_options(gi, *o, options());
      if (o->process_group() && o->process_group() != options().process_group())
        throw OptionError(where + " sets another process_group than the optimizer's; set it on the optimizer's options");
    }
    if constexpr (detail::has_check_parameter<Update>::value) {
      size_t index = 0;
      for (const auto& g : param_groups_) index += g.params().size();
      for (const auto& p : group.params())
        update_.check_parameter(p, "parameter " + std::to_string(index++) + " (group " + std::to_string(gi) + ")");
    }
    torch::optim::Optimizer::add_param_group(group);
  }

  /// torch::optim-style step: uses the `.grad()` already in place (after `backward()`).
  torch::Tensor step(LossClosure closure = nullptr) override {
    torch::Tensor loss;
    if (closure) {
      torch::AutoGradMode enable(true);
      loss = closure();
    }
    apply_update(&loss);
    return loss;
  }

  /// One training step on a batch: gradient policy (settling and EP gradients for the EP
  /// family, backprop otherwise), then the update. Returns the batch loss/energy.
  torch::Tensor step(const torch::Tensor& input, const torch::Tensor& target) {
    if (model_.is_empty())
      throw std::logic_error("mep: step(input, target) needs the optimizer to be constructed from the model "
                             "(a torch::nn::Sequential); this one was given a parameter list");
    auto loss = gradient_.compute(model_, input, target);
    try {
      apply_update(&loss);
    } catch (...) {
      if constexpr (detail::has_undo<Gradient>::value) gradient_.undo();  // .grad() and BatchNorm as they were
      throw;
    }
    return loss;
  }

  const Options& options() const { return static_cast<const Options&>(defaults()); }
  Gradient& gradient() noexcept { return gradient_; }
  const Update& update() const noexcept { return update_; }
  const Constraint& constraint() const noexcept { return constraint_; }
  const Feedback& feedback() const noexcept { return feedback_; }
  const torch::nn::Sequential& model() const noexcept { return model_; }
  /// The data-parallel collectives (inactive without a process group): rank, size, and the
  /// bytes communicated so far.
  const DataParallel& data_parallel() const noexcept { return parallel_; }

  /// What settling did in the last step (EP gradient policies): steps, final energy,
  /// relative residual ‖∂E/∂s‖/‖s‖ and whether the stopping rule was met, per phase.
  template <class G = Gradient>
  auto settle_report() const noexcept -> decltype(std::declval<const G&>().report()) {
    return gradient_.report();
  }

  /// Steps skipped for non-finite gradients (`skip_nonfinite(true)`, backprop family).
  int64_t skipped_steps() const noexcept { return skipped_steps_; }

  /// The state of parameter `p` (created empty on first use).
  /// It lives in `torch::optim::Optimizer::state()`, keyed as LibTorch keys it, so that
  /// `opt.state()` shows every parameter's ParamState (dynamic_cast to mep::ParamState).
  ParamState& state_of(const torch::Tensor& p) {
    auto& slot = state_[state_key(p)];
    if (!slot) slot = std::make_unique<ParamState>();
    return static_cast<ParamState&>(*slot);
  }
  bool has_state(const torch::Tensor& p) const { return state_.count(state_key(p)) > 0; }

  void save(torch::serialize::OutputArchive& archive) const override {
    archive.write("mep.groups", c10::IValue(static_cast<int64_t>(param_groups_.size())));
    archive.write("mep.skipped_steps", c10::IValue(skipped_steps_));
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
      const auto& group = param_groups_[gi];
      torch::serialize::OutputArchive ga;
      group.options().serialize(ga);
      ga.write("size", c10::IValue(static_cast<int64_t>(group.params().size())));
      for (size_t pi = 0; pi < group.params().size(); ++pi) {
        auto it = state_.find(state_key(group.params()[pi]));
        if (it == state_.end()) continue;
        torch::serialize::OutputArchive sa;
        static_cast<const ParamState&>(*it->second).serialize(sa);
        ga.write("state." + std::to_string(pi), sa);
      }
      archive.write("group." + std::to_string(gi), ga);
    }
  }

  void load(torch::serialize::InputArchive& archive) override {
    c10::IValue v;
    if (!archive.try_read("mep.groups", v)) {
      if (archive.try_read("pytorch_version", v))
        throw std::runtime_error(std::string("mep: the archive holds a torch::optim optimizer's state; ") +
                                 Defaults::name + " reads only checkpoints saved by a mep optimizer (its options "
                                 "and state are laid out differently): load the model's parameters and start the "
                                 "optimizer afresh");
      throw std::runtime_error("mep: the archive holds no mep optimizer state");
    }
    if (v.toInt() != static_cast<int64_t>(param_groups_.size())) {
      std::ostringstream os;
      os << "mep: the archive has " << v.toInt() << " parameter groups, this optimizer " << param_groups_.size();
      throw std::runtime_error(os.str());
    }
    // Read everything first, then commit: a failed load leaves the optimizer as it was.
    std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;
    std::decay_t<decltype(state_)> states;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
      auto& group = param_groups_[gi];
      torch::serialize::InputArchive ga;
      archive.read("group." + std::to_string(gi), ga);
      ga.read("size", v);
      if (v.toInt() != static_cast<int64_t>(group.params().size())) {
        std::ostringstream os;
        os << "mep: parameter group " << gi << " has " << v.toInt() << " parameters in the archive, "
           << group.params().size() << " here";
        throw std::runtime_error(os.str());
      }
      auto opts = group.options().clone();
      opts->serialize(ga);
      options.push_back(std::move(opts));
      for (size_t pi = 0; pi < group.params().size(); ++pi) {
        torch::serialize::InputArchive sa;
        if (!ga.try_read("state." + std::to_string(pi), sa)) continue;
        const auto& p = group.params()[pi];
        auto st = std::make_unique<ParamState>();
        st->serialize(sa);
        for (auto& kv : st->buffers) kv.second = kv.second.to(p.device());
        states[state_key(p)] = std::move(st);
      }
    }
    c10::IValue skipped;
    const int64_t skipped_steps = archive.try_read("mep.skipped_steps", skipped) ? skipped.toInt() : 0;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) param_groups_[gi].set_options(std::move(options[gi]));
    state_ = std::move(states);
    skipped_steps_ = skipped_steps;
  }

 protected:
  struct Policies {};
  // Validates the options and builds the policies from them; no parameter yet.
  Optimizer(Policies, const Options& options)
      : torch::optim::Optimizer(std::vector<torch::optim::OptimizerParamGroup>{},
                                std::make_unique<Options>(validated(options))),
        gradient_(options),
        update_(options),
        constraint_(options),
        feedback_(options),
        parallel_(options.process_group()) {}

  // After the groups are added: the input layer's weight (for a parameter list, the first
  // matrix), and with a process group every rank starts from rank 0's parameters.
  void init_parameters() {
    std::vector<torch::Tensor> params;
    for (const auto& group : param_groups_)
      for (const auto& p : group.params()) {
        if (input_weight_ == nullptr && p.dim() >= 2) input_weight_ = p.unsafeGetTensorImpl();
        params.push_back(p);
      }
    parallel_.broadcast(params, "parameters");
  }

  static const Options& validated(const Options& o) {
    o.validate();
    return o;
  }

  // The options of group `gi`, which must be this optimizer's type: a group added through the
  // base class's add_param_group, or whose options were replaced, is refused.
  const Options& group_options(size_t gi) const {
    const auto* o = dynamic_cast<const Options*>(&param_groups_[gi].options());
    if (o == nullptr)
      throw OptionError("mep: parameter group " + std::to_string(gi) + " has options of type " +
                        c10::demangle(typeid(param_groups_[gi].options()).name()) + "; " + Defaults::name +
                        " takes its own options type (no parameter was updated)");
    return *o;
  }

  // LibTorch's key of a parameter's state: its TensorImpl, as a string in 1.13 and a
  // pointer in 2.x (the map's key type tells which).
  template <class T = torch::Tensor>
  static auto state_key(const T& p) {
    using Base = std::conditional_t<std::is_same_v<T, T>, torch::optim::Optimizer, void>;  // dependent on T
    using Key = typename std::decay_t<decltype(std::declval<Base&>().state())>::key_type;
    if constexpr (std::is_same_v<Key, std::string>) {
      std::ostringstream os;
      os << p.unsafeGetTensorImpl();
      return os.str();
    } else {
      return static_cast<Key>(p.unsafeGetTensorImpl());
    }
  }

  // The policies are built once, from the optimizer's options: a group may set the common
  // options (lr, momentum, dampening, nesterov, weight_decay) but no policy option.
  static void check_group_policy_options(size_t group, const Options& o, const Options& defaults) {
    const auto mine = o.policy_texts(), theirs = defaults.policy_texts();
    for (size_t i = 0; i < mine.size(); ++i) {
      if (mine[i].second == theirs[i].second) continue;
      std::vector<std::pair<std::string, std::string>> group_options;
      o.visit_group_options(detail::OptionCollector{group_options});
      std::string names;
      for (const auto& kv : group_options) names += (names.empty() ? "" : ", ") + kv.first;
      std::ostringstream os;
      os << "mep: parameter group " << group << " sets " << mine[i].first << " = " << mine[i].second
         << ", but the optimizer's is " << theirs[i].second << "; policy options apply to all groups (a group may "
         << "set " << names << ")";
      throw OptionError(os.str());
    }
  }

  static std::vector<torch::Tensor> checked_parameters(const torch::nn::Sequential& model) {
    if (model.is_empty()) throw std::invalid_argument("mep: the model is null");
    auto params = model->parameters();
    if (params.empty()) throw std::invalid_argument("mep: the model has no parameters to optimize");
    return params;
  }

  /// With a process group, averages the gradients over the ranks (and, for a model-owning
  /// optimizer, the model's floating-point buffers, which the step's forward changed, and
  /// the loss); rejects non-finite gradients before any parameter changes, then updates all.
  void apply_update(torch::Tensor* loss = nullptr) {
    torch::NoGradGuard no_grad;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) group_options(gi);
    std::vector<torch::Tensor> finite;
    if (parallel_.active()) {
      // Gradients the update averages itself (Dion's factors) stay local; the sum of their
      // sums is averaged with the rest, so that a non-finite one on any rank is seen by all.
      std::vector<torch::Tensor> shared, local;
      for (const auto& group : param_groups_)
        for (const auto& p : group.params())
          if (p.grad().defined()) (averages_own_factors(p.grad()) ? local : shared).push_back(p.grad());
      if (!model_.is_empty())
        for (const auto& b : model_->buffers())
          if (b.is_floating_point()) shared.push_back(b);
      if (loss && loss->defined()) shared.push_back(*loss = loss->detach().clone());
      if (!local.empty()) {
        std::vector<torch::Tensor> sums;
        for (const auto& g : local) sums.push_back(g.sum());
        shared.push_back(torch::stack(sums).sum());
        finite.push_back(shared.back());
      }
      parallel_.average(shared, "gradients");
    }
    if constexpr (kBounded) {
      if (update_if_bounded()) return;
    }
    for (const auto& group : param_groups_)
      for (const auto& p : group.params())
        if (p.grad().defined() && !averages_own_factors(p.grad()))
          finite.push_back(p.grad().sum());  // finite iff every entry is (or it overflows)
    if (finite.empty()) return;
    if (!torch::isfinite(torch::stack(finite)).all().item<bool>()) {
      if constexpr (detail::has_skip_nonfinite<Options>::value) {
        if (options().skip_nonfinite()) {
          ++skipped_steps_;
          return;
        }
      }
      throw_non_finite();
    }

    // Transactional: each parameter and its state are saved before their update, and all are
    // put back if any update throws (a failed Cholesky or QR) or leaves a non-finite value.
    std::vector<Saved> saved;
    std::vector<torch::Tensor> updated_finite;
    try {
      for (auto& group : param_groups_) {
        const auto& o = static_cast<const Options&>(group.options());  // checked at the step's start
        for (auto& p : group.params()) {
          if (!p.grad().defined()) continue;
          saved.push_back(save_parameter(p));
          update_parameter(p, o);
          updated_finite.push_back(p.sum());
        }
      }
      if (!torch::isfinite(torch::stack(updated_finite)).all().item<bool>())
        throw std::runtime_error("mep: the update produced a non-finite parameter; no parameter was updated");
    } catch (...) {
      for (auto it = saved.rbegin(); it != saved.rend(); ++it) restore_parameter(*it);
      throw;
    }
  }

  // Whether the update applies W ← W − lr·u itself, in its own rounding (Adam, as torch's): when
  // the optimizer adds no momentum and no feedback needs u.
  static constexpr bool kWholeStep =
      detail::rounds_as_torch<Update>() && !Options::has_momentum && std::is_same_v<Feedback, NoFeedback>;

  // Whether every value the update writes is bounded by the ranges of its inputs, and it
  // cannot throw: then a step whose bound is finite needs no rollback.
  static constexpr bool kBounded = detail::has_direction_bound<Update>::value &&
                                   std::is_same_v<Constraint, NoConstraint> && std::is_same_v<Feedback, NoFeedback>;

  // The range of a state buffer as the last bounded step left it, valid while the buffer is
  // the same tensor at the same version (an in-place change or a load makes it stale). It
  // holds the tensor, so that a replaced buffer's address cannot be reused by another.
  struct KnownRange {
    torch::Tensor tensor;
    int64_t version = -1;
    std::pair<double, double> range;
  };
  static bool same_version(const KnownRange& k, const torch::Tensor& t) {
    return k.tensor.is_same(t) && !t.is_inference() && k.version == t._version();
  }

  // Bounds what the update writes from the magnitudes of its inputs:
  //   d = g + λW:           |d| ≤ G + |λ|·P             (coupled weight decay)
  //   u = direction(d):     |u| ≤ U = direction_bound(D, buffers, t), which also bounds the
  //                         buffers the direction writes
  //   m ← μm + (1−τ)u:      |m| ≤ |μ|·M + |1−τ|·U       (U when m is new; U + |μ|·M with Nesterov)
  //   W ← W(1−lr·λ) − lr·m: |W| ≤ |1−lr·λ|·P + lr·|m|
  // G and P are max|g| and max|W| (aminmax, one pass each; NaN when an entry is); a state
  // buffer's range is the one the previous bounded step computed, or read when it is stale.
  // All reads reach the host in one transfer. When every bound is below a quarter of the
  // dtype's largest value (room for rounding), updates every parameter in place and returns
  // true. Otherwise (a non-finite input, a bound too large, mixed dtypes, an empty tensor) it
  // writes nothing and returns false.
  bool update_if_bounded() {
    struct Item {
      torch::Tensor* p;
      const Options* o;
      ParamState* state;  // null before the first step
      BufferExtents extents;
      std::vector<std::pair<std::string, size_t>> read;  // buffers read now, and their index in `reads`
      size_t g_at;                                        // index of g's and then W's range in `reads`
    };
    std::vector<Item> items;
    std::vector<torch::Tensor> reads;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    const auto usable = [&](const torch::Tensor& t) {
      if (t.numel() == 0 || detail::dtype_max(t.scalar_type()) == 0 ||
          (dtype != c10::ScalarType::Undefined && t.scalar_type() != dtype))
        return false;
      dtype = t.scalar_type();
      return true;
    };
    const auto read_range = [&reads](const torch::Tensor& t) {
      auto [lo, hi] = torch::aminmax(t);
      reads.push_back(lo), reads.push_back(hi);
    };
    for (auto& group : param_groups_)
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        if (!usable(p.grad()) || !usable(p)) return false;
        auto it = state_.find(state_key(p));
        Item item{&p, &static_cast<const Options&>(group.options()),
                  it == state_.end() ? nullptr : &static_cast<ParamState&>(*it->second), {}, {}, reads.size()};
        read_range(p.grad()), read_range(p);
        if (item.state) {
          const auto& known = known_ranges_[p.unsafeGetTensorImpl()];
          for (const auto& [name, t] : item.state->buffers) {
            if (!t.defined()) continue;
            if (!usable(t)) return false;
            auto k = known.find(name);
            if (k != known.end() && same_version(k->second, t)) {
              item.extents.ranges[name] = k->second.range;
            } else {
              item.read.emplace_back(name, reads.size());
              read_range(t);
            }
          }
        }
        items.push_back(std::move(item));
      }
    if (items.empty()) return false;
    const double limit = detail::dtype_max(dtype) / 4;
    const auto host = torch::stack(reads).to(torch::kCPU, torch::kDouble).contiguous();
    const double* r = host.data_ptr<double>();
    if (!std::all_of(r, r + host.numel(), [](double x) { return std::isfinite(x); })) return false;
    const auto abs_max = [r](size_t i) { return std::max(std::abs(r[i]), std::abs(r[i + 1])); };
    for (auto& item : items) {
      const Options& o = *item.o;
      for (const auto& [name, i] : item.read) item.extents.ranges[name] = {r[i], r[i + 1]};
      double worst = 0;
      for (const auto& kv : item.extents.ranges) worst = std::max(worst, item.extents.abs_max(kv.first));
      const double G = abs_max(item.g_at), P = abs_max(item.g_at + 2);
      const double D = Update::coupled_weight_decay ? G + std::abs(o.weight_decay()) * P : G;
      const int64_t step = (item.state ? item.state->step : 0) + 1;
      const double U = update_.direction_bound(D, item.extents, step);
      double V = U;  // the step's direction after momentum
      if constexpr (Options::has_momentum) {
        if (!owns_momentum(*item.p) && o.momentum() != 0) {
          const double mu = std::abs(o.momentum());
          const bool had = item.extents.ranges.count("momentum") > 0;
          const double M = had ? mu * item.extents.abs_max("momentum") + std::abs(1 - o.dampening()) * U : U;
          item.extents.ranges["momentum"] = {-M, M};
          V = o.nesterov() ? U + mu * M : M;
        }
      }
      const double shrink = Update::coupled_weight_decay ? 1.0 : std::abs(1 - o.lr() * o.weight_decay());
      const double W = shrink * P + std::abs(o.lr()) * V;
      for (const auto& kv : item.extents.ranges) worst = std::max(worst, item.extents.abs_max(kv.first));
      worst = std::max({worst, G, P, D, U, V, W});
      if (!(worst < limit)) return false;  // also false for NaN
    }
    for (auto& item : items) {
      ParamState& st = item.state ? *item.state : state_of(*item.p);
      update_parameter(*item.p, *item.o, st);
      auto& known = known_ranges_[item.p->unsafeGetTensorImpl()];
      known.clear();
      for (const auto& [name, t] : st.buffers) {
        auto e = item.extents.ranges.find(name);
        if (t.defined() && e != item.extents.ranges.end() && !t.is_inference())
          known[name] = KnownRange{t, t._version(), e->second};
      }
    }
    return true;
  }

  // A parameter's value and state before its update, in buffers kept from step to step (a
  // fresh copy per step costs page faults that rival the update itself).
  struct Backup {
    torch::Tensor value;
    bool had_state = false;
    int64_t step = 0;
    std::map<std::string, torch::Tensor> buffers;  // those defined at the save
  };
  using Saved = std::pair<torch::Tensor, Backup*>;

  static torch::Tensor& fit(torch::Tensor& buffer, const torch::Tensor& like) {
    if (!buffer.defined() || buffer.sizes() != like.sizes() || !buffer.options().type_equal(like.options()))
      buffer = torch::empty_like(like, torch::MemoryFormat::Contiguous);
    return buffer;
  }

  Saved save_parameter(const torch::Tensor& p) {
    Backup& b = backups_[p.unsafeGetTensorImpl()];
    fit(b.value, p).copy_(p.detach());
    b.had_state = has_state(p);
    if (b.had_state) {
      const ParamState& st = state_of(p);
      b.step = st.step;
      for (auto it = b.buffers.begin(); it != b.buffers.end();)
        it = st.has(it->first) ? std::next(it) : b.buffers.erase(it);
      for (const auto& [name, t] : st.buffers)
        if (t.defined()) fit(b.buffers[name], t).copy_(t);
    }
    return {p, &b};
  }

  void restore_parameter(const Saved& saved) {
    torch::NoGradGuard no_grad;
    const auto& [p, b] = saved;
    p.detach().copy_(b->value);
    if (!b->had_state) {
      state_.erase(state_key(p));
      return;
    }
    ParamState& st = state_of(p);
    st.step = b->step;
    st.buffers.clear();
    for (const auto& [name, t] : b->buffers) st.buffers[name] = t.clone();
  }

  void update_parameter(torch::Tensor& p, const Options& o) { update_parameter(p, o, state_of(p)); }
  void update_parameter(torch::Tensor& p, const Options& o, ParamState& st) {
    ++st.step;
    torch::Tensor g = p.grad();
    if (Update::coupled_weight_decay && o.weight_decay() != 0) g = g.add(p, o.weight_decay());
    if constexpr (kWholeStep) {
      if (!Update::coupled_weight_decay && o.weight_decay() != 0) p.mul_(1 - o.lr() * o.weight_decay());
      update_.apply(p, g, o.lr(), st);
      constraint_.enforce(p, st, p.unsafeGetTensorImpl() == input_weight_);
      return;
    }
    torch::Tensor g_aug = feedback_.accumulate(g, st);
    torch::Tensor u = direction(g_aug, st);
    feedback_.remember(g_aug, u, st);
    if constexpr (Options::has_momentum) {
      if (!owns_momentum(g_aug) && o.momentum() != 0) {
        torch::Tensor& m = st.buffers["momentum"];
        if (!m.defined()) {
          m = u.clone(torch::MemoryFormat::Contiguous);
        } else {
          m.mul_(o.momentum()).add_(u, 1 - o.dampening());
        }
        u = o.nesterov() ? u.add(m, o.momentum()) : m;
      }
    }
    if (!Update::coupled_weight_decay && o.weight_decay() != 0) p.mul_(1 - o.lr() * o.weight_decay());
    double lr = o.lr();
    if constexpr (detail::has_lr_scale<Update>::value) lr *= update_.lr_scale(p);
    p.add_(u, -lr);
    constraint_.enforce(p, st, p.unsafeGetTensorImpl() == input_weight_);
  }

  // With data parallelism: whether the update averages its own factors for this gradient
  // (Dion: B·Q and Bᵀ·P) rather than taking the averaged gradient. Error feedback clamps,
  // which is not linear in g: with it on, whole gradients are averaged.
  bool averages_own_factors(const torch::Tensor& g) const {
    if constexpr (detail::has_averages_factors_of<Update>::value)
      return parallel_.active() && !feedback_.active() && update_.averages_factors_of(g);
    return false;
  }
  // The update's direction for g; for the gradients it averages itself, over the ranks.
  torch::Tensor direction(const torch::Tensor& g, ParamState& st) {
    if constexpr (detail::has_averages_factors_of<Update>::value)
      return update_.direction(g, st, averages_own_factors(g) ? &parallel_ : nullptr);
    return update_.direction(g, st);
  }
  // Whether the update policy carries its own moments for this tensor.
  bool owns_momentum(const torch::Tensor& g) const {
    if constexpr (detail::has_owns_momentum_for<Update>::value) return update_.owns_momentum_for(g);
    return Update::owns_momentum;
  }

  [[noreturn]] void throw_non_finite() const {
    size_t index = 0;
    for (size_t gi = 0; gi < param_groups_.size(); ++gi)
      for (const auto& p : param_groups_[gi].params()) {
        if (p.grad().defined() && !torch::isfinite(p.grad()).all().item<bool>()) {
          std::ostringstream os;
          os << "mep: non-finite gradient (NaN or inf) in parameter " << index << " (group " << gi << ", shape "
             << p.sizes() << "); no parameter was updated";
          throw std::runtime_error(os.str());
        }
        ++index;
      }
    throw std::runtime_error("mep: a gradient so large that its sum overflows (treated as non-finite); no parameter "
                             "was updated");
  }

  int64_t skipped_steps_ = 0;
  c10::TensorImpl* input_weight_ = nullptr;  // the input layer's weight (the constraint's input_layer)
  std::unordered_map<c10::TensorImpl*, Backup> backups_;
  std::unordered_map<c10::TensorImpl*, std::map<std::string, KnownRange>> known_ranges_;
  Gradient gradient_;
  Update update_;
  Constraint constraint_;
  Feedback feedback_;
  torch::nn::Sequential model_{nullptr};
  DataParallel parallel_;

};

}  // namespace mep
