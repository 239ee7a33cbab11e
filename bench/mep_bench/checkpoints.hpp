#pragma once
// --checkpoint DIR and --resume: after every epoch, each optimizer's run (model, optimizer,
// random generator, the epochs so far) is saved to DIR/{name}.pt; DIR/run.json records the
// protocol, which a resumed run must share.

#include "common.hpp"
#include "flags.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace mep_bench {

/// An optimizer's run so far.
struct Progressed {
  std::vector<EpochRecord> records;
  double step_s_total = 0;
  int64_t steps = 0;
  std::vector<double> epoch_times;
};

/// --checkpoint: creates DIR and its run.json; with --resume, checks that DIR holds a run of
/// the same protocol instead. `names` are the selected optimizers, `threads` the intra-op threads.
void prepare_checkpoints(const Options& opt, int threads, const std::vector<std::string>& names);

/// The checkpoint file of one optimizer and seed ({name}.pt for a single seed), or "" without
/// --checkpoint.
std::string checkpoint_path(const Options& opt, const std::string& name, uint64_t seed);

void save_checkpoint(const std::string& path, const std::string& name, const Trainer& trainer, const Progressed& p);

/// Restores an optimizer's run (model, optimizer, random generator, records) from `path`.
Progressed load_checkpoint(const std::string& path, const std::string& name, Trainer& trainer);

}  // namespace mep_bench
