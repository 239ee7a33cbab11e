#pragma once
// The files mep_bench writes: --json, --csv and --svg, each written to a temporary file and
// renamed into place, so that a failed or interrupted run leaves none half-written.

#include "common.hpp"
#include "flags.hpp"

#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <vector>

namespace mep_bench {

/// Writes `write(tmp)` to a temporary file beside `path` and renames it into place; a failure
/// names the flag `what`.
void write_atomically(const std::string& path, const char* what, const std::function<void(const std::string&)>& write);

/// Writes `j` atomically (for the flag `what`).
void write_json(const std::string& path, const nlohmann::ordered_json& j, const char* what = "--json");

/// An epoch as the JSON records it, and back.
nlohmann::ordered_json epoch_json(const EpochRecord& e);
EpochRecord epoch_from_json(const nlohmann::json& j);

/// Creates the parent directories of --json, --csv and --svg and checks that they can be
/// written, so that a bad path fails before the training rather than after it.
void prepare_outputs(const Options& opt);

/// The table on stdout, and the --json, --svg and --csv files; `threads` is the intra-op
/// thread count the runs had.
void report(const Options& opt, int threads, const std::vector<Result>& results);

}  // namespace mep_bench
