#pragma once
/// \file none.hpp
/// No error feedback: g_aug = g.

#include <mep/options.hpp>
#include <mep/state.hpp>

namespace mep {

struct NoFeedback {
  template <class Derived>
  using Options = NoOptions<Derived, NoFeedback>;
  NoFeedback() = default;
  template <class O>
  explicit NoFeedback(const O&) {}
  /// Whether g_aug can differ from g (data parallelism needs to know).
  static constexpr bool active() { return false; }
  torch::Tensor accumulate(const torch::Tensor& g, ParamState&) const { return g; }
  void remember(const torch::Tensor&, const torch::Tensor&, ParamState&) const {}
};

}  // namespace mep
