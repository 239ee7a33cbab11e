#pragma once
// The training runner: every selected optimizer at every seed, from identical initial weights
// on the same shuffles, epoch by epoch, with the progress lines, the settling statistics, the
// checkpoints and a clean stop on SIGINT/SIGTERM.

#include "common.hpp"
#include "data.hpp"
#include "flags.hpp"
#include "report.hpp"

#include <mep/process_group.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace mep_bench {

/// SIGINT and SIGTERM, blocked from construction on and polled between training steps: the
/// run stops after the current step with one line and exit status 130, and leaves nothing
/// half-written (outputs are written at the end, by rename). Construct it before any thread
/// starts: threads inherit the blocked signals, so that none is delivered to a handler.
class Interrupts {
 public:
  Interrupts();
  /// Whether SIGINT or SIGTERM has arrived.
  bool requested() const;
  /// Throws "interrupted (SIGINT/SIGTERM); no output was written" if one has.
  void check() const;
};

/// What every optimizer's run shares.
struct Training {
  const Options& opt;
  const Split& train;
  const Split& test;
  torch::Device device;
  mep::ProcessGroupPtr group;  ///< the ranks, when --world-size > 1
  Progress& progress;
  const Interrupts& interrupts;
};

/// Trains `entry`'s optimizer at `seed` for --epochs (continuing its checkpoint with --resume).
Result run_optimizer(const OptimizerEntry& entry, uint64_t seed, const Training& training);

}  // namespace mep_bench
