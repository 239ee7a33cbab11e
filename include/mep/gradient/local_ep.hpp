#pragma once
/// \file local_ep.hpp
/// Layer-local EP (SPEC §4). Each layer's update uses only its own input and output
/// states of the settled phases:
///
///   g_i = Σ_p coef_p · ∂_θ E_i(out_i^p, f_i(in_i^p)),   E_i = ½‖out − f_i(in)‖² (KL for a CE last layer)
///
/// with in/out the settled neighbouring states held fixed, i.e. one-sided
/// [E_i(β) − E_i(0)]/β or symmetric [E_i(+β) − E_i(−β)]/(2β). Norm parameters train with
/// the next layer (they sit in its input map); trailing parameters after the last layer
/// by the loss on the nudged output. For this energy it equals the global EP gradient under
/// the same settling. Reference defaults: β = 0.1, tol = 1e-4, patience = 5, not adaptive.

#include <mep/gradient/ep.hpp>

namespace mep {

class LocalEPGradient {
 public:
  template <class Derived>
  struct Options : detail::EPOptionsBase<Derived> {
    Options() {
      this->beta_ = 0.1;
      this->tol_ = 1e-4;
      this->patience_ = 5;
      this->adaptive_ = false;
    }
  };

  LocalEPGradient() = default;
  template <class O>
  explicit LocalEPGradient(const O& o) : global_(o) {}

  EPConfig& config() { return global_.config(); }

  torch::Tensor compute(const torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& target) {
    auto& engine = global_.engine();
    Chain& chain = engine.chain_for(model);
    if (engine.config.mode == Mode::Backprop) return engine.backprop(model, chain, x, target);
    auto ph = engine.run(chain, x, target);
    const auto& nudging = engine.config.nudging;
    const double batch = static_cast<double>(x.size(0));
    std::vector<torch::Tensor> grads;
    torch::AutoGradMode grad_mode(true);
    for (size_t l = 0; l < chain.layers.size(); ++l) {
      const Layer& layer = chain.layers[l];
      const bool last = l + 1 == chain.layers.size();
      torch::Tensor objective;
      for (size_t p = 0; p < ph.phases.size(); ++p) {
        auto in = (l == 0 ? x : ph.phases[p].states[l - 1]).detach();
        auto out = ph.phases[p].states[l].detach();
        auto f = layer.forward(Chain::apply(layer.pre, in));
        torch::Tensor local;
        if (last) {
          torch::Tensor delta, eps;  // the last term's own energy: squared error, or KL for CE
          local = nudging.last_term(out, f, delta, eps).sum();
        } else {
          local = 0.5 * (out - f).pow(2).sum();
        }
        auto term = local * (ph.coef[p] / batch);
        objective = objective.defined() ? objective + term : term;
      }
      auto g = torch::autograd::grad({objective}, layer.parameters(), {}, false, false, /*allow_unused=*/true);
      grads.insert(grads.end(), g.begin(), g.end());
    }
    global_.append_post_gradients(chain, ph, target, grads);
    write_grads(chain.parameters(), grads);
    return engine.loss(ph, target);
  }

 private:
  EPGradient global_;
};

/// Options of a stand-alone LocalEPGradient.
struct LocalEPGradientOptions : LocalEPGradient::Options<LocalEPGradientOptions> {};

}  // namespace mep
