#pragma once
// mep_bench --from-json FILE,...: trains nothing; gathers runs saved by --json (one protocol,
// any seeds) into one table and into --json, --csv and --svg.

#include "flags.hpp"

#include <string>
#include <vector>

namespace mep_bench {

/// Reads the runs saved in `files` (one protocol: every field that two files both record is
/// equal, except the seeds), prints their header line and table, and writes opt's outputs.
/// `opt` takes the protocol of the files.
void report_saved_runs(const std::vector<std::string>& files, Options& opt);

}  // namespace mep_bench
