#pragma once
// What every part of mep_bench passes around: the records of a run (EpochRecord, Result) and
// the few helpers they share (joining names, an exception's message on one line, medians,
// means and standard deviations).

#include "../trainers.hpp"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>
#include <vector>

namespace mep_bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// One epoch of one run.
struct EpochRecord {
  int64_t epoch = 0;
  double train_loss = 0, train_acc = 0, val_loss = 0, val_acc = 0, epoch_s = 0;
  // What settling did (EP family only, has_settle): means over the epoch's steps.
  bool has_settle = false;
  double settle_steps = 0, settle_residual = 0, settle_converged = 0;  ///< steps, residual, fraction converged
};

/// One optimizer's run at one seed.
struct Result {
  const OptimizerEntry* entry = nullptr;
  std::string label;    // entry's label, with `variant` (label_runs)
  std::string variant;  // the options in which it differs from the optimizer's other runs
  uint64_t seed = 0;
  double lr = 0;
  OptionTexts options;  // every option it ran with
  std::vector<EpochRecord> epochs;
  double best_val_acc = 0, final_train_acc = 0, median_epoch_s = 0, step_ms = 0;
  double bytes_per_step = 0;  // --world-size > 1: bytes each rank handed to the steps' collectives
  double comm_ms = 0;         // --world-size > 1: milliseconds per step rank 0 spent in them
};

inline std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

/// The seeds as text, separated by `sep`.
inline std::string seed_list(const std::vector<uint64_t>& seeds, const char* sep) {
  std::vector<std::string> names;
  for (auto seed : seeds) names.push_back(std::to_string(seed));
  return join(names, sep);
}

inline std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  for (auto& c : s)
    if (c == '\n' || c == '\r') c = ' ';
  return s;
}

/// The message of `e` on one line (c10::Error without its C++ backtrace).
inline std::string message(const std::exception& e) {
  if (const auto* c10e = dynamic_cast<const c10::Error*>(&e)) return one_line(c10e->what_without_backtrace());
  return one_line(e.what());
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

/// Mean and sample standard deviation (0 for a single value).
inline std::pair<double, double> mean_sd(const std::vector<double>& v) {
  const double n = static_cast<double>(v.size());
  double mean = 0, var = 0;
  for (double x : v) mean += x / n;
  for (double x : v) var += (x - mean) * (x - mean);
  return {mean, v.size() > 1 ? std::sqrt(var / (n - 1)) : 0.0};
}

}  // namespace mep_bench
