#pragma once
/// \file trainers.hpp
/// The optimizers the benchmarks can run, behind one interface.
///
/// A `Trainer` owns a model and an optimizer and runs one training step on a batch.
/// `registry()` lists every optimizer the benchmark runs (`backprop_entry`, `model_step_entry`):
/// adding an optimizer is adding one line there. Each entry builds its trainer and lists the
/// options it would run with, the command line's (`TrainerConfig::shared`, `::own`) applied
/// by name (`mep::OptimizerOptions::set`). Two trainer kinds cover the library:
///  - backprop family (SGD, Adam, Muon): zero_grad, cross-entropy on the logits,
///    backward, step();
///  - model-owning family (the EP optimizers): the optimizer is built from the model and
///    `step(x, y)` does everything (settling, gradients, update), with the loss/energy
///    chosen by `TrainerConfig::loss` (--loss) and the settling by
///    `TrainerConfig::reference_settling` (--settling); `settle_report()` says what the
///    last step's settling did.

#include <mep/mep.hpp>

#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mep_bench {

/// Options by name and text, in the order they apply.
using OptionTexts = std::vector<std::pair<std::string, std::string>>;

/// What a factory may take from the command line.
struct TrainerConfig {
  double lr = 0.01;                ///< the entry's learning rate
  mep::Loss loss = mep::Loss::MSE;  ///< loss/energy of the EP family; backprop always uses cross-entropy
  bool error_feedback = false;      ///< error feedback where the optimizer has it (--error-feedback)
  mep::ErrorRule error_rule = mep::ErrorRule::Projected;  ///< its rule (--error-feedback projected|reference)
  bool reference_settling = false;  ///< EP family: the reference's settling (HeavyBall), not the default (--settling)
  OptionTexts shared;  ///< set where the optimizer has the option (--beta, --ns-steps, …)
  OptionTexts own;     ///< this optimizer's (--set NAME.OPTION=VALUE): each must exist
  mep::ProcessGroupPtr group;  ///< data parallelism over these ranks (--world-size > 1), or none
  bool cuda_graph = false;     ///< EP family: steps through mep::CudaGraphStep (--cuda-graph; CUDA builds only)
};

/// One optimizer bound to one model.
class Trainer {
 public:
  virtual ~Trainer() = default;
  /// One training step on a batch (the model is in train mode); returns the batch loss as
  /// a scalar tensor.
  virtual torch::Tensor step(const torch::Tensor& x, const torch::Tensor& y) = 0;
  /// What settling did in the last step (the EP family), or nullptr (backprop family).
  virtual const mep::SettleReport* settle_report() const { return nullptr; }
  /// The model and the optimizer's whole state, for --checkpoint / --resume.
  virtual void save(torch::serialize::OutputArchive& archive) const = 0;
  virtual void load(torch::serialize::InputArchive& archive) = 0;
  /// The optimizer, for what a schedule changes between epochs (the groups' learning rates).
  virtual torch::optim::Optimizer& optimizer() = 0;
  /// Its data-parallel collectives (bytes communicated), or nullptr.
  virtual const mep::DataParallel* data_parallel() const = 0;

 protected:
  static void save_pair(torch::serialize::OutputArchive& archive, const torch::nn::Sequential& model,
                        const torch::optim::Optimizer& opt) {
    torch::serialize::OutputArchive m, o;
    model->save(m);
    opt.save(o);
    archive.write("model", m);
    archive.write("optimizer", o);
  }
  static void load_pair(torch::serialize::InputArchive& archive, torch::nn::Sequential& model,
                        torch::optim::Optimizer& opt) {
    torch::serialize::InputArchive m, o;
    archive.read("model", m);
    archive.read("optimizer", o);
    model->load(m);
    opt.load(o);
  }
};

using TrainerFactory = std::function<std::unique_ptr<Trainer>(torch::nn::Sequential, const TrainerConfig&)>;
/// Every option the trainer a factory builds for `config` runs with, as (name, text).
using OptionLister = std::function<OptionTexts(const TrainerConfig&)>;

/// One row of the registry.
struct OptimizerEntry {
  std::string name;         ///< as given to --optimizers
  std::string label;        ///< as printed in the tables
  double lr = 0;            ///< the learning rate the benchmark uses: its preset's default
  double reference_lr = 0;  ///< with --settling reference: the reference preset's default
  TrainerFactory make;      ///< builds the trainer for a freshly initialised model
  OptionLister options;     ///< what `make` would configure, without building anything
};

/// Backprop family: zero_grad, cross-entropy on the logits, backward, step().
template <class Opt>
class BackpropTrainer final : public Trainer {
 public:
  BackpropTrainer(torch::nn::Sequential model, const typename Opt::Options& options)
      : model_(std::move(model)), opt_(model_->parameters(), options) {}

  void save(torch::serialize::OutputArchive& archive) const override { save_pair(archive, model_, opt_); }
  void load(torch::serialize::InputArchive& archive) override { load_pair(archive, model_, opt_); }
  torch::optim::Optimizer& optimizer() override { return opt_; }
  const mep::DataParallel* data_parallel() const override { return &opt_.data_parallel(); }

  torch::Tensor step(const torch::Tensor& x, const torch::Tensor& y) override {
    // Through step(closure): with a process group the optimizer returns the ranks' mean loss.
    return opt_
        .step([&] {
          opt_.zero_grad();
          auto loss = torch::nn::functional::cross_entropy(model_->forward(x), y);
          loss.backward();
          return loss;
        })
        .detach();
  }

 private:
  torch::nn::Sequential model_;
  Opt opt_;
};

namespace detail {
template <class Opt, class = void>
struct has_settle_report : std::false_type {};
template <class Opt>
struct has_settle_report<Opt, std::void_t<decltype(std::declval<const Opt&>().settle_report())>>
    : std::true_type {};
}  // namespace detail

/// Model-owning optimizers (the EP family): the whole `step(x, y)` call; with `cuda_graph`,
/// captured into a CUDA graph and replayed (mep/cuda_graph.hpp, MEP_WITH_CUDA builds only).
template <class Opt>
class ModelStepTrainer final : public Trainer {
 public:
  ModelStepTrainer(torch::nn::Sequential model, const typename Opt::Options& options, bool cuda_graph = false)
      : opt_(std::move(model), options) {
    if (!cuda_graph) return;
#ifdef MEP_WITH_CUDA
    graph_ = std::make_unique<mep::CudaGraphStep<Opt>>(opt_);
#else
    throw std::invalid_argument("--cuda-graph: this build has no CUDA support (LibTorch without CUDA at configure time)");
#endif
  }

  torch::Tensor step(const torch::Tensor& x, const torch::Tensor& y) override {
#ifdef MEP_WITH_CUDA
    if (graph_) return graph_->step(x, y);  // the graph's static loss: read before the next step
#endif
    return opt_.step(x, y);
  }
  torch::optim::Optimizer& optimizer() override { return opt_; }
  const mep::DataParallel* data_parallel() const override { return &opt_.data_parallel(); }
  void save(torch::serialize::OutputArchive& archive) const override { save_pair(archive, opt_.model(), opt_); }
  void load(torch::serialize::InputArchive& archive) override {
    auto model = opt_.model();
    load_pair(archive, model, opt_);
  }

  const mep::SettleReport* settle_report() const override {
    if constexpr (detail::has_settle_report<Opt>::value)
      return &opt_.settle_report();
    else
      return nullptr;
  }

 private:
  Opt opt_;
#ifdef MEP_WITH_CUDA
  std::unique_ptr<mep::CudaGraphStep<Opt>> graph_;  // after opt_, which it refers to
#endif
};

namespace detail {
template <class O, class = void>
struct has_loss_option : std::false_type {};
template <class O>
struct has_loss_option<O, std::void_t<decltype(std::declval<O&>().loss(mep::Loss::MSE))>> : std::true_type {};
template <class O, class = void>
struct has_error_feedback_option : std::false_type {};
template <class O>
struct has_error_feedback_option<O, std::void_t<decltype(std::declval<O&>().error_feedback(true))>>
    : std::true_type {};

/// `options` with the command line's options on top: the shared ones where they exist, then
/// this optimizer's own, each of which must exist.
template <class O>
O with_command_line(O options, const TrainerConfig& config, const std::string& name) {
  for (const auto& [option, text] : config.shared) options.set(option, text);
  for (const auto& [option, text] : config.own)
    if (!options.set(option, text))
      throw std::invalid_argument("--set " + name + "." + option + ": " + name + " has no option " + option);
  return options;
}

/// The options of a model-owning optimizer: library defaults, the entry's learning rate,
/// --loss and --error-feedback where it has them, then the command line's options.
template <class Opt>
typename Opt::Options model_step_options(const TrainerConfig& config, const std::string& name) {
  typename Opt::Options options(config.lr);
  options.process_group(config.group);
  if constexpr (has_loss_option<typename Opt::Options>::value) options.loss(config.loss);
  if constexpr (has_error_feedback_option<typename Opt::Options>::value)
    options.error_feedback(config.error_feedback).error_rule(config.error_rule);
  return with_command_line(options, config, name);
}
}  // namespace detail

/// A backprop-family entry: zero_grad, cross-entropy, backward, step() with `Opt`, whose
/// options are its preset's (at its default learning rate, unless the command line sets one)
/// with the command line's on top.
template <class Opt>
OptimizerEntry backprop_entry(std::string name, std::string label) {
  using Options = typename Opt::Options;
  auto options = [name](const TrainerConfig& c) { return detail::with_command_line(Options(c.lr), c, name); };
  OptimizerEntry e;
  e.name = name, e.label = std::move(label);
  e.lr = e.reference_lr = Options().lr();
  e.make = [options](torch::nn::Sequential model, const TrainerConfig& c) -> std::unique_ptr<Trainer> {
    auto o = options(c);
    o.process_group(c.group);
    return std::make_unique<BackpropTrainer<Opt>>(std::move(model), o);
  };
  e.options = [options](const TrainerConfig& c) {
    const auto o = options(c);
    o.validate();
    return o.texts();
  };
  return e;
}

/// A model-owning (EP family) entry: `Opt` with its library defaults, or with
/// `config.reference_settling` the same optimizer with the reference's settling
/// (`mep::with_settling_t<Opt, mep::HeavyBall>`). Its learning rates are the defaults of `Opt`'s
/// preset and of the reference's preset `ReferenceOpt` (`mep::reference::`).
template <class Opt, class ReferenceOpt>
OptimizerEntry model_step_entry(std::string name, std::string label) {
  using Reference = mep::with_settling_t<Opt, mep::HeavyBall>;
  OptimizerEntry e;
  e.name = name, e.label = std::move(label);
  e.lr = typename Opt::Options().lr();
  e.reference_lr = typename ReferenceOpt::Options().lr();
  e.make = [name](torch::nn::Sequential model, const TrainerConfig& c) -> std::unique_ptr<Trainer> {
    if (c.reference_settling)
      return std::make_unique<ModelStepTrainer<Reference>>(
          std::move(model), detail::model_step_options<Reference>(c, name), c.cuda_graph);
    return std::make_unique<ModelStepTrainer<Opt>>(std::move(model), detail::model_step_options<Opt>(c, name),
                                                   c.cuda_graph);
  };
  e.options = [name](const TrainerConfig& c) {
    auto texts = [](const auto& o) {
      o.validate();
      return o.texts();
    };
    return c.reference_settling ? texts(detail::model_step_options<Reference>(c, name))
                                : texts(detail::model_step_options<Opt>(c, name));
  };
  return e;
}

/// The optimizers the benchmark runs, in the order it runs them by default.
inline const std::vector<OptimizerEntry>& registry() {
  static const std::vector<OptimizerEntry> entries = {
      // The backprop family with the reference's defaults (momentum 0.9, weight decay 5e-4; Muon
      // cubic with the spectral constraint), as in the reference's tables.
      backprop_entry<mep::reference::SGD>("sgd", "SGD"),
      backprop_entry<mep::reference::Adam>("adam", "Adam"),
      backprop_entry<mep::reference::Muon>("muon", "Muon"),
      // The EP family, one line each, at the presets' learning rates (with --settling reference,
      // the reference presets').
      model_step_entry<mep::EqProp, mep::reference::EqProp>("eqprop", "EqProp"),
      model_step_entry<mep::SMEP, mep::reference::SMEP>("smep", "SMEP"),
      model_step_entry<mep::SDMEP, mep::reference::SDMEP>("sdmep", "SDMEP"),
      model_step_entry<mep::LocalEPMuon, mep::reference::LocalEPMuon>("local_ep", "LocalEP"),
      model_step_entry<mep::NaturalEPMuon, mep::reference::NaturalEPMuon>("natural_ep", "NaturalEP"),
  };
  return entries;
}

/// The names of the registry's optimizers, in its order.
inline std::vector<std::string> registry_names() {
  std::vector<std::string> names;
  for (const auto& e : registry()) names.push_back(e.name);
  return names;
}

/// The registry entry named `name`, or nullptr.
inline const OptimizerEntry* find_entry(const std::string& name) {
  for (const auto& e : registry())
    if (e.name == name) return &e;
  return nullptr;
}

}  // namespace mep_bench
