// The training runner: one optimizer at one seed, epoch by epoch (run_optimizer).

#include "runner.hpp"

#include "checkpoints.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <system_error>

namespace mep_bench {

namespace {
sigset_t interrupt_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}
}  // namespace

Interrupts::Interrupts() {
  const sigset_t set = interrupt_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

bool Interrupts::requested() const {
  sigset_t pending;
  sigemptyset(&pending);
  sigpending(&pending);
  return sigismember(&pending, SIGINT) == 1 || sigismember(&pending, SIGTERM) == 1;
}

void Interrupts::check() const {
  if (requested()) throw std::runtime_error("interrupted (SIGINT/SIGTERM); no output was written");
}

namespace {

namespace fs = std::filesystem;

/// Accumulates the settling reports of an epoch's steps.
struct SettleStats {
  int64_t n = 0;
  double steps = 0, residual = 0, converged = 0;

  void add(const mep::SettleReport& r) {
    ++n;
    steps += static_cast<double>(r.steps());
    residual += r.residual();
    converged += r.converged() ? 1 : 0;
  }
  void store(EpochRecord& e) const {
    if (n == 0) return;
    const double d = static_cast<double>(n);
    e.has_settle = true;
    e.settle_steps = steps / d;
    e.settle_residual = residual / d;
    e.settle_converged = converged / d;
  }
};

/// The value of option `name` in `options` as a number (0 if absent).
double option_number(const OptionTexts& options, const std::string& name) {
  for (const auto& [option, text] : options)
    if (option == name) return std::stod(text);
  return 0;
}

/// The model of `name`, initialised from `seed` (which then draws the shuffles), on `device`.
torch::nn::Sequential seeded_model(uint64_t seed, const std::string& name, const torch::Device& device) {
  torch::manual_seed(seed);
  auto model = mep::models::by_name(name);
  model->to(device);
  model->train();
  return model;
}

/// One optimizer's run at one seed: its model, its trainer and what it has done so far.
class OptimizerRun {
 public:
  OptimizerRun(const OptimizerEntry& entry, uint64_t seed, const Training& t)
      : entry_(entry),
        t_(t),
        model_(seeded_model(seed, t.opt.model, t.device)),
        config_(trainer_config(entry, t.opt, t.group)),
        trainer_(entry.make(model_, config_)),
        parallel_(trainer_->data_parallel()),
        bytes_at_start_(parallel_ ? parallel_->bytes() : 0),  // after the broadcast
        comm_s_at_start_(parallel_ ? parallel_->seconds() : 0),
        tag_(t.opt.seeds.size() > 1 ? fmt::format("{} seed {}", entry.name, seed) : entry.name),
        checkpoint_(checkpoint_path(t.opt, entry.name, seed)),
        batches_((t.train.size() + t.opt.batch - 1) / t.opt.batch) {
    result_.entry = &entry;
    result_.seed = seed;
    result_.options = entry.options(config_);
    result_.lr = option_number(result_.options, "lr");
  }

  /// The epochs done (by a resumed run's checkpoint).
  int64_t epochs_done() const { return static_cast<int64_t>(so_far_.records.size()); }

  /// Continues from the run's checkpoint, if it has one.
  void resume() {
    std::error_code ec;
    if (checkpoint_.empty() || !fs::exists(checkpoint_, ec)) return;
    so_far_ = load_checkpoint(checkpoint_, entry_.name, *trainer_);
    if (epochs_done() > t_.opt.epochs)
      throw std::runtime_error(fmt::format("--resume: {} has {} epochs, more than --epochs {}", checkpoint_,
                                           epochs_done(), t_.opt.epochs));
    std::cout << fmt::format("[{:<10}] resumed after epoch {}", tag_, epochs_done()) << std::endl;
  }

  /// One epoch: a step per batch of a fresh shuffle, then the evaluation and the checkpoint.
  void train_epoch(int64_t epoch) {
    const auto& opt = t_.opt;
    const int width = static_cast<int>(std::to_string(opt.epochs).size());
    const std::string prefix = fmt::format("[{:<10}] epoch {:>{}}/{}", tag_, epoch, width, opt.epochs);
    if (opt.lr_schedule == "cosine") {
      const double factor = 0.5 * (1 + std::cos(std::acos(-1.0) * static_cast<double>(epoch - 1) /
                                                static_cast<double>(opt.epochs)));
      for (auto& group : trainer_->optimizer().param_groups()) group.options().set_lr(result_.lr * factor);
    }
    auto perm = torch::randperm(t_.train.size(), torch::TensorOptions().dtype(torch::kLong));
    if (t_.device.is_cuda()) perm = perm.to(t_.device);
    double loss_sum = 0;
    SettleStats settle;
    const auto epoch_start = Clock::now();
    for (int64_t b = 0; b < batches_; ++b) {
      const double loss = step(perm, epoch, b);
      // Outside the timed region: reading the report is not part of the step.
      if (const auto* report = trainer_->settle_report(); report && !report->phases.empty()) settle.add(*report);
      if (!std::isfinite(loss))
        throw std::runtime_error(fmt::format("{}: non-finite training loss ({:g})", where(epoch, b), loss));
      loss_sum += loss;
      t_.progress.batch(prefix, b + 1, batches_, loss_sum / static_cast<double>(b + 1), seconds_since(epoch_start));
    }
    EpochRecord r;
    r.epoch = epoch;
    r.epoch_s = seconds_since(epoch_start);
    r.train_loss = loss_sum / static_cast<double>(batches_);
    // Only rank 0 reports: the others' models are identical (mep/data_parallel.hpp).
    const bool reports = opt.dist.rank == 0;
    const auto on_train = reports ? evaluate(model_, t_.train) : Eval{};
    const auto on_test = reports ? evaluate(model_, t_.test) : Eval{};
    r.train_acc = on_train.acc;
    r.val_loss = on_test.loss;
    r.val_acc = on_test.acc;
    settle.store(r);
    t_.progress.epoch_done(prefix, batches_, r);
    so_far_.epoch_times.push_back(r.epoch_s);
    so_far_.records.push_back(r);
    t_.interrupts.check();
    if (!checkpoint_.empty()) save_checkpoint(checkpoint_, entry_.name, *trainer_, so_far_);
  }

  /// The run's result: its epochs, best test accuracy, median epoch time and mean step time.
  Result finish() {
    result_.epochs = so_far_.records;
    for (const auto& r : result_.epochs) result_.best_val_acc = std::max(result_.best_val_acc, r.val_acc);
    result_.final_train_acc = result_.epochs.back().train_acc;
    result_.median_epoch_s = median(so_far_.epoch_times);
    const auto steps = static_cast<double>(so_far_.steps);
    result_.step_ms = so_far_.steps ? 1e3 * so_far_.step_s_total / steps : 0;
    if (parallel_ && parallel_->active() && so_far_.steps > 0) {
      result_.bytes_per_step = static_cast<double>(parallel_->bytes() - bytes_at_start_) / steps;
      result_.comm_ms = 1e3 * (parallel_->seconds() - comm_s_at_start_) / steps;
    }
    return result_;
  }

 private:
  /// "{tag}, epoch E, batch B/N" in errors.
  std::string where(int64_t epoch, int64_t b) const {
    return fmt::format("{}, epoch {}, batch {}/{}", tag_, epoch, b + 1, batches_);
  }

  /// Batch `b` of the shuffle `perm` (this rank's shard of it), one timed step on it; returns its loss.
  double step(const torch::Tensor& perm, int64_t epoch, int64_t b) {
    const auto& opt = t_.opt;
    const int64_t start = b * opt.batch;
    const auto idx = perm.narrow(0, start, std::min(opt.batch, t_.train.size() - start));
    auto x = t_.train.x.index_select(0, idx);
    auto y = t_.train.y.index_select(0, idx);
    if (opt.dist.world_size > 1) {  // this rank's shard of the batch
      const int64_t rows = x.size(0), ranks = opt.dist.world_size, r = opt.dist.rank;
      const int64_t lo = rows * r / ranks, hi = rows * (r + 1) / ranks;
      x = x.narrow(0, lo, hi - lo), y = y.narrow(0, lo, hi - lo);
    }
    double loss = 0;
    try {
      const auto step_start = Clock::now();
      auto l = trainer_->step(x, y);
      if (t_.device.is_cuda()) torch::cuda::synchronize();
      so_far_.step_s_total += seconds_since(step_start);
      loss = l.item<double>();
    } catch (const std::exception& e) {
      throw std::runtime_error(where(epoch, b) + ": " + message(e));
    }
    ++so_far_.steps;
    t_.interrupts.check();
    return loss;
  }

  const OptimizerEntry& entry_;
  const Training& t_;
  torch::nn::Sequential model_;
  TrainerConfig config_;  // what the command line asks of the optimizer
  std::unique_ptr<Trainer> trainer_;
  const mep::DataParallel* parallel_;  // the trainer's collectives, or nullptr
  int64_t bytes_at_start_;
  double comm_s_at_start_;
  std::string tag_;         // the optimizer (and seed) in progress lines and errors
  std::string checkpoint_;  // its file, or "" without --checkpoint
  int64_t batches_;
  Result result_;
  Progressed so_far_;
};

}  // namespace

Result run_optimizer(const OptimizerEntry& entry, uint64_t seed, const Training& training) {
  OptimizerRun run(entry, seed, training);
  if (training.opt.resume) run.resume();
  for (int64_t epoch = run.epochs_done() + 1; epoch <= training.opt.epochs; ++epoch) run.train_epoch(epoch);
  return run.finish();
}

}  // namespace mep_bench
