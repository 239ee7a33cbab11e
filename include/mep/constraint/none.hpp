#pragma once
/// \file none.hpp
/// No constraint: W is left as the update made it.

#include <mep/options.hpp>
#include <mep/state.hpp>

namespace mep {

struct NoConstraint {
  template <class Derived>
  using Options = NoOptions<Derived, NoConstraint>;
  NoConstraint() = default;
  template <class O>
  explicit NoConstraint(const O&) {}
  void enforce(torch::Tensor&, ParamState&, bool /*input_layer*/ = false) const {}
};

}  // namespace mep
