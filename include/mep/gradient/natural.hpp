#pragma once
/// \file natural.hpp
/// Natural-gradient EP (SPEC §4): the base policy's gradient, plus a Fisher proxy per
/// weight matrix g (viewed as out × in),
///
///   F_new = gᵀ·g  (in × in),   or its diagonal Σ_rows g² with `fisher_diagonal(true)`,
///
/// handed to the update policy through the optimizer state (buffer "fisher_new" of the
/// parameter), where FisherNewtonSchulz keeps F ← 0.95·F + 0.05·F_new, whitens
/// g·(F + λI)⁻¹ and orthogonalises. (The reference computed the proxy but never passed it
/// on, so its NaturalEP was SMEP; the optimizer calls `export_state` after `compute`.)

#include <mep/state.hpp>
#include <mep/update/matrix.hpp>

#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

namespace mep {

namespace detail {
template <class O, class = void>
struct has_fisher_diagonal : std::false_type {};
template <class O>
struct has_fisher_diagonal<O, std::void_t<decltype(std::declval<const O&>().fisher_diagonal())>> : std::true_type {};
}  // namespace detail

template <class Base>
class NaturalGradient {
 public:
  template <class Derived>
  using Options = typename Base::template Options<Derived>;

  NaturalGradient() = default;
  template <class O>
  explicit NaturalGradient(const O& o) : base_(o) {
    if constexpr (detail::has_fisher_diagonal<O>::value) diagonal_ = o.fisher_diagonal();
  }

  Base& base() { return base_; }

  torch::Tensor compute(const torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& target) {
    pending_.clear();
    auto loss = base_.compute(model, x, target);
    torch::NoGradGuard no_grad;
    for (const auto& p : model->parameters()) {
      if (!is_matrix(p) || !p.grad().defined()) continue;
      auto g = as_matrix(p.grad());
      pending_.emplace_back(p, diagonal_ ? g.pow(2).sum(0) : torch::mm(g.t(), g));
    }
    return loss;
  }

  /// Moves the Fisher proxies of the last `compute` into the optimizer state.
  void export_state(const std::function<ParamState&(const torch::Tensor&)>& state_of) {
    for (auto& [p, f] : pending_) state_of(p).set("fisher_new", std::move(f));
    pending_.clear();
  }

 private:
  Base base_;
  bool diagonal_ = false;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> pending_;
};

}  // namespace mep
