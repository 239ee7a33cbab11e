// mep_bench — the MNIST tables of the README's Results: trains one model per optimizer from identical
// initial weights on the same shuffles and reports accuracy and time, as a Markdown table
// and optionally as JSON.
//
//   mep_bench [--model mlp|mlp_small|cnn] [--optimizers sgd,adam,...] [--epochs 10]
//             [--train 3000] [--test 500] [--batch 128] [--seed 0] [--threads N]
//             [--device cpu|cuda] [--loss mse|ce] [--error-feedback off|reference|projected]
//             [--settling default|reference] [--lr LR] [--data data/mnist] [--json FILE]
//             [--checkpoint DIR [--resume]] [--csv FILE] [--svg FILE] [--cuda-graph]
//   mep_bench --from-json FILE,... [--json FILE] [--csv FILE] [--svg FILE]
//
// The second form trains nothing: it gathers runs saved by --json (one protocol, any seeds)
// into one table, picture and file.
//
// For the EP family, each epoch also reports what settling did (mean steps and relative
// residual per training step, fraction of steps that met the stopping rule).
//
// Every error is one line on stderr starting with "mep_bench: " and a non-zero exit.

#include "svg_chart.hpp"
#include "trainers.hpp"

#include <mep/process_group.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr int64_t kEvalBatch = 1000;  // evaluation batch (no gradients, so larger than training's)

std::string strf(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string strf(const char* format, ...) {
  va_list args;
  va_start(args, format);
  va_list copy;
  va_copy(copy, args);
  const int n = std::vsnprintf(nullptr, 0, format, copy);
  va_end(copy);
  std::string out(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(out.data(), out.size() + 1, format, args);
  va_end(args);
  return out;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  for (auto& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

/// The message of `e` on one line (c10::Error without its C++ backtrace).
std::string message(const std::exception& e) {
  if (const auto* c10e = dynamic_cast<const c10::Error*>(&e)) return one_line(c10e->what_without_backtrace());
  return one_line(e.what());
}

struct Options {
  std::string data = "data/mnist";
  std::string model = "mlp";
  std::string optimizers;  // empty: every optimizer of the registry
  int64_t epochs = 10;
  int64_t train = 3000;
  int64_t test = 500;
  int64_t batch = 128;
  uint64_t seed = 0;
  std::vector<uint64_t> seeds;  // --seeds: one run of every optimizer per seed (default: {seed})
  int threads = 0;
  std::string device = "cpu";
  std::string loss = "mse";
  std::string error_feedback = "off";
  std::string settling = "default";
  double lr = 0;  // 0: each optimizer's own (the reference's) learning rate
  std::string lr_schedule = "constant";  // or "cosine": lr·½(1 + cos(π·(epoch − 1)/epochs)) per epoch
  bool cuda_graph = false;  // EP family: steps as CUDA graphs (mep/cuda_graph.hpp)
  mep_bench::OptionTexts shared_options;  // --beta, --ns-steps, …: (option, text), where an optimizer has it
  std::vector<std::array<std::string, 3>> sets;  // --set NAME.OPTION=VALUE: {name, option, text}
  std::vector<double> normalize = {0.1307, 0.3081};  // pixel/255 → (x − mean)/std: MNIST's
  std::string protocol = "seed";  // seed: the first --train/--test samples; full: every sample of the files
  std::string json;
  std::string csv;
  std::string svg;
  std::string checkpoint;  // directory: save after every epoch
  bool resume = false;     // continue the run saved in `checkpoint`
  mep::ProcessGroupConfig dist;  // --world-size, --rank, --master-addr, --master-port (or torchrun's variables)
  mep::ProcessGroupPtr group;    // the ranks, when dist.world_size > 1
};

struct EpochRecord {
  int64_t epoch = 0;
  double train_loss = 0, train_acc = 0, val_loss = 0, val_acc = 0, epoch_s = 0;
  // What settling did (EP family only, has_settle): means over the epoch's steps.
  bool has_settle = false;
  double settle_steps = 0, settle_residual = 0, settle_converged = 0;  ///< steps, residual, fraction converged
};

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

struct Result {
  const mep_bench::OptimizerEntry* entry = nullptr;
  std::string label;    // entry's label, with `variant` (label_runs)
  std::string variant;  // the options in which it differs from the optimizer's other runs
  uint64_t seed = 0;
  double lr = 0;
  mep_bench::OptionTexts options;  // every option it ran with
  std::vector<EpochRecord> epochs;
  double best_val_acc = 0, final_train_acc = 0, median_epoch_s = 0, step_ms = 0;
  double bytes_per_step = 0;  // --world-size > 1: bytes each rank handed to the steps' collectives
  double comm_ms = 0;         // --world-size > 1: milliseconds per step rank 0 spent in them
};

struct Split {
  torch::Tensor x, y;
  int64_t size() const { return x.size(0); }
};

nlohmann::ordered_json epoch_json(const EpochRecord& e) {
  nlohmann::ordered_json eo{{"epoch", e.epoch},     {"train_loss", e.train_loss}, {"train_acc", e.train_acc},
                            {"val_loss", e.val_loss}, {"val_acc", e.val_acc},     {"epoch_s", e.epoch_s}};
  if (e.has_settle) {  // EP family only
    eo["settle_steps"] = e.settle_steps;
    eo["settle_residual"] = e.settle_residual;
    eo["settle_converged"] = e.settle_converged;
  }
  return eo;
}

EpochRecord epoch_from_json(const nlohmann::json& j) {
  EpochRecord e;
  e.epoch = j.at("epoch").get<int64_t>();
  e.train_loss = j.at("train_loss"), e.train_acc = j.at("train_acc"), e.val_loss = j.at("val_loss");
  e.val_acc = j.at("val_acc"), e.epoch_s = j.at("epoch_s");
  if (j.contains("settle_steps")) {
    e.has_settle = true;
    e.settle_steps = j.at("settle_steps"), e.settle_residual = j.at("settle_residual");
    e.settle_converged = j.at("settle_converged");
  }
  return e;
}

// --- progress output --------------------------------------------------------------------

/// The per-epoch progress line: rewritten in place with '\r' on a terminal, printed once
/// per epoch otherwise.
class Progress {
 public:
  explicit Progress(bool tty) : tty_(tty) {}

  /// On a terminal: batch i of n, the running loss, the epoch's elapsed time and its ETA.
  void batch(const std::string& prefix, int64_t i, int64_t n, double running_loss, double elapsed_s) {
    if (!tty_) return;
    const double eta = elapsed_s / static_cast<double>(i) * static_cast<double>(n - i);
    std::cout << '\r' << prefix
              << strf("  batch %*lld/%lld  loss %.4f  elapsed %.1fs  ETA %.1fs", digits(n), static_cast<long long>(i),
                      static_cast<long long>(n), running_loss, elapsed_s, eta)
              << "\033[K" << std::flush;
    open_ = true;
  }

  void epoch_done(const std::string& prefix, int64_t n, const EpochRecord& r) {
    if (tty_) std::cout << '\r';
    std::cout << prefix
              << strf("  batch %lld/%lld  loss %.4f  | train %6.2f%%  val %6.2f%% (loss %.4f)  | %.2fs",
                      static_cast<long long>(n), static_cast<long long>(n), r.train_loss, 100 * r.train_acc,
                      100 * r.val_acc, r.val_loss, r.epoch_s);
    if (r.has_settle)
      std::cout << strf("  | settle %.1f steps, residual %.1e, converged %.0f%%", r.settle_steps, r.settle_residual,
                        100 * r.settle_converged);
    if (tty_) std::cout << "\033[K";
    std::cout << '\n' << std::flush;
    open_ = false;
  }

  /// Ends a half-written line (before an error message).
  void close() {
    if (open_) std::cout << '\n' << std::flush;
    open_ = false;
  }

 private:
  static int digits(int64_t n) { return static_cast<int>(std::to_string(n).size()); }
  bool tty_;
  bool open_ = false;
};

Progress* g_progress = nullptr;
std::string g_rank_tag;  // " (rank R)" in errors of a distributed run

// SIGINT/SIGTERM: the run stops after the current step with one line and exit status 130;
// nothing half-written is left (outputs are written at the end, by rename).
volatile std::sig_atomic_t g_interrupted = 0;
extern "C" void on_interrupt(int) { g_interrupted = 1; }

void check_interrupt() {
  if (g_interrupted) throw std::runtime_error("interrupted (SIGINT/SIGTERM); no output was written");
}

// --- data and evaluation ----------------------------------------------------------------

Split load(const std::string& dir, bool train, int64_t limit, const std::vector<double>& normalize,
           const torch::Device& device) {
  try {
    auto ds = mep::data::load_split(dir, train, limit, normalize[0], normalize[1]);
    return {ds.images.to(device), ds.labels.to(device)};
  } catch (const mep::data::IdxError& e) {
    throw std::runtime_error(strf("cannot load the %s split (--%s %lld): %s", train ? "training" : "test",
                                  train ? "train" : "test", static_cast<long long>(limit), e.what()));
  }
}

struct Eval {
  double loss = 0, acc = 0;
};

/// Cross-entropy and accuracy of `model` in eval mode on a whole split.
Eval evaluate(torch::nn::Sequential& model, const Split& split) {
  torch::NoGradGuard no_grad;
  model->eval();
  const int64_t n = split.size();
  auto loss_sum = torch::zeros({}, split.x.options().dtype(torch::kDouble));
  auto correct = torch::zeros({}, split.y.options());
  for (int64_t start = 0; start < n; start += kEvalBatch) {
    const int64_t len = std::min(kEvalBatch, n - start);
    auto out = model->forward(split.x.narrow(0, start, len));
    auto y = split.y.narrow(0, start, len);
    namespace F = torch::nn::functional;
    loss_sum += F::cross_entropy(out, y, F::CrossEntropyFuncOptions().reduction(torch::kSum)).to(torch::kDouble);
    correct += out.argmax(1).eq(y).sum();
  }
  model->train();
  return {loss_sum.item<double>() / n, static_cast<double>(correct.item<int64_t>()) / n};
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

/// Mean and sample standard deviation (0 for a single value).
std::pair<double, double> mean_sd(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  double mean = 0, var = 0;
  for (double x : v) mean += x / n;
  for (double x : v) var += (x - mean) * (x - mean);
  return {mean, v.size() > 1 ? std::sqrt(var / (n - 1)) : 0.0};
}

/// The seeds as text, separated by `sep`.
std::string seed_list(const std::vector<uint64_t>& seeds, const char* sep) {
  std::vector<std::string> names;
  for (auto seed : seeds) names.push_back(std::to_string(seed));
  return join(names, sep);
}

/// Writes `write(tmp)` to a temporary file beside `path` and renames it into place.
template <class Write>
void write_atomically(const std::string& path, const char* what, Write write) {
  const std::string tmp = path + ".tmp";
  std::error_code ec;
  try {
    write(tmp);
  } catch (const std::exception& e) {
    fs::remove(tmp, ec);
    throw std::runtime_error(strf("%s %s: write failed: %s", what, path.c_str(), message(e).c_str()));
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error(strf("%s %s: cannot rename the written file into place: %s", what, path.c_str(),
                                  ec.message().c_str()));
  }
}

/// Writes a text file atomically through `write(stream)` (for the flag `what`).
template <class Write>
void write_text(const std::string& path, const char* what, Write write) {
  write_atomically(path, what, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::trunc);
    write(out);
    out.close();
    if (!out) throw std::runtime_error("cannot write");
  });
}

/// Writes the JSON atomically (for the flag `what`): never a half-written file.
void write_json(const std::string& path, const nlohmann::ordered_json& j, const char* what = "--json") {
  write_text(path, what, [&](std::ostream& out) { out << j.dump(2) << '\n'; });
}

// --- checkpoints (--checkpoint DIR, --resume) ----------------------------------------------

/// What must be equal for a run to continue another: everything but the outputs and --epochs
/// (which a cosine schedule anneals over, so that it must be equal too).
nlohmann::ordered_json run_protocol(const Options& opt, int threads, const std::vector<std::string>& names) {
  nlohmann::ordered_json p = {{"model", opt.model},     {"data", opt.data},       {"train", opt.train},
                              {"test", opt.test},       {"batch", opt.batch},     {"seeds", opt.seeds},
                              {"threads", threads},     {"device", opt.device},   {"loss", opt.loss},
                              {"error_feedback", opt.error_feedback},             {"settling", opt.settling},
                              {"lr", opt.lr},           {"lr_schedule", opt.lr_schedule},
                              {"normalize", opt.normalize},
                              {"optimizers", join(names, ",")}};
  auto& options = p["options"] = nlohmann::ordered_json::array();
  for (const auto& [option, text] : opt.shared_options) options.push_back(option + "=" + text);
  for (const auto& [name, option, text] : opt.sets) options.push_back(name + "." + option + "=" + text);
  if (opt.lr_schedule == "cosine") p["epochs"] = opt.epochs;
  if (opt.cuda_graph) p["cuda_graph"] = true;
  return p;
}

/// --checkpoint: creates DIR and its run.json; with --resume, checks that DIR holds a run
/// of the same protocol instead.
void prepare_checkpoints(const Options& opt, const nlohmann::ordered_json& protocol) {
  const fs::path dir(opt.checkpoint);
  const std::string manifest = (dir / "run.json").string();
  std::error_code ec;
  if (!opt.resume) {
    fs::create_directories(dir, ec);
    if (ec || !fs::is_directory(dir, ec))
      throw std::runtime_error(strf("--checkpoint %s: cannot create the directory", opt.checkpoint.c_str()));
    write_json(manifest, protocol, "--checkpoint");
    return;
  }
  std::ifstream in(manifest);
  if (!in) throw std::runtime_error(strf("--resume: %s holds no mep_bench run (no run.json)", opt.checkpoint.c_str()));
  nlohmann::json saved;
  try {
    in >> saved;
  } catch (const std::exception&) {
    throw std::runtime_error(strf("--resume: %s is corrupt (not JSON)", manifest.c_str()));
  }
  for (const auto& [key, value] : protocol.items()) {
    if (saved.contains(key) && saved[key].dump() == value.dump()) continue;
    throw std::runtime_error(strf("--resume: the checkpoint in %s is of another run: %s %s there, %s here",
                                  opt.checkpoint.c_str(), key.c_str(),
                                  saved.contains(key) ? saved[key].dump().c_str() : "missing", value.dump().c_str()));
  }
}

/// An optimizer's run so far.
struct Progressed {
  std::vector<EpochRecord> records;
  double step_s_total = 0;
  int64_t steps = 0;
  std::vector<double> epoch_times;
};

void save_checkpoint(const std::string& path, const std::string& name, const mep_bench::Trainer& trainer,
                     const Progressed& p) {
  nlohmann::ordered_json progress{{"step_s_total", p.step_s_total}, {"steps", p.steps},
                                  {"epoch_times", p.epoch_times}, {"epochs", nlohmann::ordered_json::array()}};
  for (const auto& r : p.records) progress["epochs"].push_back(epoch_json(r));
  torch::serialize::OutputArchive archive, trained;
  archive.write("optimizer_name", c10::IValue(name));
  archive.write("progress", c10::IValue(progress.dump()));
  auto generator = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    archive.write("rng", generator.get_state(), /*is_buffer=*/true);
  }
  trainer.save(trained);
  archive.write("trainer", trained);
  write_atomically(path, "--checkpoint", [&](const std::string& tmp) { archive.save_to(tmp); });
}

/// Restores an optimizer's run (model, optimizer, random generator, records) from `path`.
Progressed load_checkpoint(const std::string& path, const std::string& name, mep_bench::Trainer& trainer) {
  try {
    torch::serialize::InputArchive archive, trained;
    archive.load_from(path);
    c10::IValue v;
    archive.read("optimizer_name", v);
    if (v.toStringRef() != name)
      throw std::runtime_error("it holds optimizer " + v.toStringRef() + ", not " + name);
    archive.read("progress", v);
    const auto progress = nlohmann::json::parse(v.toStringRef());
    Progressed p;
    p.step_s_total = progress.at("step_s_total");
    p.steps = progress.at("steps");
    p.epoch_times = progress.at("epoch_times").get<std::vector<double>>();
    for (const auto& e : progress.at("epochs")) p.records.push_back(epoch_from_json(e));
    torch::Tensor rng;
    archive.read("rng", rng, /*is_buffer=*/true);
    archive.read("trainer", trained);
    trainer.load(trained);
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(rng);
    return p;
  } catch (const std::exception& e) {
    throw std::runtime_error(strf("--resume: %s: %s", path.c_str(), message(e).c_str()));
  }
}

// --- one optimizer ----------------------------------------------------------------------

/// What the command line asks of `entry`'s optimizer.
mep_bench::TrainerConfig trainer_config(const mep_bench::OptimizerEntry& entry, const Options& opt) {
  mep_bench::TrainerConfig config;
  config.lr = opt.lr > 0 ? opt.lr : opt.settling == "reference" && entry.reference_lr > 0 ? entry.reference_lr : entry.lr;
  config.loss = opt.loss == "ce" ? mep::Loss::CrossEntropy : mep::Loss::MSE;
  config.error_feedback = opt.error_feedback != "off";
  config.error_rule = opt.error_feedback == "reference" ? mep::ErrorRule::Reference : mep::ErrorRule::Projected;
  config.reference_settling = opt.settling == "reference";
  config.shared = opt.shared_options;
  config.group = opt.group;
  config.cuda_graph = opt.cuda_graph;
  for (const auto& [name, option, text] : opt.sets)
    if (name == entry.name) config.own.emplace_back(option, text);
  return config;
}

/// The value of option `name` in `options` as a number (0 if absent).
double option_number(const mep_bench::OptionTexts& options, const std::string& name) {
  for (const auto& [option, text] : options)
    if (option == name) return std::stod(text);
  return 0;
}

/// The checkpoint file of one optimizer and seed ({name}.pt for a single seed).
std::string checkpoint_path(const Options& opt, const std::string& name, uint64_t seed) {
  if (opt.checkpoint.empty()) return {};
  const std::string file = opt.seeds.size() > 1 ? strf("%s.seed%llu.pt", name.c_str(), static_cast<unsigned long long>(seed))
                                                : name + ".pt";
  return (fs::path(opt.checkpoint) / file).string();
}

Result run_optimizer(const mep_bench::OptimizerEntry& entry, uint64_t seed, const Options& opt, const Split& train,
                     const Split& test, const torch::Device& device, Progress& progress) {
  // Same seed before building: every optimizer starts from identical weights and then
  // draws the same shuffles.
  torch::manual_seed(seed);
  auto model = mep::models::by_name(opt.model);
  model->to(device);
  model->train();

  const auto config = trainer_config(entry, opt);
  auto trainer = entry.make(model, config);
  const auto* parallel = trainer->data_parallel();
  const int64_t bytes_at_start = parallel ? parallel->bytes() : 0;  // after the broadcast
  const double comm_s_at_start = parallel ? parallel->seconds() : 0;

  Result result;
  result.entry = &entry;
  result.seed = seed;
  result.options = entry.options(config);
  result.lr = option_number(result.options, "lr");
  const int64_t n = train.size();
  const int64_t batches = (n + opt.batch - 1) / opt.batch;
  const bool cuda = device.is_cuda();
  double step_s_total = 0;
  int64_t steps = 0;
  std::vector<double> epoch_times;
  int64_t first_epoch = 1;
  const std::string checkpoint = checkpoint_path(opt, entry.name, seed);
  const std::string tag =
      opt.seeds.size() > 1 ? strf("%s seed %llu", entry.name.c_str(), static_cast<unsigned long long>(seed)) : entry.name;
  std::error_code ec;
  if (opt.resume && fs::exists(checkpoint, ec)) {
    auto p = load_checkpoint(checkpoint, entry.name, *trainer);
    const auto done = static_cast<int64_t>(p.records.size());
    if (done > opt.epochs)
      throw std::runtime_error(strf("--resume: %s has %lld epochs, more than --epochs %lld", checkpoint.c_str(),
                                    static_cast<long long>(done), static_cast<long long>(opt.epochs)));
    result.epochs = std::move(p.records);
    step_s_total = p.step_s_total, steps = p.steps, epoch_times = std::move(p.epoch_times);
    first_epoch = done + 1;
    std::cout << strf("[%-10s] resumed after epoch %lld", tag.c_str(), static_cast<long long>(done)) << std::endl;
  }

  for (int64_t epoch = first_epoch; epoch <= opt.epochs; ++epoch) {
    const std::string prefix = strf("[%-10s] epoch %*lld/%lld", tag.c_str(),
                                    static_cast<int>(std::to_string(opt.epochs).size()),
                                    static_cast<long long>(epoch), static_cast<long long>(opt.epochs));
    if (opt.lr_schedule == "cosine") {
      const double factor = 0.5 * (1 + std::cos(std::acos(-1.0) * static_cast<double>(epoch - 1) / static_cast<double>(opt.epochs)));
      for (auto& group : trainer->optimizer().param_groups()) group.options().set_lr(result.lr * factor);
    }
    auto perm = torch::randperm(n, torch::TensorOptions().dtype(torch::kLong));
    if (cuda) perm = perm.to(device);
    double loss_sum = 0;
    SettleStats settle;
    const auto epoch_start = Clock::now();
    for (int64_t b = 0; b < batches; ++b) {
      const int64_t start = b * opt.batch;
      const auto idx = perm.narrow(0, start, std::min(opt.batch, n - start));
      auto x = train.x.index_select(0, idx);
      auto y = train.y.index_select(0, idx);
      if (opt.dist.world_size > 1) {  // this rank's shard of the batch
        const int64_t rows = x.size(0), ranks = opt.dist.world_size, r = opt.dist.rank;
        const int64_t lo = rows * r / ranks, hi = rows * (r + 1) / ranks;
        x = x.narrow(0, lo, hi - lo), y = y.narrow(0, lo, hi - lo);
      }
      double loss = 0;
      try {
        const auto step_start = Clock::now();
        auto l = trainer->step(x, y);
        if (cuda) torch::cuda::synchronize();
        step_s_total += seconds_since(step_start);
        loss = l.item<double>();
      } catch (const std::exception& e) {
        throw std::runtime_error(strf("%s, epoch %lld, batch %lld/%lld: %s", tag.c_str(),
                                      static_cast<long long>(epoch), static_cast<long long>(b + 1),
                                      static_cast<long long>(batches), message(e).c_str()));
      }
      ++steps;
      check_interrupt();
      // Outside the timed region: reading the report is not part of the step.
      if (const auto* report = trainer->settle_report(); report && !report->phases.empty()) settle.add(*report);
      if (!std::isfinite(loss))
        throw std::runtime_error(strf("%s, epoch %lld, batch %lld/%lld: non-finite training loss (%g)",
                                      tag.c_str(), static_cast<long long>(epoch),
                                      static_cast<long long>(b + 1), static_cast<long long>(batches), loss));
      loss_sum += loss;
      progress.batch(prefix, b + 1, batches, loss_sum / static_cast<double>(b + 1), seconds_since(epoch_start));
    }
    EpochRecord r;
    r.epoch = epoch;
    r.epoch_s = seconds_since(epoch_start);
    r.train_loss = loss_sum / static_cast<double>(batches);
    // Only rank 0 reports: the others' models are identical (data_parallel.hpp).
    const auto on_train = opt.dist.rank == 0 ? evaluate(model, train) : Eval{};
    const auto on_test = opt.dist.rank == 0 ? evaluate(model, test) : Eval{};
    r.train_acc = on_train.acc;
    r.val_loss = on_test.loss;
    r.val_acc = on_test.acc;
    settle.store(r);
    progress.epoch_done(prefix, batches, r);
    epoch_times.push_back(r.epoch_s);
    result.epochs.push_back(r);
    check_interrupt();
    if (!checkpoint.empty())
      save_checkpoint(checkpoint, entry.name, *trainer, Progressed{result.epochs, step_s_total, steps, epoch_times});
  }

  for (const auto& r : result.epochs) result.best_val_acc = std::max(result.best_val_acc, r.val_acc);
  result.final_train_acc = result.epochs.back().train_acc;
  result.median_epoch_s = median(epoch_times);
  result.step_ms = steps ? 1e3 * step_s_total / static_cast<double>(steps) : 0;
  if (parallel && parallel->active() && steps > 0) {
    result.bytes_per_step = static_cast<double>(parallel->bytes() - bytes_at_start) / static_cast<double>(steps);
    result.comm_ms = 1e3 * (parallel->seconds() - comm_s_at_start) / static_cast<double>(steps);
  }
  return result;
}

// --- reports ----------------------------------------------------------------------------

/// One label's runs over the seeds.
struct Summary {
  std::string label;
  std::vector<double> best;  // best test accuracy per seed
  std::vector<uint64_t> seeds;
  double mean = 0, sd = 0, final_train = 0, epoch_s = 0, step_ms = 0, lr = 0;
};

/// The value of option `name` in `options`, or "default" where the run does not record it.
std::string option_text(const mep_bench::OptionTexts& options, const std::string& name) {
  for (const auto& [option, text] : options)
    if (option == name) return text;
  return "default";
}

/// Labels every run: its optimizer's label, followed by the options in which that optimizer's
/// runs differ, e.g. "SMEP (spectral_mode clip)" beside "SMEP (spectral_mode scale)". Runs of
/// one command line differ only in their seeds, so theirs is the optimizer's label.
void label_runs(std::vector<Result>& results) {
  std::map<const mep_bench::OptimizerEntry*, std::vector<Result*>> by_entry;
  for (auto& r : results) by_entry[r.entry].push_back(&r);
  for (const auto& [entry, runs] : by_entry) {
    std::vector<std::string> names;  // every option any of its runs records, in order
    for (const auto* r : runs)
      for (const auto& [option, text] : r->options)
        if (std::find(names.begin(), names.end(), option) == names.end()) names.push_back(option);
    std::vector<std::string> differ;
    for (const auto& name : names)
      for (const auto* r : runs)
        if (option_text(r->options, name) != option_text(runs.front()->options, name)) {
          differ.push_back(name);
          break;
        }
    for (auto* r : runs) {
      std::vector<std::string> shown;
      for (const auto& name : differ) shown.push_back(name + " " + option_text(r->options, name));
      r->variant = join(shown, ", ");
      r->label = entry->label + (shown.empty() ? "" : " (" + r->variant + ")");
    }
  }
}

/// The runs of each label (one per seed), in the order the labels first ran.
std::vector<std::pair<std::string, std::vector<const Result*>>> runs_by_label(const std::vector<Result>& results) {
  std::vector<std::pair<std::string, std::vector<const Result*>>> out;
  for (const auto& r : results) {
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& g) { return g.first == r.label; });
    if (it == out.end()) it = out.insert(out.end(), {r.label, {}});
    it->second.push_back(&r);
  }
  return out;
}

std::vector<Summary> summarize(const std::vector<Result>& results) {
  std::vector<Summary> out;
  for (const auto& [label, runs] : runs_by_label(results)) {
    Summary s{label};
    std::vector<double> train, epoch_s, step_ms;
    for (const auto* r : runs)
      s.best.push_back(r->best_val_acc), train.push_back(r->final_train_acc), epoch_s.push_back(r->median_epoch_s),
          step_ms.push_back(r->step_ms), s.seeds.push_back(r->seed), s.lr = r->lr;
    std::tie(s.mean, s.sd) = mean_sd(s.best);
    s.final_train = mean_sd(train).first;
    s.epoch_s = median(epoch_s), s.step_ms = median(step_ms);
    out.push_back(std::move(s));
  }
  std::stable_sort(out.begin(), out.end(), [](const Summary& a, const Summary& b) { return a.mean > b.mean; });
  return out;
}

/// The Markdown table: with several seeds, best test accuracy as mean ± sample standard
/// deviation (then each seed's), final train accuracy as the mean, times as medians.
void print_table(const std::vector<Result>& results, const std::vector<uint64_t>& seeds) {
  const auto rows = summarize(results);
  const bool many = seeds.size() > 1;
  const std::string acc_header = many ? "Best Test Acc (mean ± sd; seeds " + seed_list(seeds, ", ") + ")" : "Best Test Acc";
  std::cout << "\n| Rank | Optimizer | " << acc_header << " | Final Train Acc | Time/Epoch | ms/step | Learning Rate |\n"
            << "|------|-----------|---------------|-----------------|------------|---------|---------------|\n";
  size_t rank = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    if (i == 0 || r.mean != rows[i - 1].mean) rank = i + 1;  // ties share a rank
    std::string acc = strf("%.2f%%", 100 * r.mean);
    if (many) {  // saved runs (--from-json) may hold some of the seeds only: those are named
      std::vector<std::string> each;
      for (double b : r.best) each.push_back(strf("%.1f", 100 * b));
      const std::string which = r.seeds == seeds ? "" : "; seed" + std::string(r.seeds.size() > 1 ? "s " : " ") +
                                                            seed_list(r.seeds, ", ") + " only";
      acc = r.best.size() > 1
                ? strf("%.2f ± %.2f%% (%s%s)", 100 * r.mean, 100 * r.sd, join(each, " / ").c_str(), which.c_str())
                : strf("%.2f%% (%s)", 100 * r.mean, which.substr(2).c_str());
    }
    std::cout << strf("| %zu | %s | %s | %.2f%% | %.2fs | %.2f | %g |\n", rank, r.label.c_str(), acc.c_str(),
                      100 * r.final_train, r.epoch_s, r.step_ms, r.lr);
  }
  std::cout << std::flush;
}

/// An option's text as JSON: true/false as booleans, numbers as numbers, names as strings.
nlohmann::ordered_json option_json(const std::string& text) {
  if (text == "true" || text == "false") return text == "true";
  try {
    size_t used = 0;
    const double v = std::stod(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  return text;
}

nlohmann::ordered_json to_json(const Options& opt, int threads, const std::vector<Result>& results) {
  nlohmann::ordered_json j;
  j["protocol"] = {{"model", opt.model}, {"data", opt.data}, {"epochs", opt.epochs},
                   {"train", opt.train}, {"test", opt.test}, {"batch", opt.batch},
                   {"seed", opt.seeds.front()}, {"seeds", opt.seeds},
                   {"threads", threads}, {"device", opt.device}, {"settling", opt.settling},
                   {"lr_schedule", opt.lr_schedule}, {"normalize", opt.normalize},
                   {"world_size", opt.dist.world_size}};
  if (opt.cuda_graph) j["protocol"]["cuda_graph"] = true;
  auto& rs = j["results"] = nlohmann::ordered_json::array();
  for (const auto& r : results) {
    nlohmann::ordered_json o;
    o["optimizer"] = r.entry->name;
    o["seed"] = r.seed;
    o["best_val_acc"] = r.best_val_acc;
    o["final_train_acc"] = r.final_train_acc;
    o["epoch_s"] = r.median_epoch_s;
    o["step_ms"] = r.step_ms;
    o["lr"] = r.lr;
    if (r.bytes_per_step > 0) o["bytes_per_step"] = r.bytes_per_step, o["comm_ms_per_step"] = r.comm_ms;
    auto& os = o["options"] = nlohmann::ordered_json::object();
    for (const auto& [name, text] : r.options) os[name] = option_json(text);
    auto& es = o["epochs"] = nlohmann::ordered_json::array();
    for (const auto& e : r.epochs) es.push_back(epoch_json(e));
    rs.push_back(std::move(o));
  }
  return j;
}

/// The --svg picture: every optimizer in the order it ran, its test accuracy per epoch over
/// the seeds (mean ± sample standard deviation) and its median ms/step against SGD's.
std::string chart(const Options& opt, const std::vector<Result>& results) {
  std::vector<mep_bench::Curve> curves;
  std::vector<mep_bench::Bar> bars;
  for (const auto& [label, runs] : runs_by_label(results)) {
    std::vector<double> ms;
    for (const auto* r : runs) ms.push_back(r->step_ms);
    mep_bench::Curve c;
    c.label = label;
    c.band = runs.size() > 1;
    for (size_t e = 0; e < runs.front()->epochs.size(); ++e) {
      std::vector<double> acc;
      for (const auto* r : runs) acc.push_back(r->epochs[e].val_acc);
      const auto [mean, sd] = mean_sd(acc);
      c.mean.push_back(mean), c.low.push_back(mean - sd), c.high.push_back(mean + sd);
    }
    curves.push_back(std::move(c));
    bars.push_back({label, median(ms)});
  }
  const std::string data = opt.data.empty() ? "" : " on " + fs::path(opt.data).filename().string();
  const std::string title = strf("%s%s, %lld/%lld samples, %lld epochs, batch %lld, seed%s %s", opt.model.c_str(),
                                 data.c_str(), static_cast<long long>(opt.train), static_cast<long long>(opt.test),
                                 static_cast<long long>(opt.epochs), static_cast<long long>(opt.batch),
                                 opt.seeds.size() > 1 ? "s" : "", seed_list(opt.seeds, ",").c_str());
  return mep_bench::accuracy_speed_svg(title, curves, bars, "SGD");
}

/// One row per optimizer, seed and epoch, with every number the JSON has per epoch; `variant`
/// names the options in which the optimizer's runs differ (label_runs), quoted.
void write_csv(std::ostream& out, const std::vector<Result>& results) {
  out << "optimizer,seed,epoch,train_loss,train_acc,test_loss,test_acc,epoch_s,settle_steps,settle_residual,"
         "settle_converged,lr,step_ms,variant\n";
  out.precision(10);
  for (const auto& r : results)
    for (const auto& e : r.epochs) {
      out << r.entry->name << ',' << r.seed << ',' << e.epoch << ',' << e.train_loss << ',' << e.train_acc << ','
          << e.val_loss << ',' << e.val_acc << ',' << e.epoch_s << ',';
      if (e.has_settle) out << e.settle_steps << ',' << e.settle_residual << ',' << e.settle_converged;
      else out << ",,";
      out << ',' << r.lr << ',' << r.step_ms << ",\"" << r.variant << "\"\n";
    }
}

/// Creates the parent directories of `path` and checks that it can be written, so that a
/// bad --json fails before the training rather than after it.
void prepare_output(const std::string& path, const char* flag) {
  const fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) {
    fs::create_directories(p.parent_path(), ec);
    if (ec)
      throw std::runtime_error(strf("%s %s: cannot create directory %s: %s", flag, path.c_str(),
                                    p.parent_path().string().c_str(), ec.message().c_str()));
  }
  if (fs::is_directory(p, ec)) throw std::runtime_error(strf("%s %s: is a directory", flag, path.c_str()));
  const bool existed = fs::exists(p, ec);
  {
    std::ofstream probe(path, std::ios::app);
    if (!probe) throw std::runtime_error(strf("%s %s: cannot open for writing", flag, path.c_str()));
  }
  if (!existed) fs::remove(p, ec);
}

/// prepare_output for each of --json, --csv and --svg that was given.
void prepare_outputs(const Options& opt) {
  if (!opt.json.empty()) prepare_output(opt.json, "--json");
  if (!opt.csv.empty()) prepare_output(opt.csv, "--csv");
  if (!opt.svg.empty()) prepare_output(opt.svg, "--svg");
}


/// The table on stdout, and the --json, --svg and --csv files.
void report(const Options& opt, int threads, const std::vector<Result>& results) {
  print_table(results, opt.seeds);
  if (!opt.json.empty()) {
    write_json(opt.json, to_json(opt, threads, results));
    std::cout << "wrote " << opt.json << std::endl;
  }
  if (!opt.svg.empty()) {
    write_text(opt.svg, "--svg", [&](std::ostream& out) { out << chart(opt, results); });
    std::cout << "wrote " << opt.svg << std::endl;
  }
  if (!opt.csv.empty()) {
    write_text(opt.csv, "--csv", [&](std::ostream& out) { write_csv(out, results); });
    std::cout << "wrote " << opt.csv << std::endl;
  }
}

// --- saved runs (--from-json) ------------------------------------------------------------

/// An option's JSON value as its command-line text (the inverse of option_json).
std::string option_from_json(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number()) return strf("%g", v.get<double>());
  throw std::runtime_error("an option is neither a name, a number nor true/false: " + v.dump());
}

/// One run of a saved JSON (to_json's "results" entry).
Result result_from_json(const nlohmann::json& j, int64_t epochs) {
  Result r;
  const auto name = j.at("optimizer").get<std::string>();
  r.entry = mep_bench::find_entry(name);
  if (!r.entry) throw std::runtime_error("optimizer " + name + " is not in this build");
  r.seed = j.at("seed").get<uint64_t>();
  r.best_val_acc = j.at("best_val_acc"), r.final_train_acc = j.at("final_train_acc");
  r.median_epoch_s = j.at("epoch_s"), r.step_ms = j.at("step_ms"), r.lr = j.at("lr");
  if (j.contains("bytes_per_step")) r.bytes_per_step = j.at("bytes_per_step"), r.comm_ms = j.at("comm_ms_per_step");
  for (const auto& [option, value] : j.at("options").items()) r.options.emplace_back(option, option_from_json(value));
  for (const auto& e : j.at("epochs")) r.epochs.push_back(epoch_from_json(e));
  if (static_cast<int64_t>(r.epochs.size()) != epochs)
    throw std::runtime_error(strf("%s seed %llu has %zu epochs, the protocol %lld", name.c_str(),
                                  static_cast<unsigned long long>(r.seed), r.epochs.size(),
                                  static_cast<long long>(epochs)));
  return r;
}

/// Reads the runs saved by --json in `files`, which must share one protocol: every field that
/// two files both record is equal, except the seeds. Fills `opt` with that protocol (the seeds:
/// every run's, in order of appearance) and `threads` with its thread count.
std::vector<Result> load_saved_runs(const std::vector<std::string>& files, Options& opt, int& threads) {
  std::vector<Result> results;
  std::vector<std::string> sources;  // the file of each run
  nlohmann::json protocol;
  std::string first;
  opt.seeds.clear();
  for (const auto& file : files) {
    std::ifstream in(file);
    if (!in) throw std::runtime_error("--from-json " + file + ": cannot open");
    nlohmann::json j;
    try {
      in >> j;
    } catch (const std::exception&) {
      throw std::runtime_error("--from-json " + file + ": not JSON");
    }
    try {
      const auto& p = j.at("protocol");
      if (first.empty()) {
        protocol = p, first = file;
      } else {
        for (const auto& [key, value] : p.items())
          if (key != "seed" && key != "seeds" && protocol.contains(key) && protocol[key] != value)
            throw std::runtime_error(strf("of another protocol than %s: %s %s here, %s there", first.c_str(),
                                          key.c_str(), value.dump().c_str(), protocol[key].dump().c_str()));
        for (const auto& [key, value] : p.items())
          if (!protocol.contains(key)) protocol[key] = value;
      }
      const auto& runs = j.at("results");
      if (!runs.is_array() || runs.empty()) throw std::runtime_error("holds no runs");
      for (size_t i = 0; i < runs.size(); ++i) {
        try {
          results.push_back(result_from_json(runs[i], protocol.at("epochs").get<int64_t>()));
        } catch (const std::exception& e) {
          throw std::runtime_error(strf("results[%zu]: %s", i, message(e).c_str()));
        }
        sources.push_back(file);
      }
    } catch (const std::exception& e) {
      throw std::runtime_error("--from-json " + file + ": " + message(e));
    }
  }
  label_runs(results);
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    for (size_t k = 0; k < i; ++k)
      if (results[k].label == r.label && results[k].seed == r.seed)
        throw std::runtime_error(strf("--from-json: %s, seed %llu, is both in %s and in %s", r.label.c_str(),
                                      static_cast<unsigned long long>(r.seed), sources[k].c_str(), sources[i].c_str()));
    if (std::find(opt.seeds.begin(), opt.seeds.end(), r.seed) == opt.seeds.end()) opt.seeds.push_back(r.seed);
  }
  try {
    opt.model = protocol.at("model"), opt.epochs = protocol.at("epochs"), opt.train = protocol.at("train");
    opt.test = protocol.at("test"), opt.batch = protocol.at("batch"), threads = protocol.at("threads");
    opt.device = protocol.at("device"), opt.settling = protocol.at("settling");
    opt.normalize = protocol.at("normalize").get<std::vector<double>>();
    opt.lr_schedule = protocol.value("lr_schedule", "constant");
    opt.data = protocol.value("data", "");
    opt.dist.world_size = protocol.value("world_size", 1);
  } catch (const std::exception& e) {
    throw std::runtime_error("--from-json " + first + ": protocol: " + message(e));
  }
  return results;
}

// --- command line -----------------------------------------------------------------------

/// A CLI11 check that the value is a decimal integer >= `min` that fits in int64.
CLI::Validator integer_at_least(long long min) {
  return CLI::Validator(
      [min](std::string& s) -> std::string {
        const std::string expected = min > 0 ? "a positive integer" : "an integer >= " + std::to_string(min);
        long long v = 0;
        const char* end = s.data() + s.size();
        const auto r = std::from_chars(s.data(), end, v);
        if (s.empty() || r.ec == std::errc::invalid_argument || r.ptr != end)
          return "expected " + expected + ", got '" + s + "'";
        if (r.ec == std::errc::result_out_of_range || v < min) return "expected " + expected + ", got " + s;
        return {};
      },
      min > 0 ? "POSITIVE" : min == 0 ? "NONNEGATIVE" : ">=" + std::to_string(min));
}

/// The registry entries named in --optimizers (comma-separated), in that order.
std::vector<const mep_bench::OptimizerEntry*> select_optimizers(const std::string& list) {
  std::vector<std::string> available;
  for (const auto& e : mep_bench::registry()) available.push_back(e.name);
  std::vector<const mep_bench::OptimizerEntry*> out;
  if (list.empty()) {
    for (const auto& e : mep_bench::registry()) out.push_back(&e);
    return out;
  }
  std::set<std::string> seen;
  size_t pos = 0;
  while (pos <= list.size()) {
    const size_t comma = std::min(list.find(',', pos), list.size());
    std::string name = list.substr(pos, comma - pos);
    pos = comma + 1;
    name.erase(0, name.find_first_not_of(" \t"));
    name.erase(name.find_last_not_of(" \t") + 1);
    if (name.empty()) throw std::runtime_error("--optimizers: empty name in '" + list + "'");
    if (!seen.insert(name).second) throw std::runtime_error("--optimizers: '" + name + "' is listed twice");
    if (const auto* e = mep_bench::find_entry(name)) {
      out.push_back(e);
      continue;
    }
    const auto& known = mep_bench::known_names();
    if (std::find(known.begin(), known.end(), name) != known.end())
      throw std::runtime_error("optimizer '" + name + "' is not available in this build (available: " +
                               join(available, ", ") + ")");
    throw std::runtime_error("unknown optimizer '" + name + "' (available: " + join(available, ", ") + ")");
  }
  return out;
}

int run(int argc, char** argv) {
  Options opt;
  const unsigned hw = std::thread::hardware_concurrency();
  opt.threads = hw > 0 ? static_cast<int>(hw) : 1;
  std::vector<std::string> available;
  for (const auto& e : mep_bench::registry()) available.push_back(e.name);

  CLI::App app{"mep_bench: MNIST benchmark of the mep optimizers (the tables of the README's Results). Every "
               "optimizer trains the same model from the same initial weights on the same shuffles; the results "
               "are printed as a Markdown table sorted by best test accuracy."};
  app.name("mep_bench");
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return "mep_bench: " + one_line(e.what()) + " (see --help)\n";
  });
  app.add_option("--data", opt.data, "directory with the IDX files (train-*/t10k-*, optionally .gz)")
      ->type_name("DIR")
      ->capture_default_str();
  app.add_option("--model", opt.model, "model to train")
      ->check(CLI::IsMember({"mlp", "mlp_small", "cnn"}))
      ->capture_default_str();
  auto* optimizers_flag = app.add_option("--optimizers", opt.optimizers,
                 "comma-separated optimizers to run (default: all of this build: " + join(available, ",") +
                     "; planned: " + join(mep_bench::known_names(), ",") + ")");
  app.add_option("--protocol", opt.protocol,
                 "seed: the first --train training and --test test samples (the protocol of the reference's "
                 "published tables); full: every sample of the data files (not with --train/--test)")
      ->check(CLI::IsMember({"seed", "full"}))
      ->capture_default_str();
  app.add_option("--normalize", opt.normalize,
                 "MEAN,STD of the pixels (in [0, 1]) for (x - MEAN) / STD: MNIST's by default; Fashion-MNIST's "
                 "are 0.2860,0.3530")
      ->delimiter(',')
      ->expected(2)
      ->capture_default_str();
  app.add_option("--epochs", opt.epochs, "training epochs")->check(integer_at_least(1))->capture_default_str();
  auto* train_flag = app.add_option("--train", opt.train, "training samples (the first N of the file)")
                         ->check(integer_at_least(1))
                         ->capture_default_str();
  auto* test_flag = app.add_option("--test", opt.test, "test samples (the first N of the file)")
                        ->check(integer_at_least(1))
                        ->capture_default_str();
  app.add_option("--batch", opt.batch, "training batch size")->check(integer_at_least(1))->capture_default_str();
  auto* seed_flag = app.add_option("--seed", opt.seed, "seed for initial weights, shuffles and dropout")
                        ->check(integer_at_least(0))
                        ->capture_default_str();
  app.add_option("--seeds", opt.seeds,
                 "comma-separated seeds: every optimizer runs once per seed, and the table shows the mean and "
                 "standard deviation of the best test accuracy (the JSON keeps every run)")
      ->delimiter(',')
      ->excludes(seed_flag);
  app.add_option("--threads", opt.threads, "intra-op threads (default: all cores)")
      ->check(integer_at_least(1))
      ->capture_default_str();
  app.add_option("--device", opt.device, "device to train on")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--loss", opt.loss,
                 "loss/energy of the EP family (eqprop, smep, sdmep, local_ep, natural_ep); the backprop "
                 "optimizers always use cross-entropy")
      ->check(CLI::IsMember({"mse", "ce"}))
      ->capture_default_str();
  app.add_option("--error-feedback", opt.error_feedback,
                 "error feedback (beta_ef 0.9) in the optimizers that have it (smep, sdmep): off, "
                 "reference (error_rule reference: e <- beta_ef*e + g_aug - u) or projected (error_rule "
                 "projected, the library's default rule: e <- g_aug - <g_aug,u>/|u|^2 u)")
      ->check(CLI::IsMember({"off", "reference", "projected"}))
      ->capture_default_str();
  app.add_option("--lr", opt.lr, "learning rate of every selected optimizer (default: each one's own, the Learning Rate column)")
      ->check(CLI::PositiveNumber);
  app.add_option("--lr-schedule", opt.lr_schedule,
                 "learning rate per epoch: constant (the seed protocol) or cosine, lr * (1 + cos(pi * (epoch - 1) "
                 "/ epochs)) / 2, annealed over --epochs")
      ->check(CLI::IsMember({"constant", "cosine"}))
      ->capture_default_str();
  app.add_flag("--cuda-graph", opt.cuda_graph,
               "EP family: capture each training step into a CUDA graph and replay it (mep/cuda_graph.hpp; "
               "captured again when the batch shape or the learning rate changes); only with --device cuda, in a "
               "build against a CUDA LibTorch; the backprop optimizers run as usual");
  // Optimizer options, each applied to every selected optimizer that has it.
  struct SharedFlag {
    const char* flag;
    const char* option;
    const char* help;
  };
  static const SharedFlag shared_flags[] = {
      {"--beta", "beta", "nudging strength beta of the EP family"},
      {"--settle-steps", "settle_steps", "settling steps (layer sweeps, or heavy-ball steps) of the EP family"},
      {"--settle-lr", "settle_lr", "settling step size of the EP family"},
      {"--ns-steps", "ns_steps", "Newton-Schulz iterations of the orthogonalising optimizers"},
      {"--ns-coefficients", "ns_coefficients", "Newton-Schulz polynomial: cubic, quintic or polar_express"},
      {"--rank-frac", "rank_frac", "Dion's rank as a fraction of the smaller weight dimension"},
      {"--gamma", "gamma", "bound of the spectral constraint"},
      {"--spectral-mode", "spectral_mode", "rule of the spectral constraint: scale (W*gamma/sigma) or clip (singular values above gamma set to gamma)"},
      {"--bound-input-layer", "bound_input_layer", "whether the spectral constraint bounds the input layer too: true or false"},
      {"--momentum", "momentum", "momentum"},
      {"--weight-decay", "weight_decay", "weight decay"}};
  std::map<std::string, std::string> shared_values;
  std::vector<std::pair<const char*, CLI::Option*>> shared_given;
  for (const auto& f : shared_flags)
    shared_given.emplace_back(f.option, app.add_option(f.flag, shared_values[f.option],
                                                       std::string(f.help) + " (option " + f.option +
                                                           "), in every selected optimizer that has it")
                                            ->type_name("VALUE"));
  bool symmetric = false;
  app.add_flag("--symmetric", symmetric, "symmetric (two-sided) EP estimate in the EP family (option symmetric)");
  std::vector<std::string> sets;
  app.add_option("--set", sets,
                 "one optimizer's option, by the library's option name (repeatable): e.g. --set smep.lr=0.02 "
                 "--set sdmep.ns_coefficients=polar_express")
      ->type_name("NAME.OPTION=VALUE");
  app.add_option("--settling", opt.settling,
                 "settling of the EP family: the library default (mep::DefaultSettling) or the reference's "
                 "(HeavyBall, 10 steps of 0.05, adaptive)")
      ->check(CLI::IsMember({"default", "reference"}))
      ->capture_default_str();
  auto* checkpoint_flag = app.add_option("--checkpoint", opt.checkpoint,
                                         "save the run after every epoch into DIR (model, optimizer, random "
                                         "generator, results so far)")
                              ->type_name("DIR");
  app.add_flag("--resume", opt.resume,
               "continue the run saved in --checkpoint DIR up to --epochs (also extends a finished run); the "
               "other flags must be those of the saved run")
      ->needs(checkpoint_flag);
  app.add_option("--json", opt.json, "also write the results as JSON to FILE (parent directories are created)")
      ->type_name("FILE");
  app.add_option("--svg", opt.svg,
                 "also draw test accuracy per epoch (mean and band over the seeds) and ms/step (x SGD) into an "
                 "SVG FILE")
      ->type_name("FILE");
  app.add_option("--csv", opt.csv,
                 "also write one CSV row per optimizer, seed and epoch to FILE (parent directories are created)")
      ->type_name("FILE");
  std::vector<std::string> from_json;
  auto* from_json_flag =
      app.add_option("--from-json", from_json,
                     "train nothing: gather the runs saved by --json in FILE,... (one protocol; any seeds and "
                     "optimizers, runs of one optimizer with different options labelled by those options) "
                     "into the table, and into --json, --svg and --csv")
          ->delimiter(',')
          ->type_name("FILE,...");
  app.add_option("--world-size", opt.dist.world_size,
                 "data parallelism: the number of processes (ranks); each trains on its shard of every batch, "
                 "gradients are averaged (Gloo on CPU, NCCL with --device cuda); scripts/distributed.sh starts them")
      ->envname("WORLD_SIZE")
      ->check(integer_at_least(1))
      ->capture_default_str();
  app.add_option("--rank", opt.dist.rank, "this process's rank, 0 .. world size - 1; only rank 0 prints and writes files")
      ->envname("RANK")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--master-addr", opt.dist.master_addr, "address of rank 0, where the ranks meet (its TCPStore)")
      ->envname("MASTER_ADDR")
      ->capture_default_str();
  app.add_option("--master-port", opt.dist.master_port, "port of rank 0's TCPStore")
      ->envname("MASTER_PORT")
      ->check(CLI::Range(1, 65535))
      ->capture_default_str();
  double dist_timeout = 300;
  app.add_option("--dist-timeout", dist_timeout,
                 "seconds a rank waits for the others (meeting, and every collective) before it fails")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  if (from_json_flag->count() > 0) {
    for (const auto* o : app.get_options())
      if (o->count() > 0 && o != from_json_flag && !o->check_name("--json") && !o->check_name("--svg") &&
          !o->check_name("--csv"))
        throw std::runtime_error("--from-json trains nothing: it takes no " + o->get_name() +
                                 " (only --json, --svg and --csv)");
    for (const auto* path : {&opt.json, &opt.svg, &opt.csv})
      if (!path->empty() && std::find(from_json.begin(), from_json.end(), *path) != from_json.end())
        throw std::runtime_error("--from-json: " + *path + " is both read and to be written");
    prepare_outputs(opt);
    int threads = 0;
    const auto results = load_saved_runs(from_json, opt, threads);
    std::cout << strf("mep_bench: %zu saved runs from %zu files | model %s | train %lld, test %lld | epochs %lld | "
                      "batch %lld | seed%s %s | threads %d | device %s",
                      results.size(), from_json.size(), opt.model.c_str(), static_cast<long long>(opt.train),
                      static_cast<long long>(opt.test), static_cast<long long>(opt.epochs),
                      static_cast<long long>(opt.batch), opt.seeds.size() > 1 ? "s" : "",
                      seed_list(opt.seeds, ",").c_str(), threads, opt.device.c_str())
              << std::endl;
    report(opt, threads, results);
    return 0;
  }

  if (optimizers_flag->count() > 0 && opt.optimizers.empty())
    throw std::runtime_error("--optimizers: empty list (available: " + join(available, ", ") + ")");
  const auto selected = select_optimizers(opt.optimizers);
  if (!std::isfinite(opt.normalize[0]) || !std::isfinite(opt.normalize[1]) || !(opt.normalize[1] > 0))
    throw std::runtime_error(strf("--normalize %g,%g: MEAN must be finite and STD positive and finite", opt.normalize[0],
                                  opt.normalize[1]));
  if (opt.protocol == "full") {
    if (train_flag->count() > 0 || test_flag->count() > 0)
      throw std::runtime_error("--protocol full uses every sample: it takes no --train or --test");
    opt.train = opt.test = -1;
  }
  std::vector<std::string> names;
  for (const auto* e : selected) names.push_back(e->name);
  if (opt.seeds.empty()) opt.seeds = {opt.seed};
  if (std::set<uint64_t>(opt.seeds.begin(), opt.seeds.end()).size() != opt.seeds.size())
    throw std::runtime_error("--seeds: a seed is listed twice");
  for (const auto& [option, flag] : shared_given)
    if (flag->count() > 0) opt.shared_options.emplace_back(option, shared_values[option]);
  if (symmetric) opt.shared_options.emplace_back("symmetric", "true");
  for (const auto& s : sets) {
    const size_t dot = s.find('.'), eq = s.find('=');
    if (dot == std::string::npos || eq == std::string::npos || dot == 0 || eq < dot + 2)
      throw std::runtime_error("--set " + s + ": expected NAME.OPTION=VALUE, e.g. smep.lr=0.02");
    const std::string name = s.substr(0, dot);
    if (std::find(names.begin(), names.end(), name) == names.end())
      throw std::runtime_error("--set " + s + ": " + name + " is not among the selected optimizers (" + join(names, ",") + ")");
    opt.sets.push_back({name, s.substr(dot + 1, eq - dot - 1), s.substr(eq + 1)});
  }
  // Every optimizer's options, before any training: an unknown or invalid option fails here.
  std::set<std::string> held;
  for (const auto* e : selected) {
    try {
      for (const auto& [option, text] : e->options(trainer_config(*e, opt))) held.insert(option);
    } catch (const std::exception& ex) {
      throw std::runtime_error(e->name + ": " + message(ex));
    }
  }
  for (const auto& [option, text] : opt.shared_options)
    if (!held.count(option))
      throw std::runtime_error("option " + option + ": none of the selected optimizers (" + join(names, ",") +
                               ") has it");
  opt.dist.timeout = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(1e3 * dist_timeout)));
  if (opt.dist.world_size > 1) {
    g_rank_tag = strf(" (rank %d)", opt.dist.rank);
    if (opt.dist.rank >= opt.dist.world_size)
      throw std::runtime_error(strf("--rank %d: expected 0 .. %d for --world-size %d", opt.dist.rank,
                                    opt.dist.world_size - 1, opt.dist.world_size));
    if (opt.batch < opt.dist.world_size)
      throw std::runtime_error(strf("--batch %lld: smaller than --world-size %d (every rank needs a shard)",
                                    static_cast<long long>(opt.batch), opt.dist.world_size));
    if (!opt.checkpoint.empty()) throw std::runtime_error("--checkpoint: not supported with --world-size > 1");
    opt.dist.backend = opt.device == "cuda" ? "nccl" : "gloo";
  }
  if (opt.cuda_graph) {
#ifndef MEP_WITH_CUDA
    throw std::runtime_error("--cuda-graph: this mep_bench was built without CUDA (CMake found a LibTorch without CUDA)");
#endif
    if (opt.device != "cuda") throw std::runtime_error("--cuda-graph: only with --device cuda");
    if (opt.dist.world_size > 1)
      throw std::runtime_error("--cuda-graph: not with --world-size > 1 (collectives are not captured)");
  }
  if (opt.device == "cuda" && !torch::cuda::is_available())
    throw std::runtime_error("--device cuda: CUDA is not available (this LibTorch has no CUDA support or sees no GPU)");
  // Ranks on one machine take its GPUs in turn.
  const torch::Device device = opt.device == "cuda"
                                   ? torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(
                                                                     opt.dist.rank % std::max<int64_t>(1, torch::cuda::device_count())))
                                   : torch::Device(torch::kCPU);
  {
    std::error_code ec;
    if (!fs::is_directory(opt.data, ec))
      throw std::runtime_error("--data " + opt.data +
                               ": no such directory (make the datasets with data/make_datasets.sh, or pass --data DIR)");
  }
  if (opt.dist.rank > 0) {  // rank 0 prints and writes; the others stay silent unless they fail
    opt.json.clear(), opt.csv.clear(), opt.svg.clear();
    std::cout.setstate(std::ios::badbit);
  }
  prepare_outputs(opt);
  if (opt.dist.world_size > 1) {
    opt.group = mep::make_process_group(opt.dist);
  }

  torch::set_num_threads(opt.threads);
  const int threads = torch::get_num_threads();
  const Split train = load(opt.data, true, opt.train, opt.normalize, device);
  const Split test = load(opt.data, false, opt.test, opt.normalize, device);
  opt.train = train.size(), opt.test = test.size();  // --protocol full: what the files hold
  if (!opt.checkpoint.empty()) prepare_checkpoints(opt, run_protocol(opt, threads, names));
  std::vector<std::string> option_names;
  for (const auto& [option, text] : opt.shared_options) option_names.push_back(option + "=" + text);
  for (const auto& [name, option, text] : opt.sets) option_names.push_back(name + "." + option + "=" + text);
  std::cout << strf("mep_bench: model %s | data %s (train %lld, test %lld) | epochs %lld | batch %lld | seed%s %s | "
                    "threads %d | device %s%s | settling %s | optimizers %s%s%s",
                    opt.model.c_str(), opt.data.c_str(), static_cast<long long>(opt.train),
                    static_cast<long long>(opt.test), static_cast<long long>(opt.epochs),
                    static_cast<long long>(opt.batch), opt.seeds.size() > 1 ? "s" : "", seed_list(opt.seeds, ",").c_str(),
                    threads, opt.device.c_str(),
                    opt.dist.world_size > 1 ? strf(" | ranks %d (%s)", opt.dist.world_size, opt.dist.backend.c_str()).c_str() : "",
                    opt.settling.c_str(), join(names, ",").c_str(),
                    option_names.empty() ? "" : " | options ", join(option_names, " ").c_str())
            << std::endl;

  Progress progress(isatty(STDOUT_FILENO) != 0);
  g_progress = &progress;
  std::vector<Result> results;
  for (auto seed : opt.seeds)
    for (const auto* entry : selected) results.push_back(run_optimizer(*entry, seed, opt, train, test, device, progress));
  g_progress = nullptr;

  check_interrupt();
  label_runs(results);
  report(opt, threads, results);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGINT, on_interrupt);
  std::signal(SIGTERM, on_interrupt);
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    if (g_progress) g_progress->close();
    std::cerr << "mep_bench" << g_rank_tag << ": " << message(e) << std::endl;
  } catch (...) {
    if (g_progress) g_progress->close();
    std::cerr << "mep_bench: unknown error" << std::endl;
  }
  return g_interrupted ? 130 : 1;
}
