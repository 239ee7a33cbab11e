#pragma once
/// \file presets.hpp
/// The named optimizers of SPEC §8 as compositions of policies, with the reference's
/// defaults (momentum 0.9 and weight decay 5e-4 throughout; learning rates below).
///
/// | name | gradient | update | constraint | feedback | default lr |
/// |------|----------|--------|------------|----------|------------|
/// | SGD  | backprop | Plain (coupled wd, torch SGD) | none | none | 0.1  |
/// | Adam | backprop | Adam (torch Adam)             | none | none | 1e-3 |
/// | Muon | backprop | Newton-Schulz (cubic, 5 steps)| spectral γ=0.95 | none | 0.02 |

#include <mep/constraint/none.hpp>
#include <mep/constraint/spectral.hpp>
#include <mep/feedback/error_feedback.hpp>
#include <mep/feedback/none.hpp>
#include <mep/gradient/backprop.hpp>
#include <mep/optimizer.hpp>
#include <mep/update/adam.hpp>
#include <mep/update/newton_schulz.hpp>
#include <mep/update/plain.hpp>

namespace mep {

// Reference learning rates (SPEC §8), declared before the presets are instantiated.
template <>
struct DefaultLr<BackpropGradient, Plain, NoConstraint, NoFeedback> {
  static constexpr double value = 0.1;
};
template <>
struct DefaultLr<BackpropGradient, AdamUpdate, NoConstraint, NoFeedback> {
  static constexpr double value = 1e-3;
};
template <>
struct DefaultLr<BackpropGradient, NewtonSchulz, SpectralConstraint, NoFeedback> {
  static constexpr double value = 0.02;
};

using SGD = Optimizer<BackpropGradient, Plain, NoConstraint, NoFeedback>;
using SGDOptions = SGD::Options;

using Adam = Optimizer<BackpropGradient, AdamUpdate, NoConstraint, NoFeedback>;
using AdamOptions = Adam::Options;

using Muon = Optimizer<BackpropGradient, NewtonSchulz, SpectralConstraint, NoFeedback>;
using MuonOptions = Muon::Options;

}  // namespace mep
