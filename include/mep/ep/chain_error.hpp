#pragma once
/// \file chain_error.hpp
/// The error of a model EP cannot read or run as a chain (ep/chain.hpp): it names the module,
/// its position in the Sequential and what EP needs instead.

#include <stdexcept>

namespace mep {

/// Thrown for a model EP cannot use (a module it cannot run, no layer, a listing that leaves
/// out a parameter); nothing has been changed when it is thrown.
class ChainError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace mep
