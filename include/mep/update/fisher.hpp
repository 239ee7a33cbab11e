#pragma once
/// \file fisher.hpp
/// Natural-gradient whitening followed by Newton-Schulz (NaturalEPMuon), in the
/// spirit of K-FAC/Shampoo-style right preconditioning (Amari 1998, natural gradient;
/// Martens & Grosse 2015, K-FAC) with a gradient-outer-product Fisher proxy.
///
/// For a matrix gradient g (out × in; conv kernels viewed as out × in·kh·kw):
///   F_new = gᵀ·g                       (in × in)  — or, with fisher_diagonal,
///   F_new = Σ_rows g²                  ([in], the diagonal of gᵀ·g)
/// computed here from the gradient the update receives (the EP or backprop gradient: the
/// Fisher policy works with any gradient policy).
///   F ← ρ·F + (1 − ρ)·F_new,  ρ = fisher_ema (0.95), F = 0 before the first step
///   w = g·(F + λI)⁻¹                   (Cholesky: F + λI is symmetric positive definite)
///   w = g / (diag F + λ)               (fisher_diagonal; broadcast over the rows)
///   u = s · NS(w)                      (mep::newton_schulz with ns_steps, ns_coefficients,
///                                       s = the ns_scale output scale)
/// with λ = fisher_damping (1e-3). F starts from zeros with no bias correction, exactly as
/// the EMA is written: after one step F = (1 − ρ)·F_new, so the damping dominates for the
/// first few steps (the update starts near Muon's NS(g)) and the whitening grows in as F
/// accumulates. Whenever F is a multiple c·I of the identity (c ≥ 0), w is a positive
/// multiple of g and the update equals NS(g) exactly: NS's normalisation removes it.
/// Before NS, w is divided by max(‖w‖_F, 1): this changes nothing where NS is scale
/// invariant, but keeps a whitened gradient larger than cubic NS's normalisation clamp
/// (1e4) from diverging (with small F, (F + λI)⁻¹ multiplies g by up to 1/λ).
/// Tensors below 2-D pass through (u = g). State: "fisher" (in × in, or [in]) in the
/// parameter's dtype (arithmetic in float32 for half/bfloat16). A failed Cholesky
/// factorisation throws std::runtime_error naming the shape; raise fisher_damping.

#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/update/matrix.hpp>
#include <mep/update/newton_schulz.hpp>

#include <functional>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace mep {

struct FisherNewtonSchulz {
  template <class Derived>
  struct Options : NewtonSchulz::Options<Derived> {
    MEP_ARG(double, fisher_damping, 1e-3)
    MEP_ARG(double, fisher_ema, 0.95)
    MEP_ARG(bool, fisher_diagonal, false)
    void validate() const {
      NewtonSchulz::Options<Derived>::validate();
      MEP_CHECK_OPTION(fisher_damping_ > 0 && std::isfinite(fisher_damping_), "fisher_damping", fisher_damping_,
                       "a finite value > 0");
      MEP_CHECK_OPTION(fisher_ema_ >= 0 && fisher_ema_ < 1, "fisher_ema", fisher_ema_, "a value in [0, 1)");
    }
    template <class V>
    void visit_options(V&& v) const {
      NewtonSchulz::Options<Derived>::visit_options(v);
      v("fisher_damping", this->fisher_damping_), v("fisher_ema", this->fisher_ema_), v("fisher_diagonal", this->fisher_diagonal_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("ns_steps", "Newton–Schulz iterations on the whitened gradient w, u = s·NS(w) (0: w / ‖w‖_F)");
      v("ns_coefficients", "Newton–Schulz's coefficients: cubic, quintic or polar_express (update/newton_schulz.hpp)");
      v("ns_scale", "output scale s of u = s·NS(w) for an m × n matrix: none 1, muon √max(1, m/n), "
                    "adamw 0.2·√max(m, n)");
      v("fisher_damping", "λ of the whitening w = g·(F + λI)⁻¹ before Newton–Schulz (raise it if Cholesky fails)");
      v("fisher_ema", "ρ of the Fisher proxy F ← ρ·F + (1 − ρ)·gᵀ·g");
      v("fisher_diagonal", "keep only the diagonal of F: w = g / (diag F + λ)");
    }
  };

  static constexpr bool coupled_weight_decay = false;  // decoupled: W ← W(1 − lr·λ) − lr·m
  static constexpr bool owns_momentum = false;         // the optimizer applies momentum

  NewtonSchulz ns;
  double damping = 1e-3;
  double ema = 0.95;
  bool diagonal = false;

  FisherNewtonSchulz() = default;
  template <class O>
  explicit FisherNewtonSchulz(const O& o)
      : ns(o), damping(o.fisher_damping()), ema(o.fisher_ema()), diagonal(o.fisher_diagonal()) {}

  torch::Tensor direction(const torch::Tensor& g, ParamState& st) const {
    if (!is_matrix(g)) return g;

    const auto gm = as_matrix(g);
    const int64_t in = gm.size(1);
    const auto reduced = g.scalar_type() == torch::kHalf || g.scalar_type() == torch::kBFloat16;
    const auto x = gm.to(reduced ? torch::kFloat32 : gm.scalar_type());

    const torch::Tensor fresh = proxy(x);

    torch::Tensor& f = st.fisher;
    const std::vector<int64_t> fshape = diagonal ? std::vector<int64_t>{in} : std::vector<int64_t>{in, in};
    if (!f.defined() || f.sizes() != c10::IntArrayRef(fshape)) f = torch::zeros(fshape, gm.options());
    f.mul_(ema).add_(fresh.to(f.scalar_type()), 1.0 - ema);

    torch::Tensor w;
    if (diagonal) {
      w = x / (f.to(x.scalar_type()) + damping);
    } else {
      auto a = f.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      a.diagonal().add_(damping);
      torch::Tensor l, info;
      std::tie(l, info) = torch::linalg_cholesky_ex(a);
      // A failed factorisation (info ≠ 0) makes the direction non-finite, on the device: the
      // optimizer's one check of the step then sees it, and `diagnose` says why.
      const auto factored = info.eq(0);
      factorisations_.push_back({factored, g.sizes().vec()});
      // g·(F + λI)⁻¹ = ((F + λI)⁻¹·gᵀ)ᵀ by the two triangular solves of L·Lᵀ (cholesky_solve's,
      // which on the CPU also reads its status on the host); x/0 where the factorisation failed.
      const auto y = torch::linalg_solve_triangular(l, x.t(), /*upper=*/false);
      w = torch::linalg_solve_triangular(l.t(), y, /*upper=*/true).t().div_(factored);
    }
    w = w / w.norm().clamp_min(1.0);
    return ns.orthogonalise(w).to(g.scalar_type()).reshape(g.sizes());
  }

  /// Forgets the factorisations of the previous step (the optimizer calls it as a step starts).
  void begin_step() const { factorisations_.clear(); }
  /// After a failed step (reads on the host): throws std::runtime_error for the first
  /// factorisation of this step that failed; returns if none did.
  void diagnose() const {
    for (const auto& [factored, shape] : factorisations_) {
      if (factored.item<bool>()) continue;
      const int64_t in = shape.size() < 2 ? 0 : std::accumulate(shape.begin() + 1, shape.end(), int64_t{1}, std::multiplies<>());
      std::ostringstream os;
      os << "mep: FisherNewtonSchulz: F + fisher_damping·I is not positive definite for the parameter of shape "
         << c10::IntArrayRef(shape) << " (Fisher " << in << " × " << in << ", fisher_damping = " << damping
         << "); use a larger fisher_damping";
      throw std::runtime_error(os.str());
    }
  }

 private:
  mutable std::vector<std::pair<torch::Tensor, std::vector<int64_t>>> factorisations_;  // (info == 0, g's shape) this step

  /// The Fisher proxy of `x` (out × in): xᵀ·x, or its diagonal.
  torch::Tensor proxy(const torch::Tensor& x) const { return diagonal ? x.square().sum(0) : torch::mm(x.t(), x); }
};

}  // namespace mep
