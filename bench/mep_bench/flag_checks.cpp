// The checks of mep_bench's flags that need more than one flag, the optimizers' option tables
// or the machine: they complete the parsed Options for training, or fail with one line.

#include "common.hpp"
#include "flags.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>
#include <utility>

namespace mep_bench {
namespace {

/// The registry entries named in --optimizers (comma-separated), in that order.
std::vector<const OptimizerEntry*> select_optimizers(const std::string& list) {
  std::vector<const OptimizerEntry*> out;
  if (list.empty()) {
    for (const auto& e : registry()) out.push_back(&e);
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
    const auto* entry = find_entry(name);
    if (!entry)
      throw std::runtime_error("unknown optimizer '" + name + "' (available: " + join(registry_names(), ", ") + ")");
    out.push_back(entry);
  }
  return out;
}

/// --set NAME.OPTION=VALUE of one of the optimizers `names`, as {name, option, value}.
std::array<std::string, 3> parse_set(const std::string& s, const std::vector<std::string>& names) {
  const size_t dot = s.find('.'), eq = s.find('=');
  if (dot == std::string::npos || eq == std::string::npos || dot == 0 || eq < dot + 2)
    throw std::runtime_error("--set " + s + ": expected NAME.OPTION=VALUE, e.g. smep.lr=0.02");
  const std::string name = s.substr(0, dot);
  if (std::find(names.begin(), names.end(), name) == names.end())
    throw std::runtime_error("--set " + s + ": " + name + " is not among the selected optimizers (" +
                             join(names, ",") + ")");
  return {name, s.substr(dot + 1, eq - dot - 1), s.substr(eq + 1)};
}

}  // namespace

std::vector<const OptimizerEntry*> check_training_flags(Flags& flags) {
  Options& opt = flags.opt;
  if (flags.optimizers_given && opt.optimizers.empty())
    throw std::runtime_error("--optimizers: empty list (available: " + join(registry_names(), ", ") + ")");
  const auto selected = select_optimizers(opt.optimizers);
  if (!std::isfinite(opt.normalize[0]) || !std::isfinite(opt.normalize[1]) || !(opt.normalize[1] > 0))
    throw std::runtime_error(fmt::format("--normalize {:g},{:g}: MEAN must be finite and STD positive and finite",
                                         opt.normalize[0], opt.normalize[1]));
  if (opt.protocol == "full") {
    if (flags.samples_given)
      throw std::runtime_error("--protocol full uses every sample: it takes no --train or --test");
    opt.train = opt.test = -1;
  }
  if (opt.seeds.empty()) opt.seeds = {opt.seed};
  if (std::set<uint64_t>(opt.seeds.begin(), opt.seeds.end()).size() != opt.seeds.size())
    throw std::runtime_error("--seeds: a seed is listed twice");
  std::vector<std::string> names;
  for (const auto* e : selected) names.push_back(e->name);
  for (const auto& s : flags.sets) opt.sets.push_back(parse_set(s, names));

  std::set<std::string> held;  // the options any selected optimizer has
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
  return selected;
}

void check_ranks(Options& opt) {
  const auto& dist = opt.dist;
  if (dist.world_size <= 1) return;
  if (dist.rank >= dist.world_size)
    throw std::runtime_error(fmt::format("--rank {}: expected 0 .. {} for --world-size {}", dist.rank,
                                         dist.world_size - 1, dist.world_size));
  if (opt.batch < dist.world_size)
    throw std::runtime_error(fmt::format("--batch {}: smaller than --world-size {} (every rank needs a shard)",
                                         opt.batch, dist.world_size));
  if (!opt.checkpoint.empty()) throw std::runtime_error("--checkpoint: not supported with --world-size > 1");
  opt.dist.backend = opt.device == "cuda" ? "nccl" : "gloo";
}

torch::Device training_device(const Options& opt) {
  if (opt.cuda_graph) {
#ifndef MEP_WITH_CUDA
    throw std::runtime_error(
        "--cuda-graph: this mep_bench was built without CUDA (CMake found a LibTorch without CUDA)");
#endif
    if (opt.device != "cuda") throw std::runtime_error("--cuda-graph: only with --device cuda");
    if (opt.dist.world_size > 1)
      throw std::runtime_error("--cuda-graph: not with --world-size > 1 (collectives are not captured)");
  }
  if (opt.device != "cuda") return torch::Device(torch::kCPU);
  if (!torch::cuda::is_available())
    throw std::runtime_error("--device cuda: CUDA is not available (this LibTorch has no CUDA support or sees no GPU)");
  const int64_t gpus = std::max<int64_t>(1, static_cast<int64_t>(torch::cuda::device_count()));
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(opt.dist.rank % gpus));
}

TrainerConfig trainer_config(const OptimizerEntry& entry, const Options& opt, mep::ProcessGroupPtr group) {
  TrainerConfig config;
  const bool reference = opt.settling == "reference";
  config.lr = opt.lr > 0 ? opt.lr : reference ? entry.reference_lr : entry.lr;
  config.loss = opt.loss == "ce" ? mep::Loss::CrossEntropy : mep::Loss::MSE;
  config.error_feedback = opt.error_feedback != "off";
  config.error_rule = opt.error_feedback == "reference" ? mep::ErrorRule::Reference : mep::ErrorRule::Projected;
  config.reference_settling = reference;
  config.shared = opt.shared_options;
  config.group = std::move(group);
  config.cuda_graph = opt.cuda_graph;
  for (const auto& [name, option, text] : opt.sets)
    if (name == entry.name) config.own.emplace_back(option, text);
  return config;
}

}  // namespace mep_bench
