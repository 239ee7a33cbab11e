#pragma once
/// \file state.hpp
/// Per-parameter optimizer state: a step count and named tensors (momentum, Adam's
/// moments, spectral u and v, Dion's Q, Fisher matrices, error-feedback buffers...).
/// Every policy keeps its state here, so that one save/load covers all of it.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <utility>

namespace mep {

struct ParamState : torch::optim::OptimizerCloneableParamState<ParamState> {
  int64_t step = 0;
  std::map<std::string, torch::Tensor> buffers;

  /// The buffer `name`, or an undefined tensor if it does not exist yet.
  torch::Tensor get(const std::string& name) const {
    auto it = buffers.find(name);
    return it == buffers.end() ? torch::Tensor() : it->second;
  }
  bool has(const std::string& name) const {
    auto it = buffers.find(name);
    return it != buffers.end() && it->second.defined();
  }
  /// The buffer `name`, created as zeros shaped like `like` the first time.
  torch::Tensor& zeros_like(const std::string& name, const torch::Tensor& like) {
    torch::Tensor& t = buffers[name];
    if (!t.defined()) t = torch::zeros_like(like, torch::MemoryFormat::Contiguous);
    return t;
  }
  void set(const std::string& name, torch::Tensor value) { buffers[name] = std::move(value); }

  void serialize(torch::serialize::OutputArchive& a) const override {
    a.write("step", c10::IValue(step));
    c10::List<std::string> names;
    for (const auto& kv : buffers)
      if (kv.second.defined()) names.push_back(kv.first);
    a.write("names", c10::IValue(names));
    for (const auto& kv : buffers)
      if (kv.second.defined()) a.write("buf." + kv.first, kv.second, /*is_buffer=*/true);
  }
  void serialize(torch::serialize::InputArchive& a) override {
    c10::IValue v;
    a.read("step", v);
    step = v.toInt();
    a.read("names", v);
    buffers.clear();
    for (const auto& name : v.toListRef()) {
      torch::Tensor t;
      a.read("buf." + name.toStringRef(), t, /*is_buffer=*/true);
      buffers[name.toStringRef()] = t;
    }
  }
};

/// The range [min, max] of each of a parameter's state buffers, read before an update; a
/// buffer not listed does not exist yet and starts as zeros. Update policies bound their
/// results with it (`direction_bound`).
struct BufferExtents {
  std::map<std::string, std::pair<double, double>> ranges;

  std::pair<double, double> range(const std::string& name) const {
    auto it = ranges.find(name);
    return it == ranges.end() ? std::pair<double, double>{0.0, 0.0} : it->second;
  }
  /// max |x| over the buffer `name`.
  double abs_max(const std::string& name) const {
    const auto [lo, hi] = range(name);
    return std::max(std::abs(lo), std::abs(hi));
  }
};

}  // namespace mep
