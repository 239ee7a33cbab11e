#pragma once
/// \file plain.hpp
/// Plain update (SGD, vanilla EP):  u = g.
/// With the optimizer's momentum and torch-style coupled weight decay this is exactly
/// `torch::optim::SGD`:  d = g + λW;  m ← μ·m + (1 − dampening)·d;  W ← W − lr·m.

#include <mep/options.hpp>
#include <mep/state.hpp>

namespace mep {

struct Plain {
  template <class Derived>
  using Options = NoOptions<Derived, Plain>;

  static constexpr bool coupled_weight_decay = true;  // g += λW before the update (torch SGD)
  static constexpr bool owns_momentum = false;        // the optimizer applies momentum

  Plain() = default;
  template <class O>
  explicit Plain(const O&) {}

  torch::Tensor direction(const torch::Tensor& g, ParamState&) const { return g; }
};

}  // namespace mep
