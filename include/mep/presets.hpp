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
/// | EqProp | EP | Plain (vanilla EP) | none | none | 0.05 (reference::EqProp: 0.01) |
/// | SMEP | EP (or backprop: `mode`) | Newton-Schulz | spectral | error feedback (off by default) | 0.01 |
/// | SDMEP | EP | Dion (Newton-Schulz below dion_thresh) | spectral | error feedback (off) | 0.01 |
/// | LocalEPMuon | layer-local EP | Newton-Schulz | spectral | none | 0.01 |
/// | NaturalEPMuon | EP + Fisher proxy | Fisher whitening + Newton-Schulz | spectral | none | 0.01 |
///
/// EP defaults: β = 0.5 (LocalEPMuon: 0.1), MSE nudging, the default settling
/// (`mep::DefaultSettling`, settle.hpp). `mep::with_settling_t<Opt, Settling>` is the same
/// optimizer with another settling policy, and `mep::reference::SMEP` (…) the presets with
/// the reference's settling: HeavyBall, 10 steps of 0.05, adaptive, tol 1e-5, patience 3.
/// The EP family is constructed from the model and trained with `step(input, target)`.

#include <mep/constraint/none.hpp>
#include <mep/constraint/spectral.hpp>
#include <mep/feedback/error_feedback.hpp>
#include <mep/feedback/none.hpp>
#include <mep/gradient/backprop.hpp>
#include <mep/gradient/ep.hpp>
#include <mep/gradient/local_ep.hpp>
#include <mep/optimizer.hpp>
#include <mep/update/adam.hpp>
#include <mep/update/dion.hpp>
#include <mep/update/fisher.hpp>
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

// EqProp with the default settling: 0.05, not the reference's 0.01 (README, "Departures").
template <>
struct DefaultLr<EPGradient, Plain, NoConstraint, NoFeedback> {
  static constexpr double value = 0.05;
};

using SGD = Optimizer<BackpropGradient, Plain, NoConstraint, NoFeedback>;
using SGDOptions = SGD::Options;

using Adam = Optimizer<BackpropGradient, AdamUpdate, NoConstraint, NoFeedback>;
using AdamOptions = Adam::Options;

using Muon = Optimizer<BackpropGradient, NewtonSchulz, SpectralConstraint, NoFeedback>;
using MuonOptions = Muon::Options;

using EqProp = Optimizer<EPGradient, Plain, NoConstraint, NoFeedback>;
using EqPropOptions = EqProp::Options;

using SMEP = Optimizer<EPGradient, NewtonSchulz, SpectralConstraint, ErrorFeedback>;
using SMEPOptions = SMEP::Options;

using SDMEP = Optimizer<EPGradient, Dion, SpectralConstraint, ErrorFeedback>;
using SDMEPOptions = SDMEP::Options;

using LocalEPMuon = Optimizer<LocalEPGradient, NewtonSchulz, SpectralConstraint, NoFeedback>;
using LocalEPMuonOptions = LocalEPMuon::Options;

using NaturalEPMuon = Optimizer<EPGradient, FisherNewtonSchulz, SpectralConstraint, NoFeedback>;
using NaturalEPMuonOptions = NaturalEPMuon::Options;

/// `Opt` with its EP gradient's settling policy replaced by `Settling` (backprop optimizers
/// are left as they are).
template <class Opt, class Settling>
struct with_settling {
  using type = Opt;
};
template <class Opt, class Settling>
using with_settling_t = typename with_settling<Opt, Settling>::type;

namespace detail {
template <class G, class Settling>
struct rebind_settling {
  using type = G;
};
template <class S0, class Settling>
struct rebind_settling<BasicEPGradient<S0>, Settling> {
  using type = BasicEPGradient<Settling>;
};
template <class S0, class Settling>
struct rebind_settling<BasicLocalEPGradient<S0>, Settling> {
  using type = BasicLocalEPGradient<Settling>;
};
}  // namespace detail

template <class G, class U, class C, class F, class Settling>
struct with_settling<Optimizer<G, U, C, F>, Settling> {
  using type = Optimizer<typename detail::rebind_settling<G, Settling>::type, U, C, F>;
};

/// The EP presets with the reference's settling (HeavyBall at its defaults: 10 steps of
/// 0.05, adaptive, tol 1e-5, patience 3), which reproduce the tables of mep 0.1.
namespace reference {
using EqProp = with_settling_t<mep::EqProp, HeavyBall>;
using SMEP = with_settling_t<mep::SMEP, HeavyBall>;
using SDMEP = with_settling_t<mep::SDMEP, HeavyBall>;
using LocalEPMuon = with_settling_t<mep::LocalEPMuon, HeavyBall>;
using NaturalEPMuon = with_settling_t<mep::NaturalEPMuon, HeavyBall>;
}  // namespace reference

}  // namespace mep
