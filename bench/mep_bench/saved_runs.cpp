// mep_bench --from-json: the runs saved by --json, read back, checked to share one protocol,
// and reported as if they had just run.

#include "saved_runs.hpp"

#include "common.hpp"
#include "outputs.hpp"
#include "report.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <stdexcept>

namespace mep_bench {
namespace {

/// An option's JSON value as its command-line text (the inverse of the JSON's options).
std::string option_from_json(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "true" : "false";
  if (v.is_number()) return fmt::format("{:g}", v.get<double>());
  throw std::runtime_error("an option is neither a name, a number nor true/false: " + v.dump());
}

/// One run of a saved JSON (an entry of its "results").
Result result_from_json(const nlohmann::json& j, int64_t epochs) {
  Result r;
  const auto name = j.at("optimizer").get<std::string>();
  r.entry = find_entry(name);
  if (!r.entry) throw std::runtime_error("optimizer " + name + " is not in this build");
  r.seed = j.at("seed").get<uint64_t>();
  r.best_val_acc = j.at("best_val_acc"), r.final_train_acc = j.at("final_train_acc");
  r.median_epoch_s = j.at("epoch_s"), r.step_ms = j.at("step_ms"), r.lr = j.at("lr");
  if (j.contains("bytes_per_step")) r.bytes_per_step = j.at("bytes_per_step"), r.comm_ms = j.at("comm_ms_per_step");
  for (const auto& [option, value] : j.at("options").items()) r.options.emplace_back(option, option_from_json(value));
  for (const auto& e : j.at("epochs")) r.epochs.push_back(epoch_from_json(e));
  if (static_cast<int64_t>(r.epochs.size()) != epochs)
    throw std::runtime_error(
        fmt::format("{} seed {} has {} epochs, the protocol {}", name, r.seed, r.epochs.size(), epochs));
  return r;
}

nlohmann::json read_json(const std::string& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("--from-json " + file + ": cannot open");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception&) {
    throw std::runtime_error("--from-json " + file + ": not JSON");
  }
  return j;
}

/// Adds the fields of `p` (the protocol of `file`) to `protocol`, which holds those of
/// `first`'s; a field both record must be equal, except the seeds.
void merge_protocol(nlohmann::json& protocol, const nlohmann::json& p, const std::string& first) {
  for (const auto& [key, value] : p.items())
    if (key != "seed" && key != "seeds" && protocol.contains(key) && protocol[key] != value)
      throw std::runtime_error(fmt::format("of another protocol than {}: {} {} here, {} there", first, key,
                                           value.dump(), protocol[key].dump()));
  for (const auto& [key, value] : p.items())
    if (!protocol.contains(key)) protocol[key] = value;
}

/// Sets the protocol's fields in `opt` (and `threads`).
void apply_protocol(const nlohmann::json& protocol, Options& opt, int& threads) {
  opt.model = protocol.at("model"), opt.epochs = protocol.at("epochs"), opt.train = protocol.at("train");
  opt.test = protocol.at("test"), opt.batch = protocol.at("batch"), threads = protocol.at("threads");
  opt.device = protocol.at("device"), opt.settling = protocol.at("settling");
  opt.normalize = protocol.at("normalize").get<std::vector<double>>();
  opt.lr_schedule = protocol.value("lr_schedule", "constant");
  opt.data = protocol.value("data", "");
  opt.dist.world_size = protocol.value("world_size", 1);
}

/// Reads the runs saved in `files`, which must share one protocol. Fills `opt` with that
/// protocol (the seeds: every run's, in order of appearance) and `threads` with its thread count.
std::vector<Result> load_saved_runs(const std::vector<std::string>& files, Options& opt, int& threads) {
  std::vector<Result> results;
  std::vector<std::string> sources;  // the file of each run
  nlohmann::json protocol;
  std::string first;
  for (const auto& file : files) {
    const auto j = read_json(file);
    try {
      const auto& p = j.at("protocol");
      if (first.empty()) protocol = p, first = file;
      else merge_protocol(protocol, p, first);
      const auto& runs = j.at("results");
      if (!runs.is_array() || runs.empty()) throw std::runtime_error("holds no runs");
      for (size_t i = 0; i < runs.size(); ++i) {
        try {
          results.push_back(result_from_json(runs[i], protocol.at("epochs").get<int64_t>()));
        } catch (const std::exception& e) {
          throw std::runtime_error(fmt::format("results[{}]: {}", i, message(e)));
        }
        sources.push_back(file);
      }
    } catch (const std::exception& e) {
      throw std::runtime_error("--from-json " + file + ": " + message(e));
    }
  }
  label_runs(results);
  opt.seeds.clear();
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    for (size_t k = 0; k < i; ++k)
      if (results[k].label == r.label && results[k].seed == r.seed)
        throw std::runtime_error(fmt::format("--from-json: {}, seed {}, is both in {} and in {}", r.label, r.seed,
                                             sources[k], sources[i]));
    if (std::find(opt.seeds.begin(), opt.seeds.end(), r.seed) == opt.seeds.end()) opt.seeds.push_back(r.seed);
  }
  try {
    apply_protocol(protocol, opt, threads);
  } catch (const std::exception& e) {
    throw std::runtime_error("--from-json " + first + ": protocol: " + message(e));
  }
  return results;
}

}  // namespace

void report_saved_runs(const std::vector<std::string>& files, Options& opt) {
  prepare_outputs(opt);
  int threads = 0;
  const auto results = load_saved_runs(files, opt, threads);
  std::cout << fmt::format("mep_bench: {} saved runs from {} files | model {} | train {}, test {} | epochs {} | "
                           "batch {} | seed{} {} | threads {} | device {}",
                           results.size(), files.size(), opt.model, opt.train, opt.test, opt.epochs, opt.batch,
                           opt.seeds.size() > 1 ? "s" : "", seed_list(opt.seeds, ","), threads, opt.device)
            << std::endl;
  report(opt, threads, results);
}

}  // namespace mep_bench
