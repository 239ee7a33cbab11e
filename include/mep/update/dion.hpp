#pragma once
/// \file dion.hpp
/// Dion: distributed orthonormalised updates (Ahn et al. 2025, arXiv:2504.05295, Alg. 1),
/// a low-rank, error-feedback replacement for Newton-Schulz orthogonalisation.
///
/// For a matrix gradient G (m × n; conv kernels viewed as out × in·kh·kw) with more than
/// `dion_thresh` elements, rank r = max(1, ⌊min(m, n)·rank_frac⌋), momentum M (m × n,
/// zeros at first) and a warm-started right basis Q (n × r) kept in the optimizer state:
///   B = M + G
///   P = orth(B·Q)                       (reduced QR, P is m × r: one power iteration)
///   R = Bᵀ·P                            (n × r)
///   M ← B − (1 − μ)·P·Rᵀ                (error feedback: what the rank-r step leaves out
///                                        stays in M; μ = dion_mu)
///   Q ← column-normalise(R),  Q_j = R_j / (‖R_j‖ + ε·max_i ‖R_i‖),  ε = 1e-8
///   u = √max(1, m/n) · P·Qᵀ             (ns_output_scale(NSScale::Muon, m, n))
/// Cost O(m·n·r) per step (Newton-Schulz: O(m·n·min(m, n)) per iteration). The first Q
/// is a random n × r matrix drawn from a fixed-seed CPU generator (deterministic, global
/// RNG untouched), column-normalised and moved to G's device and dtype.
/// The ε of the column normalisation matters: when B has rank below r, QR's surplus
/// columns of P are round-off directions whose R_j are round-off sized; ε keeps their
/// Q_j (and hence their share of the update) negligible instead of normalising them to 1.
/// It is relative to the largest column (the paper's is absolute), so that the update does
/// not depend on the gradient's scale: the surplus share stays ~1e-8 whatever ‖G‖ is.
///
/// The scale of u is Muon's and fixed: P·Qᵀ has r singular values near 1 whatever m and n,
/// and √max(1, m/n) sets the update's size from the matrix's shape alone, as in Muon.
///
/// Matrices with at most `dion_thresh` elements get exactly the NewtonSchulz policy's
/// update (ns_steps, ns_coefficients) at its default scale, none; tensors below 2-D pass
/// through (u = g). The two paths therefore scale differently, and `ns_scale` must stay
/// none: Dion's own matrices do not take it (their scale is part of the update above), and a
/// scale that reached only the matrices below `dion_thresh` would change the size of the
/// update from one layer to the next. Another value is refused with an OptionError.
/// Dion carries its own momentum (M) for the matrices it handles; the Newton-Schulz and
/// pass-through paths keep the optimizer's heavy-ball momentum (`owns_momentum_for`).
/// Weight decay is decoupled. State: `dion_M` (m × n) and `dion_Q`
/// (n × r), in the parameter's dtype (the arithmetic runs in float32 for half/bfloat16).
///
/// Data parallelism (data_parallel.hpp; Ahn et al. 2025, §3, the PowerSGD trick of Vogels
/// et al. 2019): each rank keeps its own M_i and B_i = M_i + G_i, and only the factors are
/// averaged over the N ranks,
///   B·Q = (1/N)·Σ_i B_i·Q   (m × r),     R = (1/N)·Σ_i B_iᵀ·P   (n × r),
/// (m + n)·r numbers instead of the gradient's m·n. Every step is linear in B, so
/// (1/N)·Σ_i M_i stays the M of one process that sees the whole batch, and P, R, Q and u —
/// computed from the averages — are identical on every rank.

#include <mep/data_parallel.hpp>
#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/update/matrix.hpp>
#include <mep/update/newton_schulz.hpp>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace mep {

struct Dion {
  template <class Derived>
  struct Options : NewtonSchulz::Options<Derived> {
    MEP_ARG(double, rank_frac, 0.3)
    MEP_ARG(int64_t, dion_thresh, 50000)
    MEP_ARG(double, dion_mu, 0.95)
    void validate() const {
      NewtonSchulz::Options<Derived>::validate();
      MEP_CHECK_OPTION(this->ns_scale_ == NSScale::None, "ns_scale", this->ns_scale_,
                       "none with Dion, which scales its own update by √max(1, rows/cols)");
      MEP_CHECK_OPTION(rank_frac_ > 0 && rank_frac_ <= 1, "rank_frac", rank_frac_, "a value in (0, 1]");
      MEP_CHECK_OPTION(dion_thresh_ >= 0, "dion_thresh", dion_thresh_, "a value >= 0");
      MEP_CHECK_OPTION(dion_mu_ >= 0 && dion_mu_ < 1, "dion_mu", dion_mu_, "a value in [0, 1)");
    }
    template <class V>
    void visit_options(V&& v) const {
      NewtonSchulz::Options<Derived>::visit_options(v);
      v("rank_frac", this->rank_frac_), v("dion_thresh", this->dion_thresh_), v("dion_mu", this->dion_mu_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("ns_steps", "Newton–Schulz iterations for the matrices of at most dion_thresh elements (0: the "
                    "Frobenius-normalised gradient)");
      v("ns_coefficients", "Newton–Schulz's coefficients for the matrices of at most dion_thresh elements: cubic, "
                           "quintic or polar_express");
      v("ns_scale", "stays none: Dion scales its own update by √max(1, m/n)");
      v("rank_frac", "rank r = max(1, ⌊min(m, n)·rank_frac⌋) of the update of an m × n matrix");
      v("dion_thresh", "matrices with more than this many elements take Dion's rank-r update, the others "
                       "Newton–Schulz's");
      v("dion_mu", "μ of Dion's error feedback M ← B − (1 − μ)·P·Rᵀ");
    }
  };

  static constexpr bool coupled_weight_decay = false;  // decoupled: W ← W(1 − lr·λ) − lr·u
  static constexpr bool owns_momentum = true;          // M is Dion's momentum (for the matrices it handles)

  /// Dion's momentum M replaces the optimizer's only where Dion runs; the Newton-Schulz
  /// fallback and vectors keep the optimizer's heavy-ball momentum.
  bool owns_momentum_for(const torch::Tensor& g) const { return is_matrix(g) && g.numel() > thresh; }

  /// ε of the column normalisation of R.
  static constexpr double column_eps = 1e-8;
  /// Seed of the generator that draws the first right basis Q.
  static constexpr uint64_t basis_seed = 0x44696f6eULL;  // "Dion"
  /// The output scale of Dion's own update (the Newton-Schulz fallback's is `ns.scale`).
  static constexpr NSScale own_scale = NSScale::Muon;

  NewtonSchulz ns;
  double rank_frac = 0.3;
  int64_t thresh = 50000;
  double mu = 0.95;

  Dion() = default;
  template <class O>
  explicit Dion(const O& o) : ns(o), rank_frac(o.rank_frac()), thresh(o.dion_thresh()), mu(o.dion_mu()) {}

  /// The rank Dion uses for an m × n matrix.
  int64_t rank_for(int64_t rows, int64_t cols) const {
    const auto k = static_cast<int64_t>(std::floor(static_cast<double>(std::min(rows, cols)) * rank_frac));
    return std::max<int64_t>(1, std::min(k, std::min(rows, cols)));
  }

  /// Q_j = R_j / (‖R_j‖ + ε) for every column j.
  static torch::Tensor column_normalise(const torch::Tensor& r) {
    auto norms = r.norm(2, {0}, /*keepdim=*/true);
    return r / (norms + column_eps * norms.max());
  }

  /// The first right basis for an n × r problem: the same matrix every time (fixed-seed
  /// CPU generator), column-normalised, with `options`' device and dtype.
  static torch::Tensor initial_basis(int64_t cols, int64_t rank, const torch::TensorOptions& options) {
    at::Generator gen = at::detail::createCPUGenerator(basis_seed);
    auto q = torch::randn({cols, rank}, gen, torch::TensorOptions().dtype(torch::kFloat64));
    return column_normalise(q).to(options);
  }

  /// Whether, with data parallelism, Dion averages its factors for this gradient instead of
  /// the gradient being averaged (the matrices it handles).
  bool averages_factors_of(const torch::Tensor& g) const { return owns_momentum_for(g); }

  /// The direction; with `parallel`, for this rank's gradient, averaging B·Q and Bᵀ·P over
  /// the ranks (only where averages_factors_of(g); the others take averaged gradients).
  torch::Tensor direction(const torch::Tensor& g, ParamState& st, DataParallel* parallel = nullptr) const {
    if (!is_matrix(g)) return g;
    if (g.numel() <= thresh) return ns.direction(g, st);

    const auto gm = as_matrix(g);
    const int64_t rows = gm.size(0), cols = gm.size(1);
    const int64_t rank = rank_for(rows, cols);
    const auto reduced = g.scalar_type() == torch::kHalf || g.scalar_type() == torch::kBFloat16;
    const auto work = gm.options().dtype(reduced ? torch::kFloat32 : gm.scalar_type());

    // State, in the parameter's dtype; (re)created when absent or shaped for another rank.
    torch::Tensor& m = st.dion_M;
    if (!m.defined() || m.sizes() != gm.sizes()) m = torch::zeros({rows, cols}, gm.options());
    torch::Tensor& q = st.dion_Q;
    if (!q.defined() || q.size(0) != cols || q.size(1) != rank) q = initial_basis(cols, rank, gm.options());

    // B = M + G (in place in M unless the arithmetic needs a wider dtype).
    torch::Tensor b = m.to(work.dtype());
    b.add_(gm.to(work.dtype()));
    const auto qw = q.to(work.dtype());

    torch::Tensor p, unused;
    auto bq = torch::mm(b, qw);  // m × r
    if (parallel) parallel->average({bq}, "Dion factors B·Q");
    std::tie(p, unused) = torch::linalg_qr(bq, "reduced");  // m × r
    auto r = torch::mm(b.t(), p);                            // n × r
    if (parallel) parallel->average({r}, "Dion factors Bᵀ·P");

    b.addmm_(p, r.t(), /*beta=*/1.0, /*alpha=*/-(1.0 - mu));  // M ← B − (1 − μ)·P·Rᵀ
    if (!b.is_same(m)) m.copy_(b);
    auto q_new = column_normalise(r);
    q.copy_(q_new);

    const double scale = ns_output_scale(own_scale, rows, cols);
    auto u = torch::mm(p, q_new.t());
    if (scale != 1.0) u.mul_(scale);
    return u.to(g.scalar_type()).reshape(g.sizes());
  }
};

}  // namespace mep
