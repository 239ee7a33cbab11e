#pragma once
/// \file checkpoint.hpp
/// The archive layout of a mep optimizer's state, for `torch::save(opt, path)` and
/// `torch::load(opt, path)`:
///
///   mep.format         2 (absent in the checkpoints of mep 0.3 and earlier: format 1, the
///                      same layout, which loads)
///   mep.groups         the number of parameter groups
///   mep.skipped_steps  steps skipped for non-finite gradients
///   group.G            per group: its options (every option, see options.hpp), "size" (its
///                      number of parameters) and "state.I" for each parameter I that has
///                      state: its step count and named buffers (state.hpp)
///
/// Loading reads everything first and commits after: a checkpoint that does not fit (another
/// format, another number of groups or parameters, a policy option saved with another value)
/// throws std::runtime_error and leaves the optimizer as it was.

#include <mep/state.hpp>

#include <torch/torch.h>

#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mep::checkpoint {

/// The format this version writes.
constexpr int64_t kFormat = 2;

/// Writes the groups' options and every parameter's state; `state_of(p)` returns p's state,
/// or nullptr when it has none.
template <class StateOf>
void save(torch::serialize::OutputArchive& archive, const std::vector<torch::optim::OptimizerParamGroup>& groups,
          int64_t skipped_steps, StateOf&& state_of) {
  archive.write("mep.format", c10::IValue(kFormat));
  archive.write("mep.groups", c10::IValue(static_cast<int64_t>(groups.size())));
  archive.write("mep.skipped_steps", c10::IValue(skipped_steps));
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& group = groups[gi];
    torch::serialize::OutputArchive ga;
    group.options().serialize(ga);
    ga.write("size", c10::IValue(static_cast<int64_t>(group.params().size())));
    for (size_t pi = 0; pi < group.params().size(); ++pi) {
      const ParamState* st = state_of(group.params()[pi]);
      if (st == nullptr) continue;
      torch::serialize::OutputArchive sa;
      st->serialize(sa);
      ga.write("state." + std::to_string(pi), sa);
    }
    archive.write("group." + std::to_string(gi), ga);
  }
}

/// What `read` found, not yet applied.
struct Contents {
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;  ///< one per group
  std::vector<std::pair<torch::Tensor, std::unique_ptr<ParamState>>> states;  ///< (parameter, its state)
  int64_t skipped_steps = 0;
};

/// Reads a checkpoint for `groups` (their options are cloned and read into); `optimizer`
/// names the optimizer in messages. State buffers move to their parameter's device.
inline Contents read(torch::serialize::InputArchive& archive,
                     const std::vector<torch::optim::OptimizerParamGroup>& groups, const std::string& optimizer) {
  c10::IValue v;
  if (!archive.try_read("mep.groups", v)) {
    if (archive.try_read("pytorch_version", v))
      throw std::runtime_error("mep: the archive holds a torch::optim optimizer's state; " + optimizer +
                               " reads only checkpoints saved by a mep optimizer (its options and state are laid out "
                               "differently): load the model's parameters and start the optimizer afresh");
    throw std::runtime_error("mep: the archive holds no mep optimizer state");
  }
  c10::IValue format;
  const int64_t version = archive.try_read("mep.format", format) ? format.toInt() : 1;
  if (version < 1 || version > kFormat)
    throw std::runtime_error("mep: the checkpoint has optimizer state format " + std::to_string(version) +
                             "; this mep reads formats 1 to " + std::to_string(kFormat) +
                             " (a newer mep wrote it: load it with that version)");
  if (v.toInt() != static_cast<int64_t>(groups.size())) {
    std::ostringstream os;
    os << "mep: the archive has " << v.toInt() << " parameter groups, this optimizer " << groups.size();
    throw std::runtime_error(os.str());
  }
  Contents c;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& group = groups[gi];
    torch::serialize::InputArchive ga;
    archive.read("group." + std::to_string(gi), ga);
    ga.read("size", v);
    if (v.toInt() != static_cast<int64_t>(group.params().size())) {
      std::ostringstream os;
      os << "mep: parameter group " << gi << " has " << v.toInt() << " parameters in the archive, "
         << group.params().size() << " here";
      throw std::runtime_error(os.str());
    }
    auto opts = group.options().clone();
    opts->serialize(ga);
    c.options.push_back(std::move(opts));
    for (size_t pi = 0; pi < group.params().size(); ++pi) {
      torch::serialize::InputArchive sa;
      if (!ga.try_read("state." + std::to_string(pi), sa)) continue;
      const auto& p = group.params()[pi];
      auto st = std::make_unique<ParamState>();
      st->serialize(sa);
      st->for_each_buffer([&](const char*, torch::Tensor& t) { t = t.to(p.device()); });
      c.states.emplace_back(p, std::move(st));
    }
  }
  c10::IValue skipped;
  c.skipped_steps = archive.try_read("mep.skipped_steps", skipped) ? skipped.toInt() : 0;
  return c;
}

}  // namespace mep::checkpoint
