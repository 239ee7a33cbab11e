#pragma once
/// \file local_ep.hpp
/// Layer-local EP (SPEC §4). Each layer's update uses only its own input and output
/// states of the settled phases:
///
///   g_l = Σ_p coef_p · ∂_θ E_l(out_l^p, f_l(in_l^p)),   E_l = ½‖out − f_l(in)‖² (KL for a CE last layer)
///
/// with in/out the settled neighbouring states held fixed. Since the energy is a sum of
/// such layer terms (energy.hpp), ∂_θ E_l = −(∂f_l/∂θ)ᵀ·ε_l is exactly the global EP
/// gradient's term for layer l: the two policies compute the same thing from the same
/// settled states, and differ in their defaults — the reference's for LocalEP: β = 0.1,
/// and with HeavyBall settling tol = 1e-4, patience = 5, not adaptive.

#include <mep/gradient/ep.hpp>

#include <type_traits>

namespace mep {

template <class Settling>
class BasicLocalEPGradient : public BasicEPGradient<Settling> {
 public:
  template <class Derived>
  struct Options : BasicEPGradient<Settling>::template Options<Derived> {
    Options() {
      this->beta_ = 0.1;
      if constexpr (std::is_same_v<Settling, HeavyBall>) {
        this->tol_ = 1e-4;
        this->patience_ = 5;
        this->adaptive_ = false;
      }
    }
  };

  BasicLocalEPGradient() = default;
  template <class O>
  explicit BasicLocalEPGradient(const O& o) : BasicEPGradient<Settling>(o) {}
};

using LocalEPGradient = BasicLocalEPGradient<DefaultSettling>;

/// Options of a stand-alone LocalEPGradient.
template <class Settling = DefaultSettling>
struct BasicLocalEPGradientOptions
    : BasicLocalEPGradient<Settling>::template Options<BasicLocalEPGradientOptions<Settling>> {};
using LocalEPGradientOptions = BasicLocalEPGradientOptions<>;

}  // namespace mep
