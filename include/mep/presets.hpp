#pragma once
/// \file presets.hpp
/// The named optimizers: compositions of policies, each with its defaults.
///
/// Drop-ins for torch::optim (same options, setters and defaults as the LibTorch class of the
/// same name; for Muon, torch.optim.Muon):
///
/// | name | gradient | update | constraint | defaults |
/// |------|----------|--------|------------|----------|
/// | SGD   | backprop | Plain (coupled wd) | none | lr required, momentum 0, dampening 0, nesterov off, wd 0 |
/// | Adam  | backprop | Adam (coupled wd)  | none | lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0 |
/// | AdamW | backprop | Adam (decoupled wd)| none | lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 1e-2 |
/// | Muon  | backprop | MuonUpdate (torch.optim.Muon) | none | lr 1e-3, wd 0.1, momentum 0.95, Nesterov |
///
/// The EP family, constructed from the model and trained with `step(input, target)`, with
/// heavy-ball momentum 0.9 and weight decay 5e-4:
///
/// | name | gradient | update | constraint | feedback | lr |
/// |------|----------|--------|------------|----------|----|
/// | EqProp | EP | Plain | none | none | 0.05 |
/// | SMEP | EP (or backprop: `mode`) | Newton-Schulz | spectral | error feedback (off) | 0.01 |
/// | SDMEP | EP | Dion (Newton-Schulz below dion_thresh) | spectral | error feedback (off) | 0.01 |
/// | LocalEPMuon | EP, layer-local defaults | Newton-Schulz | spectral | none | 0.01 |
/// | NaturalEPMuon | EP + Fisher proxy | Fisher whitening + Newton-Schulz | spectral | none | 0.01 |
///
/// EP defaults: β = 0.5 (LocalEPMuon: 0.1), MSE nudging, the default settling
/// (`mep::DefaultSettling`, ep/settling.hpp). `mep::with_settling_t<Opt, Settling>` is the same
/// optimizer with another settling policy.
///
/// `mep::reference::` holds the presets with the reference implementation's defaults, which
/// the benchmark tables use: SGD (lr 0.1, momentum 0.9, wd 5e-4), Adam (wd 5e-4), Muon
/// (cubic Newton-Schulz, heavy-ball momentum 0.9, wd 5e-4, spectral constraint γ = 0.95,
/// lr 0.02), and the EP presets with HeavyBall settling (10 steps of 0.05, adaptive,
/// tol 1e-5, patience 3; EqProp at lr 0.01).

#include <mep/constraint/none.hpp>
#include <mep/constraint/spectral.hpp>
#include <mep/feedback/error_feedback.hpp>
#include <mep/feedback/none.hpp>
#include <mep/gradient/backprop.hpp>
#include <mep/ep/gradient.hpp>
#include <mep/optimizer.hpp>
#include <mep/update/adam.hpp>
#include <mep/update/dion.hpp>
#include <mep/update/fisher.hpp>
#include <mep/update/muon.hpp>
#include <mep/update/newton_schulz.hpp>
#include <mep/update/plain.hpp>

namespace mep {

/// The presets' defaults (options.hpp, ComposedDefaults, says what each member means).
namespace preset_defaults {

struct SGD {
  MEP_PRESET("mep::SGD", MEP_FROM_PARAMETERS)
  template <class O>
  static void apply(O& o) {
    o.momentum(0).dampening(0).nesterov(false).weight_decay(0);
  }
};
struct Adam {
  MEP_PRESET("mep::Adam", MEP_FROM_PARAMETERS)
  static constexpr double lr = 1e-3;
  template <class O>
  static void apply(O& o) {
    o.weight_decay(0);
  }
};
struct AdamW {
  MEP_PRESET("mep::AdamW", MEP_FROM_PARAMETERS)
  static constexpr double lr = 1e-3;
  template <class O>
  static void apply(O& o) {
    o.weight_decay(1e-2);
  }
};
struct Muon {
  MEP_PRESET("mep::Muon", MEP_FROM_PARAMETERS)
  static constexpr double lr = 1e-3;
  template <class O>
  static void apply(O& o) {
    o.weight_decay(0.1);
  }
};

/// An EP preset: the composition's defaults at learning rate LR.
#define MEP_EP_PRESET_DEFAULTS(STRUCT, NAME, LR) \
  struct STRUCT {                                \
    MEP_PRESET(NAME, MEP_FROM_MODEL)             \
    static constexpr double lr = LR;             \
    template <class O>                           \
    static void apply(O&) {}                     \
  };
MEP_EP_PRESET_DEFAULTS(EqProp, "mep::EqProp", 0.05)
MEP_EP_PRESET_DEFAULTS(SMEP, "mep::SMEP", 0.01)
MEP_EP_PRESET_DEFAULTS(SDMEP, "mep::SDMEP", 0.01)
/// LocalEP's defaults (the reference's): β = 0.1, and with HeavyBall settling tol 1e-4,
/// patience 5, not adaptive. Its gradient is EP's: each layer's term −(∂f_l/∂θ_l)ᵀ·ε_l uses
/// only that layer's settled input and output states.
template <class O>
struct settling_of;
template <class G, class U, class C, class F, class D>
struct settling_of<OptimizerOptions<G, U, C, F, D>> {
  using type = typename G::SettlingPolicy;
};
template <class O>
void local_ep_defaults(O& o) {
  o.beta(0.1);
  if constexpr (std::is_same_v<typename settling_of<O>::type, HeavyBall>)
    o.tol(1e-4).patience(5).adaptive(false);
}
#define MEP_LOCAL_EP_PRESET_DEFAULTS(NAME) \
  struct LocalEPMuon {                     \
    MEP_PRESET(NAME, MEP_FROM_MODEL)       \
    static constexpr double lr = 0.01;     \
    template <class O>                     \
    static void apply(O& o) {              \
      local_ep_defaults(o);                \
    }                                      \
  };
MEP_LOCAL_EP_PRESET_DEFAULTS("mep::LocalEPMuon")
MEP_EP_PRESET_DEFAULTS(NaturalEPMuon, "mep::NaturalEPMuon", 0.01)

/// The reference implementation's defaults.
namespace reference {
struct SGD {
  MEP_PRESET("mep::reference::SGD", MEP_FROM_PARAMETERS)
  static constexpr double lr = 0.1;
  template <class O>
  static void apply(O& o) {
    o.momentum(0.9).weight_decay(5e-4);
  }
};
struct Adam {
  MEP_PRESET("mep::reference::Adam", MEP_FROM_PARAMETERS)
  static constexpr double lr = 1e-3;
  template <class O>
  static void apply(O& o) {
    o.weight_decay(5e-4);
  }
};
struct Muon {
  MEP_PRESET("mep::reference::Muon", MEP_FROM_PARAMETERS)
  static constexpr double lr = 0.02;
  template <class O>
  static void apply(O& o) {
    o.momentum(0.9).weight_decay(5e-4);
  }
};
MEP_EP_PRESET_DEFAULTS(EqProp, "mep::reference::EqProp", 0.01)
MEP_EP_PRESET_DEFAULTS(SMEP, "mep::reference::SMEP", 0.01)
MEP_EP_PRESET_DEFAULTS(SDMEP, "mep::reference::SDMEP", 0.01)
MEP_LOCAL_EP_PRESET_DEFAULTS("mep::reference::LocalEPMuon")
MEP_EP_PRESET_DEFAULTS(NaturalEPMuon, "mep::reference::NaturalEPMuon", 0.01)
}  // namespace reference
#undef MEP_EP_PRESET_DEFAULTS
#undef MEP_LOCAL_EP_PRESET_DEFAULTS

}  // namespace preset_defaults

using SGD = Optimizer<BackpropGradient, Plain, NoConstraint, NoFeedback, preset_defaults::SGD>;
using SGDOptions = SGD::Options;

using Adam = Optimizer<BackpropGradient, AdamUpdate, NoConstraint, NoFeedback, preset_defaults::Adam>;
using AdamOptions = Adam::Options;

using AdamW = Optimizer<BackpropGradient, AdamWUpdate, NoConstraint, NoFeedback, preset_defaults::AdamW>;
using AdamWOptions = AdamW::Options;

using Muon = Optimizer<BackpropGradient, MuonUpdate, NoConstraint, NoFeedback, preset_defaults::Muon>;
using MuonOptions = Muon::Options;

using EqProp = Optimizer<EPGradient, Plain, NoConstraint, NoFeedback, preset_defaults::EqProp>;
using EqPropOptions = EqProp::Options;

using SMEP = Optimizer<EPGradient, NewtonSchulz, SpectralConstraint, ErrorFeedback, preset_defaults::SMEP>;
using SMEPOptions = SMEP::Options;

using SDMEP = Optimizer<EPGradient, Dion, SpectralConstraint, ErrorFeedback, preset_defaults::SDMEP>;
using SDMEPOptions = SDMEP::Options;

using LocalEPMuon = Optimizer<EPGradient, NewtonSchulz, SpectralConstraint, NoFeedback, preset_defaults::LocalEPMuon>;
using LocalEPMuonOptions = LocalEPMuon::Options;

using NaturalEPMuon =
    Optimizer<EPGradient, FisherNewtonSchulz, SpectralConstraint, NoFeedback, preset_defaults::NaturalEPMuon>;
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
}  // namespace detail

template <class G, class U, class C, class F, class D, class Settling>
struct with_settling<Optimizer<G, U, C, F, D>, Settling> {
  using type = Optimizer<typename detail::rebind_settling<G, Settling>::type, U, C, F, D>;
};

/// The presets with the reference implementation's defaults (see the file's comment).
namespace reference {
using SGD = Optimizer<BackpropGradient, Plain, NoConstraint, NoFeedback, preset_defaults::reference::SGD>;
using SGDOptions = SGD::Options;
using Adam =
    Optimizer<BackpropGradient, ReferenceAdamUpdate, NoConstraint, NoFeedback, preset_defaults::reference::Adam>;
using AdamOptions = Adam::Options;
using Muon =
    Optimizer<BackpropGradient, NewtonSchulz, SpectralConstraint, NoFeedback, preset_defaults::reference::Muon>;
using MuonOptions = Muon::Options;

using EqProp = Optimizer<BasicEPGradient<HeavyBall>, Plain, NoConstraint, NoFeedback,
                         preset_defaults::reference::EqProp>;
using EqPropOptions = EqProp::Options;
using SMEP = Optimizer<BasicEPGradient<HeavyBall>, NewtonSchulz, SpectralConstraint, ErrorFeedback,
                       preset_defaults::reference::SMEP>;
using SMEPOptions = SMEP::Options;
using SDMEP =
    Optimizer<BasicEPGradient<HeavyBall>, Dion, SpectralConstraint, ErrorFeedback, preset_defaults::reference::SDMEP>;
using SDMEPOptions = SDMEP::Options;
using LocalEPMuon = Optimizer<BasicEPGradient<HeavyBall>, NewtonSchulz, SpectralConstraint, NoFeedback,
                              preset_defaults::reference::LocalEPMuon>;
using LocalEPMuonOptions = LocalEPMuon::Options;
using NaturalEPMuon = Optimizer<BasicEPGradient<HeavyBall>, FisherNewtonSchulz, SpectralConstraint, NoFeedback,
                                preset_defaults::reference::NaturalEPMuon>;
using NaturalEPMuonOptions = NaturalEPMuon::Options;
}  // namespace reference

}  // namespace mep
