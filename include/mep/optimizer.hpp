#pragma once
/// \file optimizer.hpp
/// `mep::Optimizer<Gradient, Update, Constraint, Feedback, Defaults>`: one optimizer assembled
/// from four policies, with a preset's defaults. For the parameters W of a group, with
/// gradients g:
///
///   g     ← g + λ·W                      (coupled weight decay, when Update asks for it)
///   g_aug = feedback.accumulate(g)
///   u     = update.direction(g_aug)
///   feedback.remember(g_aug, u)
///   m     ← μ·m + (1 − dampening)·u       (skipped when Update owns its moments: Adam, Muon, Dion)
///   W     ← W·(1 − lr·λ) − lr·s·m         (decoupled weight decay otherwise; s = update.lr_scale(W), or 1)
///   constraint.enforce(W)                (told whether W is the input layer's weight)
///
/// The elementwise stages run as multi-tensor operations (`_foreach_*`) over the group's
/// tensors, so that on a GPU they cost a few launches whatever the number of tensors. The
/// direction and the constraint, which are matrix operations, run tensor by tensor. An update
/// with `apply(W, g, lr, states)` (Adam) takes the whole step over the group itself.
///
/// Policies (see each header for its rule and source):
///  - Gradient: `compute(model, x, target)` writes `.grad()` and returns the loss/energy; an
///    EP gradient also has `bind(model)`, which reads the model when the optimizer is built,
///    and `compute_deferred` / `checked()` / `throw_if_invalid()`, which leave its checks of
///    the batch on the device for the step's one check.
///  - Update: `direction(g, state)`, with `coupled_weight_decay` and `owns_momentum`; optionally
///    `lr_scale(W)`, `check_parameter(W, which)` (refuses a parameter it cannot update, at
///    construction), `directions(gs, states)` (the group's directions at once: Newton–Schulz
///    batches the matrices of one shape), `apply(Ws, gs, lr, states)` (the group's whole step, in the rounding of
///    the implementation it follows, used where no feedback needs u) and `diagnose()` (after
///    a failed step, throws what failed in it).
///  - Constraint: `enforce(W, state, input_layer)`.   - Feedback: `accumulate(g, state)`, `remember(g_aug, u, state)`.
/// Each contributes an options mixin `Policy::Options<Derived>` to OptimizerOptions; `Defaults`
/// (options.hpp) names the preset and sets its defaults.
///
/// The class derives from `torch::optim::Optimizer`: parameter groups (lr, weight_decay, and
/// momentum, dampening and nesterov where the optimizer applies momentum, may differ per
/// group), zero_grad, and `torch::save(opt, path)` / `torch::load(opt, path)` of the full
/// state (checkpoint.hpp). The per-parameter state is typed (state.hpp).
///
/// A step updates every parameter or none (transaction.hpp): what it writes is saved first,
/// and one check after the update decides: Σ‖t‖₂ over the parameters and the gradient
/// policy's checks of the batch (one device scalar, finite or not), into which every
/// non-finite gradient or state value is carried. With
/// `StepCheck::Immediate` (the CPU's default) the host reads it once and a failure is undone
/// and thrown at once, naming its cause; with `StepCheck::Deferred` (CUDA's) the device keeps
/// or undoes the step itself and the failure is thrown by a later step (options.hpp,
/// `StepCheck`). Undone are the parameters, their state, and for the EP family `.grad()`
/// (Immediate only) and BatchNorm's running statistics.
/// With `options.process_group(group)` the gradients are averaged over the group's ranks
/// before the update (data_parallel.hpp).

#include <mep/checkpoint.hpp>
#include <mep/constraint/none.hpp>
#include <mep/ep/chain.hpp>
#include <mep/feedback/none.hpp>
#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/transaction.hpp>

#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace mep {

namespace detail {
template <class G, class = void>
struct has_undo : std::false_type {};
template <class G>
struct has_undo<G, std::void_t<decltype(std::declval<G&>().undo())>> : std::true_type {};
template <class G, class = void>
struct has_deferred_checks : std::false_type {};
template <class G>
struct has_deferred_checks<G, std::void_t<decltype(std::declval<const G&>().checked()),
                                          decltype(std::declval<const G&>().throw_if_invalid())>> : std::true_type {};
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
template <class U, class = void>
struct has_directions : std::false_type {};
template <class U>
struct has_directions<U, std::void_t<decltype(&U::directions)>> : std::true_type {};
template <class U, class = void>
struct has_diagnose : std::false_type {};
template <class U>
struct has_diagnose<U, std::void_t<decltype(std::declval<const U&>().diagnose()),
                                   decltype(std::declval<const U&>().begin_step())>> : std::true_type {};
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
      const auto& given = group.options();
      const auto* o = dynamic_cast<const Options*>(&given);
      if (o == nullptr)
        throw OptionError(where + " has options of type " + c10::demangle(typeid(given).name()) + "; " +
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
    resolve_failures();
    torch::Tensor loss;
    if (closure) {
      torch::AutoGradMode enable(true);
      loss = closure();
    }
    apply_update(&loss, {});
    return loss;
  }

  /// One training step on a batch: gradient policy (settling and EP gradients for the EP
  /// family, backprop otherwise), then the update. Returns the batch loss/energy (on the
  /// model's device; reading it is the caller's choice).
  torch::Tensor step(const torch::Tensor& input, const torch::Tensor& target) {
    if (model_.is_empty())
      throw std::logic_error("mep: step(input, target) needs the optimizer to be constructed from the model "
                             "(a torch::nn::Sequential); this one was given a parameter list");
    resolve_failures();
    const bool deferred = deferred_checks();
    if (deferred) {  // BatchNorm's statistics change in the gradient's forward: saved before it
      std::vector<torch::Tensor> buffers;
      for (const auto& b : model_->buffers()) buffers.push_back(b);
      model_transaction_.begin(buffers);
      model_saved_ = true;
    }
    torch::Tensor loss;
    std::vector<torch::Tensor> batch_checks;
    try {
      if constexpr (detail::has_deferred_checks<Gradient>::value) {
        loss = gradient_.compute_deferred(model_, input, target);
        batch_checks = gradient_.checked();
      } else {
        loss = gradient_.compute(model_, input, target);
      }
    } catch (...) {
      model_saved_ = false;
      throw;
    }
    try {
      apply_update(&loss, batch_checks);
    } catch (...) {
      if constexpr (detail::has_undo<Gradient>::value) gradient_.undo();  // .grad() and BatchNorm as they were
      throw;
    }
    return loss;
  }

  /// With StepCheck::Deferred: throws for a failed step whose flag has reached the host, and
  /// otherwise returns (without waiting for the device). The failed step changed nothing on
  /// the device; the host-side state it advanced (step counts, buffers it created) is put
  /// back here. `step` calls it first.
  void check_failures() { resolve_failures(); }

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

  /// Steps skipped for non-finite gradients (`skip_nonfinite(true)`, backprop family). With
  /// StepCheck::Deferred, those whose flag has reached the host.
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
    checkpoint::save(archive, param_groups_, skipped_steps_, [this](const torch::Tensor& p) -> const ParamState* {
      auto it = state_.find(state_key(p));
      return it == state_.end() ? nullptr : static_cast<const ParamState*>(it->second.get());
    });
  }

  void load(torch::serialize::InputArchive& archive) override {
    auto c = checkpoint::read(archive, param_groups_, Defaults::name);
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) param_groups_[gi].set_options(std::move(c.options[gi]));
    state_.clear();
    for (auto& [p, st] : c.states) state_[state_key(p)] = std::move(st);
    skipped_steps_ = c.skipped_steps;
    pending_.clear();
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

 private:
  // One parameter of a step, and what the host puts back if the step fails: whether it had
  // state, its step count, and its buffers' handles (a step may create or replace a buffer;
  // their values are the transaction's).
  struct Item {
    torch::Tensor p;
    const Options* o;
    ParamState* st;
    bool had_state;
    int64_t step;
    std::array<torch::Tensor, 11> handles;  // in ParamState::fields() order
  };
  // A deferred step's flags on their way to the host.
  struct Pending {
    torch::Tensor flags;               // host: [ok, gradients finite]
    std::shared_ptr<c10::Event> copied;  // CUDA: recorded after the copy (null on the CPU: copied already)
    std::vector<Item> items;
  };

  // Whether steps are checked on the device (StepCheck::Deferred, or Auto on CUDA).
  bool deferred_checks() const {
    const StepCheck c = options().step_check();
    if (c != StepCheck::Auto) return c == StepCheck::Deferred;
    for (const auto& group : param_groups_)
      for (const auto& p : group.params()) return p.is_cuda();
    return false;
  }

  Item item_of(const torch::Tensor& p, const Options& o) {
    const bool had = has_state(p);
    ParamState& st = state_of(p);
    Item item{p, &o, &st, had, st.step, {}};
    size_t k = 0;
    for (const auto& [name, field] : ParamState::fields()) item.handles[k++] = st.*field;
    return item;
  }

  // The host side of a failed step: states it created are erased, step counts and buffer
  // handles put back.
  void restore_host(const std::vector<Item>& items) {
    for (const auto& item : items) {
      if (!item.had_state) {
        state_.erase(state_key(item.p));
        continue;
      }
      item.st->step = item.step;
      size_t k = 0;
      for (const auto& [name, field] : ParamState::fields()) item.st->*field = item.handles[k++];
    }
  }

  // Averages the gradients over the ranks (with a process group), then updates every group,
  // all or nothing: the transaction saves what the step writes, and one check of the
  // gradients, the written values and the gradient policy's checks of the batch decides.
  void apply_update(torch::Tensor* loss, const std::vector<torch::Tensor>& batch_checks) {
    torch::NoGradGuard no_grad;
    const bool deferred = deferred_checks();
    const bool model_saved = std::exchange(model_saved_, false);
    for (size_t gi = 0; gi < param_groups_.size(); ++gi) group_options(gi);
    std::vector<Item> items;
    std::vector<size_t> group_end;  // items [group_end[g-1], group_end[g]) are group g's
    std::vector<torch::Tensor> grads;
    for (auto& group : param_groups_) {
      const auto& o = static_cast<const Options&>(group.options());  // checked above
      for (const auto& p : group.params())
        if (p.grad().defined()) items.push_back(item_of(p, o)), grads.push_back(p.grad());
      group_end.push_back(items.size());
    }
    torch::Tensor local_sum;
    if (parallel_.active()) {
      std::vector<torch::Tensor> buffers;
      if (!model_.is_empty()) buffers = model_->buffers();
      local_sum = parallel_.average_gradients(grads, buffers, loss,
                                              [this](const torch::Tensor& g) { return averages_own_factors(g); });
    }
    if (items.empty()) return;

    std::vector<torch::Tensor> written;
    for (auto& item : items) {
      written.push_back(item.p);
      item.st->for_each_buffer([&](const char*, const torch::Tensor& t) { written.push_back(t); });
    }
    transaction_.begin(written);
    if constexpr (detail::has_diagnose<Update>::value) update_.begin_step();
    try {
      size_t begin = 0;
      for (size_t gi = 0; gi < param_groups_.size(); ++gi) {
        if (group_end[gi] > begin)
          update_group(items, begin, group_end[gi], static_cast<const Options&>(param_groups_[gi].options()));
        begin = group_end[gi];
      }
    } catch (...) {
      transaction_.rollback();
      restore_host(items);
      if (model_saved) model_transaction_.rollback();
      if (!host_finite(grads)) {  // the cause, rather than what it broke
        non_finite_gradient();
        return;
      }
      throw;
    }

    // The one check: Σ‖t‖₂ over the parameters, the batch's checks and what does not reach
    // the parameters. Every update carries a non-finite gradient or state into W (a NaN
    // stays NaN; an inf makes a moment, a norm or W itself inf, or inf/inf) except error
    // feedback, whose clamp makes an inf finite and whose buffer W never reads this step:
    // with it on, the gradients and its buffers are checked as well.
    std::vector<torch::Tensor> checked;
    if (feedback_.active()) checked = grads;
    for (const auto& t : batch_checks)
      if (t.is_floating_point()) checked.push_back(t);
    for (const auto& item : items) {
      checked.push_back(item.p);
      if (feedback_.active() && item.st->error_feedback.defined()) checked.push_back(item.st->error_feedback);
    }
    if (local_sum.defined()) checked.push_back(local_sum);
    const torch::Tensor sum = finite_sum_.sum_of_norms(checked);

    if (!deferred) {
      if (std::isfinite(sum.item<double>())) return transaction_.commit();
      return fail_now(items, grads, checked, !batch_checks.empty());
    }
    const auto ok = torch::isfinite(sum);
    transaction_.select(ok);
    if (model_saved) model_transaction_.select(ok);
    Pending pending{torch::Tensor(), nullptr, std::move(items)};
    const bool skip = skip_nonfinite();
    const auto flags = skip ? torch::stack({ok, torch::isfinite(grads_sum_.sum_of_norms(grads))}) : ok.reshape({1});
    const bool cuda = flags.is_cuda();
    pending.flags = torch::empty({flags.numel()}, torch::TensorOptions().dtype(torch::kBool).pinned_memory(cuda));
    pending.flags.copy_(flags, /*non_blocking=*/cuda);
    if (cuda) {
      pending.copied = std::make_shared<c10::Event>(c10::DeviceType::CUDA);
      pending.copied->record(c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(flags.device()));
    }
    pending_.push_back(std::move(pending));
  }

  // StepCheck::Immediate, after the check failed: tells an overflowing sum from a failure,
  // undoes the step and throws its cause (or skips it, with skip_nonfinite and non-finite
  // gradients). Reads on the host freely: this is the failure path.
  void fail_now(const std::vector<Item>& items, const std::vector<torch::Tensor>& grads,
                const std::vector<torch::Tensor>& checked, bool batch_checked) {
    if (host_finite(checked)) return transaction_.commit();  // only the sum overflowed
    transaction_.rollback();
    restore_host(items);
    if constexpr (detail::has_deferred_checks<Gradient>::value) {
      if (batch_checked) gradient_.throw_if_invalid();  // the batch, if it was the cause
    }
    if (!host_finite(grads)) return non_finite_gradient();
    if constexpr (detail::has_diagnose<Update>::value) update_.diagnose();
    throw std::runtime_error("mep: the update produced a non-finite parameter; no parameter was updated");
  }

  static bool host_finite(const std::vector<torch::Tensor>& tensors) {
    for (const auto& t : tensors)
      if (t.is_floating_point() && !torch::isfinite(t).all().item<bool>()) return false;
    return true;
  }

  bool skip_nonfinite() const {
    if constexpr (detail::has_skip_nonfinite<Options>::value) return options().skip_nonfinite();
    return false;
  }

  // A step with a non-finite gradient: skipped with skip_nonfinite, otherwise thrown, naming
  // the parameter. The step has been undone.
  void non_finite_gradient() {
    if (skip_nonfinite()) {
      ++skipped_steps_;
      return;
    }
    throw_non_finite();
  }

  // StepCheck::Deferred: the flags of earlier steps that have reached the host. A failed
  // step's host-side state is put back; it is then counted (skip_nonfinite and non-finite
  // gradients) or thrown.
  void resolve_failures() {
    while (!pending_.empty()) {
      if (pending_.front().copied && !pending_.front().copied->query()) return;  // not there yet
      Pending p = std::move(pending_.front());
      pending_.pop_front();
      const auto* flags = static_cast<const bool*>(p.flags.data_ptr());  // host memory: no device read
      if (flags[0]) continue;
      for (auto& item : p.items) {  // later steps may have run: step counts go back by one
        if (!has_state(item.p)) continue;
        ParamState& st = state_of(item.p);
        if (!item.had_state) {
          state_.erase(state_key(item.p));
          continue;
        }
        st.step = std::max<int64_t>(item.step, st.step - 1);
      }
      if (p.flags.numel() > 1 && !flags[1]) {
        ++skipped_steps_;
        continue;
      }
      throw std::runtime_error(
          "mep: a step failed (a non-finite gradient or input, a label out of range, or an update that left a "
          "non-finite value); it was undone on the device and changed nothing. StepCheck::Immediate "
          "(options.step_check) names the cause at the cost of one host read per step");
    }
  }

  // The step of one group's parameters, items [begin, end): the file's rule, stage by stage
  // over the group's tensors.
  void update_group(std::vector<Item>& items, size_t begin, size_t end, const Options& o) {
    std::vector<torch::Tensor> params, grads;
    std::vector<ParamState*> states;
    for (size_t i = begin; i < end; ++i) {
      ++items[i].st->step;
      params.push_back(items[i].p);
      grads.push_back(items[i].p.grad());
      states.push_back(items[i].st);
    }
    const double lr = o.lr(), wd = o.weight_decay();
    if (Update::coupled_weight_decay && wd != 0) grads = at::_foreach_add(grads, params, wd);
    if constexpr (kWholeStep) {
      if (!Update::coupled_weight_decay && wd != 0) at::_foreach_mul_(params, 1 - lr * wd);
      update_.apply(params, grads, lr, states);
    } else {
      std::vector<torch::Tensor> g_aug(params.size()), u(params.size());
      for (size_t i = 0; i < params.size(); ++i) g_aug[i] = feedback_.accumulate(grads[i], *states[i]);
      if constexpr (detail::has_directions<Update>::value) {
        u = update_.directions(g_aug, states);  // batched where the update can (Newton–Schulz)
      } else {
        for (size_t i = 0; i < params.size(); ++i) u[i] = direction(g_aug[i], *states[i]);
      }
      for (size_t i = 0; i < params.size(); ++i) feedback_.remember(g_aug[i], u[i], *states[i]);
      if constexpr (Options::has_momentum) {
        if (o.momentum() != 0) apply_momentum(u, grads, states, o);
      }
      if (!Update::coupled_weight_decay && wd != 0) at::_foreach_mul_(params, 1 - lr * wd);
      add_scaled(params, u, lr);
    }
    if constexpr (!std::is_same_v<Constraint, NoConstraint>) {
      for (size_t i = 0; i < params.size(); ++i)
        constraint_.enforce(params[i], *states[i], params[i].unsafeGetTensorImpl() == input_weight_);
    }
  }

  // m ← μ·m + (1 − dampening)·u (m = u at first), then u ← u + μ·m with Nesterov, m without;
  // for the tensors whose update leaves momentum to the optimizer.
  void apply_momentum(std::vector<torch::Tensor>& u, const std::vector<torch::Tensor>& grads,
                      const std::vector<ParamState*>& states, const Options& o) {
    std::vector<size_t> with;
    std::vector<torch::Tensor> m, um;
    for (size_t i = 0; i < u.size(); ++i) {
      if (owns_momentum(grads[i])) continue;
      with.push_back(i);
      if (!states[i]->momentum.defined()) {
        states[i]->momentum = u[i].clone(torch::MemoryFormat::Contiguous);
      } else {
        m.push_back(states[i]->momentum);
        um.push_back(u[i]);
      }
    }
    if (!m.empty()) {
      at::_foreach_mul_(m, o.momentum());
      at::_foreach_add_(m, um, 1 - o.dampening());
    }
    if (with.empty()) return;
    if (o.nesterov()) {
      std::vector<torch::Tensor> uw, mw;
      for (size_t i : with) uw.push_back(u[i]), mw.push_back(states[i]->momentum);
      auto sum = at::_foreach_add(uw, mw, o.momentum());
      for (size_t k = 0; k < with.size(); ++k) u[with[k]] = std::move(sum[k]);
    } else {
      for (size_t i : with) u[i] = states[i]->momentum;
    }
  }

  // W ← W − lr·s·u, one multi-tensor operation per distinct scale s (usually one).
  void add_scaled(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& u, double lr) {
    std::vector<std::pair<double, std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>>> by_scale;
    for (size_t i = 0; i < params.size(); ++i) {
      double s = 1.0;
      if constexpr (detail::has_lr_scale<Update>::value) s = update_.lr_scale(params[i]);
      auto it = std::find_if(by_scale.begin(), by_scale.end(), [s](const auto& e) { return e.first == s; });
      if (it == by_scale.end()) it = by_scale.insert(by_scale.end(), {s, {}});
      it->second.first.push_back(params[i]);
      it->second.second.push_back(u[i]);
    }
    for (const auto& [s, lists] : by_scale) at::_foreach_add_(lists.first, lists.second, -(lr * s));
  }

  // Whether the update applies W ← W − lr·u itself, in its own rounding (Adam, as torch's): when
  // the optimizer adds no momentum and no feedback needs u.
  static constexpr bool kWholeStep =
      detail::rounds_as_torch<Update>() && !Options::has_momentum && std::is_same_v<Feedback, NoFeedback>;

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
        if (p.grad().defined() && !torch::isfinite(p.grad()).all().template item<bool>()) {
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
  Transaction transaction_;        // the parameters and their state
  Transaction model_transaction_;  // a model's buffers (Deferred: saved before the gradient's forward)
  bool model_saved_ = false;
  FiniteSum finite_sum_;
  FiniteSum grads_sum_;  // Deferred with skip_nonfinite: whether the gradients were the cause
  std::deque<Pending> pending_;
  Gradient gradient_;
  Update update_;
  Constraint constraint_;
  Feedback feedback_;
  torch::nn::Sequential model_{nullptr};
  DataParallel parallel_;
};

}  // namespace mep
