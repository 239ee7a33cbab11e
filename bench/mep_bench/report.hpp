#pragma once
// What mep_bench prints on stdout: the progress line of every epoch, the Markdown table of
// the results, and the labels that tell apart runs of one optimizer with different options.

#include "common.hpp"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace mep_bench {

/// The per-epoch progress line: rewritten in place with '\r' on a terminal, printed once
/// per epoch otherwise.
class Progress {
 public:
  explicit Progress(bool tty) : tty_(tty) {}

  /// On a terminal: batch i of n, the running loss, the epoch's elapsed time and its ETA.
  void batch(const std::string& prefix, int64_t i, int64_t n, double running_loss, double elapsed_s);
  /// The epoch's line: its loss, accuracies, time and (EP family) what settling did.
  void epoch_done(const std::string& prefix, int64_t n, const EpochRecord& r);
  /// Ends a half-written line (before an error message).
  void close();

 private:
  bool tty_;
  bool open_ = false;
};

/// Labels every run: its optimizer's label, followed by the options in which that optimizer's
/// runs differ, e.g. "SMEP (spectral_mode clip)" beside "SMEP (spectral_mode scale)". Runs of
/// one command line differ only in their seeds, so theirs is the optimizer's label.
void label_runs(std::vector<Result>& results);

/// The runs of each label (one per seed), in the order the labels first ran.
std::vector<std::pair<std::string, std::vector<const Result*>>> runs_by_label(const std::vector<Result>& results);

/// The Markdown table: with several seeds, best test accuracy as mean ± sample standard
/// deviation (then each seed's), final train accuracy as the mean, times as medians.
void print_table(const std::vector<Result>& results, const std::vector<uint64_t>& seeds);

}  // namespace mep_bench
