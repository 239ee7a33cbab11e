#pragma once
/// \file options.hpp
/// Options in the style of `torch::optim::SGDOptions`: chained setters, one getter per
/// option. Every policy contributes a mixin `Policy::Options<Derived>`; the optimizer's
/// options type inherits all four mixins plus `CommonOptions`, so that
/// `mep::SMEPOptions(0.01).beta(0.5).ns_steps(5)` chains across policies.

#include <mep/data_parallel.hpp>

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

/// Declares option `name` of type `T` with default `...` in a mixin whose most derived
/// options type is `Derived`: `opts.name(v)` sets and returns `Derived&`, `opts.name()`
/// reads.
#define MEP_ARG(T, name, ...)                                   \
 public:                                                        \
  Derived& name(const T& value) {                               \
    name##_ = value;                                            \
    return static_cast<Derived&>(*this);                        \
  }                                                             \
  const T& name() const noexcept { return name##_; }            \
                                                                \
 protected:                                                     \
  T name##_ = __VA_ARGS__;                                      \
                                                                \
 public:

// Every options mixin documents its options next to them: a static
//   template <class V> static void visit_option_docs(V&& v)
// calls v(name, meaning) once for each option its `visit_options` visits, the meaning one
// line of text (a formula where the option enters one). OptimizerOptions collects them
// (`visit_option_docs`, `option_meaning`); tools/options_reference.cpp prints them as
// docs/options.md, and its check fails for an option without a meaning.

namespace mep {

/// Thrown for an invalid option value; the message names the option and the value.
class OptionError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {
template <class T>
[[noreturn]] void option_error(const char* name, const T& value, const char* expected) {
  std::ostringstream os;
  os << "mep: invalid option " << name << " = " << value << " (expected " << expected << ")";
  throw OptionError(os.str());
}
}  // namespace detail

/// `name` must satisfy `cond`, otherwise an OptionError names it, its value and `expected`.
#define MEP_CHECK_OPTION(cond, name, value, expected) \
  do {                                                \
    if (!(cond)) ::mep::detail::option_error(name, value, expected); \
  } while (0)

// --- enums: one table of names per enum ----------------------------------------------------
//
// An enum option's type E comes with one function in its own namespace,
//   const std::vector<std::pair<E, const char*>>& enum_names(E);
// listing every value and its name. Everything else derives from that table: printing
// (`std::cout << mep::Loss::MSE` prints "mse"), options by name (OptimizerOptions::set and
// texts), and validation (MEP_CHECK_ENUM_OPTION).

namespace detail {
/// Whether E is an enum with an `enum_names(E)` table (found by argument-dependent lookup).
template <class E, class = void>
struct has_enum_names : std::false_type {};
template <class E>
struct has_enum_names<E, std::void_t<decltype(enum_names(std::declval<E>()))>> : std::is_enum<E> {};
}  // namespace detail

/// Whether E is an enum with an `enum_names(E)` table.
template <class E>
inline constexpr bool has_enum_names_v = detail::has_enum_names<E>::value;

/// The name `enum_names` gives `value`; nullptr for a value outside the table.
template <class E, std::enable_if_t<has_enum_names_v<E>, int> = 0>
const char* enum_name(E value) {
  for (const auto& [v, name] : enum_names(value))
    if (v == value) return name;
  return nullptr;
}

/// Prints an enum with an `enum_names` table by its name (a value outside the table as its
/// number). Found by argument-dependent lookup for every such enum in namespace mep.
template <class E, std::enable_if_t<has_enum_names_v<E>, int> = 0>
std::ostream& operator<<(std::ostream& os, E value) {
  if (const char* name = enum_name(value)) return os << name;
  return os << static_cast<int64_t>(value);
}

namespace detail {
/// The values an enum option takes, for messages: "one of mse, ce, nll".
template <class E>
std::string enum_choices() {
  std::string names;
  for (const auto& [v, name] : enum_names(E{})) names += (names.empty() ? "" : ", ") + std::string(name);
  return "one of " + names;
}

/// Throws OptionError unless `value` is in its enum's `enum_names` table.
template <class E, std::enable_if_t<has_enum_names_v<E>, int> = 0>
void check_enum_option(const E& value, const char* name) {
  if (enum_name(value) == nullptr) option_error(name, value, enum_choices<E>().c_str());
}
}  // namespace detail

/// Enum option `field` (of an enum with an `enum_names` table) must hold one of the table's
/// values, otherwise an OptionError names option `name`, the value and the allowed names:
///   MEP_CHECK_ENUM_OPTION(loss_, "loss");
///   → mep: invalid option loss = 7 (expected one of mse, ce, nll)
#define MEP_CHECK_ENUM_OPTION(field, name) ::mep::detail::check_enum_option(field, name)

/// How a step learns that it failed (a non-finite gradient or input, a label out of range,
/// an update that left a non-finite value). Either way the failed step changes nothing.
///  - Immediate: one host read per step, after the update; a failure throws from that
///    `step`, naming its cause. The default on the CPU, where a read costs nothing.
///  - Deferred: nothing is read. The device keeps or undoes the step by itself (a select
///    between the step's values and the saved ones), and the step's flag is copied to the
///    host without blocking; a later `step` (the first to find the copy arrived) or
///    `check_failures()` throws. The default on CUDA, where a read would drain the pipeline.
///  - Auto: Immediate on the CPU, Deferred on CUDA (by the first parameter's device).
enum class StepCheck { Auto, Immediate, Deferred };
inline const std::vector<std::pair<StepCheck, const char*>>& enum_names(StepCheck) {
  static const std::vector<std::pair<StepCheck, const char*>> names = {
      {StepCheck::Auto, "auto"}, {StepCheck::Immediate, "immediate"}, {StepCheck::Deferred, "deferred"}};
  return names;
}

/// Options every optimizer has: the learning rate and the weight decay. They may differ per
/// parameter group, as in torch::optim.
template <class Derived>
struct CommonOptions {
  MEP_ARG(double, lr, 0.01)
  MEP_ARG(double, weight_decay, 5e-4)

  void validate() const {
    MEP_CHECK_OPTION(lr_ > 0 && std::isfinite(lr_), "lr", lr_, "a finite value > 0");
    MEP_CHECK_OPTION(weight_decay_ >= 0 && std::isfinite(weight_decay_), "weight_decay", weight_decay_,
                     "a finite value >= 0");
  }
  template <class V>
  static void visit_option_docs(V&& v) {
    v("lr", "learning rate: W ← W − lr·s·m, for the step m and the update's scale s (1 unless it has one)");
    v("weight_decay",
      "λ: coupled, g ← g + λ·W before the update, or decoupled, W ← W·(1 − lr·λ), as the update policy says");
  }
};

/// Heavy-ball momentum as in `torch::optim::SGD`: m ← μ·m + (1 − dampening)·u, and with
/// Nesterov u + μ·m. Offered by the optimizers whose update leaves momentum to the optimizer;
/// may differ per parameter group.
template <class Derived>
struct MomentumOptions {
  MEP_ARG(double, momentum, 0.9)
  MEP_ARG(double, dampening, 0.0)
  MEP_ARG(bool, nesterov, false)

  void validate() const {
    MEP_CHECK_OPTION(momentum_ >= 0 && momentum_ < 1, "momentum", momentum_, "a value in [0, 1)");
    MEP_CHECK_OPTION(dampening_ >= 0 && dampening_ <= 1, "dampening", dampening_, "a value in [0, 1]");
    MEP_CHECK_OPTION(!nesterov_ || (momentum_ > 0 && dampening_ == 0), "nesterov", nesterov_,
                     "momentum > 0 and dampening = 0 when nesterov is on");
  }
  template <class V>
  void visit_options(V&& v) const {
    v("momentum", momentum_), v("dampening", dampening_), v("nesterov", nesterov_);
  }
  template <class V>
  static void visit_option_docs(V&& v) {
    v("momentum", "μ of the heavy-ball momentum m ← μ·m + (1 − dampening)·u (0: none)");
    v("dampening", "dampening of the momentum: m ← μ·m + (1 − dampening)·u");
    v("nesterov", "Nesterov momentum: the step is u + μ·m instead of m (needs momentum > 0 and dampening 0)");
  }
};

/// A pair of numbers, as `torch::optim::AdamOptions::betas`; written "0.9,0.999" by name.
using Pair = std::tuple<double, double>;

namespace detail {

/// An option's value as a number (bool and enums as integers), for comparing and saving.
template <class T>
double option_number(const T& value) {
  if constexpr (std::is_enum_v<T>) return static_cast<double>(static_cast<int64_t>(value));
  else return static_cast<double>(value);
}

inline double ivalue_number(const c10::IValue& v) {
  if (v.isDouble()) return v.toDouble();
  if (v.isInt()) return static_cast<double>(v.toInt());
  if (v.isBool()) return v.toBool() ? 1.0 : 0.0;
  throw std::runtime_error("mep: the checkpoint holds an option of an unexpected type");
}

inline c10::List<double> pair_list(const Pair& value) {
  c10::List<double> list;
  list.push_back(std::get<0>(value));
  list.push_back(std::get<1>(value));
  return list;
}

/// Writes every visited option into an archive, in its own type (enums as integers).
struct OptionWriter {
  torch::serialize::OutputArchive& archive;
  template <class T>
  void operator()(const char* name, const T& value) const {
    if constexpr (std::is_enum_v<T>) archive.write(name, c10::IValue(static_cast<int64_t>(value)));
    else if constexpr (std::is_same_v<T, bool>) archive.write(name, c10::IValue(value));
    else if constexpr (std::is_integral_v<T>) archive.write(name, c10::IValue(static_cast<int64_t>(value)));
    else if constexpr (std::is_same_v<T, Pair>) archive.write(name, c10::IValue(pair_list(value)));
    else archive.write(name, c10::IValue(static_cast<double>(value)));
  }
};

template <class T>
std::string option_text(const T& value);

/// Checks every visited option against an archive: a policy option saved with another value
/// is an error naming it (the policies are built from the options at construction).
struct OptionChecker {
  torch::serialize::InputArchive& archive;
  template <class T>
  void operator()(const char* name, const T& value) const {
    c10::IValue saved;
    if (!archive.try_read(name, saved)) {
      std::ostringstream os;
      os << "mep: the checkpoint has no value for option " << name << " (not saved by this optimizer type)";
      throw std::runtime_error(os.str());
    }
    if constexpr (std::is_same_v<T, Pair>) {
      if (saved.isDoubleList() && saved.toDoubleList().vec() == pair_list(value).vec()) return;
    } else {
      if (ivalue_number(saved) == option_number(value)) return;
    }
    std::ostringstream os;
    os << "mep: the checkpoint was saved with option " << name << " = " << saved << ", this optimizer has " << name
       << " = " << option_text(value) << "; construct it with the checkpoint's options (a load restores the "
       << "options a parameter group may set, and checks every other option)";
    throw std::runtime_error(os.str());
  }
};

/// An option's value as text: numbers in the shortest form that reads back exactly, booleans
/// as true/false, enums by the names `enum_names` gives them.
template <class T>
std::string option_text(const T& value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value ? "true" : "false";
  } else if constexpr (std::is_enum_v<T>) {
    if (const char* name = enum_name(value)) return name;
    return std::to_string(static_cast<int64_t>(value));
  } else if constexpr (std::is_integral_v<T>) {
    return std::to_string(value);
  } else if constexpr (std::is_same_v<T, Pair>) {
    return option_text(std::get<0>(value)) + "," + option_text(std::get<1>(value));
  } else {
    std::ostringstream os;
    for (int precision = 6; precision <= 17; ++precision) {
      os.str("");
      os.precision(precision);
      os << value;
      if (std::stod(os.str()) == value || !std::isfinite(value)) break;
    }
    return os.str();
  }
}

/// Reads `text` as a value of T (what option_text writes; booleans also 1/0, on/off, yes/no).
/// False when it is not one.
template <class T>
bool parse_option(const std::string& text, T& out) {
  if constexpr (std::is_same_v<T, bool>) {
    for (const char* t : {"true", "1", "on", "yes"})
      if (text == t) return out = true, true;
    for (const char* f : {"false", "0", "off", "no"})
      if (text == f) return out = false, true;
    return false;
  } else if constexpr (std::is_enum_v<T>) {
    for (const auto& [v, name] : enum_names(T{}))
      if (text == name) return out = v, true;
    return false;
  } else if constexpr (std::is_same_v<T, Pair>) {
    const auto comma = text.find(',');
    double first = 0, second = 0;
    if (comma == std::string::npos || !parse_option(text.substr(0, comma), first) ||
        !parse_option(text.substr(comma + 1), second))
      return false;
    return out = Pair(first, second), true;
  } else {
    try {
      size_t used = 0;
      if constexpr (std::is_integral_v<T>) out = static_cast<T>(std::stoll(text, &used));
      else out = static_cast<T>(std::stod(text, &used));
      return used == text.size();
    } catch (const std::exception&) {
      return false;
    }
  }
}

/// What values an option of type T takes, for error messages.
template <class T>
std::string option_kind() {
  if constexpr (std::is_same_v<T, bool>) {
    return "true or false";
  } else if constexpr (std::is_enum_v<T>) {
    return enum_choices<T>();
  } else if constexpr (std::is_integral_v<T>) {
    return "an integer";
  } else if constexpr (std::is_same_v<T, Pair>) {
    return "two numbers, as 0.9,0.999";
  } else {
    return "a number";
  }
}

/// Collects the visited options as (name, text).
struct OptionCollector {
  std::vector<std::pair<std::string, std::string>>& out;
  template <class T>
  void operator()(const char* name, const T& value) const {
    out.emplace_back(name, option_text(value));
  }
};

}  // namespace detail

/// A mixin with no options, for policies that take none (`Tag` keeps the bases distinct).
template <class Derived, class Tag>
struct NoOptions {
  void validate() const {}
  template <class V>
  void visit_options(V&& v) const {
    (void)v;
  }
  template <class V>
  static void visit_option_docs(V&& v) {
    (void)v;
  }
};

namespace detail {
template <class>
inline constexpr bool dependent_false = false;
}  // namespace detail

/// In a preset's defaults type: its name as users spell it, and the one-line compile error
/// for a constructor argument that is neither a parameter list nor a model.
#define MEP_PRESET(NAME, WHAT)                                                        \
  static constexpr const char* name = NAME;                                           \
  template <class T>                                                                  \
  static void not_a_model() {                                                         \
    static_assert(::mep::detail::dependent_false<T>, NAME " is constructed from " WHAT); \
  }

/// What the backprop family and the EP family are constructed from, for MEP_PRESET.
#define MEP_FROM_PARAMETERS "a parameter list (model->parameters()) or parameter groups"
#define MEP_FROM_MODEL \
  "the model: a torch::nn::Sequential, or mep::listing(net, layers) for your own torch::nn::Module"

/// The defaults of a composition no preset names: the policies' own defaults, learning rate
/// 0.01, heavy-ball momentum 0.9 and weight decay 5e-4. A preset's defaults type has the same
/// members: `name` (as users spell the preset, for messages), `lr` (absent when the options
/// need a learning rate, as `torch::optim::SGDOptions` does) and `apply(options)`, which sets
/// the preset's other defaults.
struct ComposedDefaults {
  MEP_PRESET("mep::Optimizer", MEP_FROM_PARAMETERS " or " MEP_FROM_MODEL)
  static constexpr double lr = 0.01;
  template <class O>
  static void apply(O&) {}
};

namespace detail {
template <class D, class = void>
struct has_default_lr : std::false_type {};
template <class D>
struct has_default_lr<D, std::void_t<decltype(D::lr)>> : std::true_type {};
template <class U, class = void>
struct has_owns_momentum_for : std::false_type {};
template <class U>
struct has_owns_momentum_for<U, std::void_t<decltype(&U::owns_momentum_for)>> : std::true_type {};

/// Whether the optimizer applies heavy-ball momentum for some of this update's parameters
/// (then it offers the momentum options): every update that does not carry its own moments,
/// and those that carry them for some tensors only (Dion: not for the vectors).
template <class Update>
constexpr bool uses_heavy_ball() {
  return !Update::owns_momentum || has_owns_momentum_for<Update>::value;
}
struct NoMomentum;

/// Whether options mixin M documents its options (`visit_option_docs`, see the top of this
/// file); a user's policy may not, and then its options have no meaning to show.
struct IgnoreOptionDoc {
  void operator()(const char*, const char*) const {}
};
template <class M, class = void>
struct has_option_docs : std::false_type {};
template <class M>
struct has_option_docs<M, std::void_t<decltype(M::visit_option_docs(IgnoreOptionDoc{}))>> : std::true_type {};
template <class M, class V>
void visit_option_docs_of(V& v) {
  if constexpr (has_option_docs<M>::value) M::visit_option_docs(v);
}

/// Reads every visited option back from an archive, in its own type.
struct OptionReader {
  torch::serialize::InputArchive& archive;
  template <class T>
  void operator()(const char* name, const T& value) const {
    c10::IValue v;
    archive.read(name, v);
    T& out = const_cast<T&>(value);  // a member of options that are being loaded, not const
    if constexpr (std::is_same_v<T, bool>) out = v.toBool();
    else if constexpr (std::is_enum_v<T>) out = static_cast<T>(static_cast<int64_t>(ivalue_number(v)));
    else out = static_cast<T>(ivalue_number(v));
  }
};
}  // namespace detail

/// The options type of `Optimizer<Gradient, Update, Constraint, Feedback, Defaults>`: the
/// learning rate and weight decay, heavy-ball momentum where the optimizer applies it, and
/// every policy's own options. Constructed from the learning rate, which may be left out
/// where `Defaults` has one.
template <class Gradient, class Update, class Constraint, class Feedback, class Defaults = ComposedDefaults>
class OptimizerOptions
    : public torch::optim::OptimizerCloneableOptions<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>>,
      public CommonOptions<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>>,
      public std::conditional_t<detail::uses_heavy_ball<Update>(),
                                MomentumOptions<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>>,
                                NoOptions<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>,
                                          detail::NoMomentum>>,
      public Gradient::template Options<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>>,
      public Update::template Options<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>>,
      public Constraint::template Options<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>>,
      public Feedback::template Options<OptimizerOptions<Gradient, Update, Constraint, Feedback, Defaults>> {
  using Self = OptimizerOptions;
  using Momentum = std::conditional_t<detail::uses_heavy_ball<Update>(), MomentumOptions<Self>,
                                      NoOptions<Self, detail::NoMomentum>>;

 public:
  /// Whether these options have momentum, dampening and nesterov.
  static constexpr bool has_momentum = detail::uses_heavy_ball<Update>();

  /// The preset's defaults with its learning rate (only where it has one).
  template <class D = Defaults, std::enable_if_t<detail::has_default_lr<D>::value, int> = 0>
  OptimizerOptions() : OptimizerOptions(D::lr) {}
  /// The preset's defaults with learning rate `lr` (implicit, as torch::optim's options are:
  /// `mep::SGD opt(params, 0.01)`).
  OptimizerOptions(double lr) {  // NOLINT(google-explicit-constructor)
    Defaults::apply(*this);
    this->lr(lr);
  }

  /// Throws OptionError naming the first invalid option.
  void validate() const {
    CommonOptions<Self>::validate();
    Momentum::validate();
    Gradient::template Options<Self>::validate();
    Update::template Options<Self>::validate();
    Constraint::template Options<Self>::validate();
    Feedback::template Options<Self>::validate();
  }

  /// Data parallelism (data_parallel.hpp): gradients are averaged over this process group
  /// before every update. None by default; not saved with the options. Set it on the
  /// optimizer's options: a parameter group may not name another.
  Self& process_group(ProcessGroupPtr group) {
    process_group_ = std::move(group);
    return *this;
  }
  const ProcessGroupPtr& process_group() const noexcept { return process_group_; }

  /// How a step's failure reaches the host (StepCheck; Auto by default). Not saved with the
  /// options; set it on the optimizer's options.
  Self& step_check(StepCheck check) {
    MEP_CHECK_ENUM_OPTION(check, "step_check");
    step_check_ = check;
    return *this;
  }
  StepCheck step_check() const noexcept { return step_check_; }

  double get_lr() const override { return this->lr(); }
  void set_lr(const double lr) override { this->lr(lr); }

  /// The options a parameter group may set: lr, then momentum, dampening and nesterov where
  /// they exist, then weight_decay.
  template <class V>
  void visit_group_options(V&& v) const {
    v("lr", this->lr_);
    Momentum::visit_options(v);
    v("weight_decay", this->weight_decay_);
  }

  /// Every option of the four policies (not the group options), in declaration order.
  template <class V>
  void visit_policy_options(V&& v) const {
    Gradient::template Options<Self>::visit_options(v);
    Update::template Options<Self>::visit_options(v);
    Constraint::template Options<Self>::visit_options(v);
    Feedback::template Options<Self>::visit_options(v);
  }

  /// Every option, the group options first, then the policies': v(name, value).
  template <class V>
  void visit_all_options(V&& v) const {
    visit_group_options(v);
    visit_policy_options(v);
  }

  /// Sets the option called `name` from its text ("0.02", "5", "true", "polar_express", a
  /// pair as "0.9,0.999"; enums by the names in `enum_names`). Returns false when these
  /// options have no such option; throws OptionError when the text is not a value of the
  /// option's type. The value itself is validated with the others when an optimizer is built
  /// from these options.
  bool set(const std::string& name, const std::string& text) {
    bool found = false;
    visit_all_options([&](const char* option, const auto& value) {
      if (found || name != option) return;
      using T = std::decay_t<decltype(value)>;
      T parsed{};
      if (!detail::parse_option(text, parsed)) {
        std::ostringstream os;
        os << "mep: invalid option " << option << " = '" << text << "' (expected " << detail::option_kind<T>() << ")";
        throw OptionError(os.str());
      }
      const_cast<T&>(value) = parsed;  // a member of *this, which is not const here
      found = true;
    });
    return found;
  }

  /// The meaning of every option that visit_all_options visits, as v(name, meaning), from the
  /// options mixins (each documents its own next to them). A user's policy whose options have
  /// no `visit_option_docs` contributes nothing.
  template <class V>
  static void visit_option_docs(V&& v) {
    detail::visit_option_docs_of<CommonOptions<Self>>(v);
    detail::visit_option_docs_of<Momentum>(v);
    detail::visit_option_docs_of<typename Gradient::template Options<Self>>(v);
    detail::visit_option_docs_of<typename Update::template Options<Self>>(v);
    detail::visit_option_docs_of<typename Constraint::template Options<Self>>(v);
    detail::visit_option_docs_of<typename Feedback::template Options<Self>>(v);
  }

  /// The one-line meaning of option `name`; nullptr when it has none.
  static const char* option_meaning(const std::string& name) {
    const char* meaning = nullptr;
    visit_option_docs([&](const char* option, const char* text) {
      if (meaning == nullptr && name == option) meaning = text;
    });
    return meaning;
  }

  /// The options that visit_all_options does not visit (not saved, not set by name), as
  /// v(name, text of the current value, meaning).
  template <class V>
  void visit_unsaved_options(V&& v) const {
    v("step_check", detail::option_text(step_check_),
      "how a failed step reaches the host (StepCheck): immediate, one host read per step and the step throws; "
      "deferred, no read, a later step or check_failures() throws; auto, immediate on the CPU, deferred on CUDA");
    v("process_group", process_group_ ? "set" : "none",
      "average the gradients over this process group's ranks before every update (data_parallel.hpp); "
      "set on the optimizer's options, not a parameter group's");
  }

  /// Every option as (name, text), in visit_all_options' order: what `set` reads back.
  std::vector<std::pair<std::string, std::string>> texts() const {
    std::vector<std::pair<std::string, std::string>> out;
    visit_all_options(detail::OptionCollector{out});
    return out;
  }

  /// The policy options as (name, text).
  std::vector<std::pair<std::string, std::string>> policy_texts() const {
    std::vector<std::pair<std::string, std::string>> out;
    visit_policy_options(detail::OptionCollector{out});
    return out;
  }

  /// Saves every option. Loading restores the group options (which may differ per group and
  /// change during training) and throws a std::runtime_error naming the first policy option
  /// saved with another value.
  void serialize(torch::serialize::OutputArchive& a) const override {
    visit_group_options(detail::OptionWriter{a});
    visit_policy_options(detail::OptionWriter{a});
  }
  void serialize(torch::serialize::InputArchive& a) override {
    visit_policy_options(detail::OptionChecker{a});
    visit_group_options(detail::OptionReader{a});
  }

 private:
  ProcessGroupPtr process_group_;
  StepCheck step_check_ = StepCheck::Auto;
};

}  // namespace mep
