#pragma once
/// \file newton_schulz.hpp
/// Newton-Schulz orthogonalisation (Muon). For a matrix gradient G (m × n), normalise
/// X₀ = G / ‖G‖_F and iterate towards the orthogonal polar factor U·Vᵀ of G = U·Σ·Vᵀ,
/// working on the orientation whose Gram matrix A = X·Xᵀ is the smaller one:
///   cubic (the reference):   X ← ½·X·(3I − XᵀX) = 1.5·X − 0.5·(X·Xᵀ)·X,
///                            X₀ = G / clamp(‖G‖_F, 1e-4, 1e4)
///   quintic (Jordan et al. 2024, Muon / modded-nanogpt):
///                            X ← a·X + (b·A + c·A²)·X,  (a,b,c) = (3.4445, −4.7750, 2.0315),
///                            X₀ = G / (‖G‖_F + 1e-7)
///   polar_express (Amsel et al. 2025, arXiv:2505.16932): the same quintic form with a
///                            per-iteration (a,b,c) schedule, X₀ = G / (1.01·‖G‖_F + 1e-7)
/// ns_steps = 0 returns X₀, the Frobenius-normalised gradient. Output scale: none (the
/// reference), √max(1, m/n) (Muon), or 0.2·√max(m, n) (update RMS matched to AdamW).
/// Tensors below 2-D pass through unchanged; conv kernels are viewed as (out, in·kh·kw).

#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/update/matrix.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace mep {

enum class NSCoefficients { Cubic, Quintic, PolarExpress };
enum class NSScale { None, Muon, AdamW };

/// The names of the coefficient schedules and scalings: in options set by name, in records,
/// in messages and when printed (options.hpp).
inline const std::vector<std::pair<NSCoefficients, const char*>>& enum_names(NSCoefficients) {
  static const std::vector<std::pair<NSCoefficients, const char*>> names = {
      {NSCoefficients::Cubic, "cubic"}, {NSCoefficients::Quintic, "quintic"}, {NSCoefficients::PolarExpress, "polar_express"}};
  return names;
}
inline const std::vector<std::pair<NSScale, const char*>>& enum_names(NSScale) {
  static const std::vector<std::pair<NSScale, const char*>> names = {
      {NSScale::None, "none"}, {NSScale::Muon, "muon"}, {NSScale::AdamW, "adamw"}};
  return names;
}

namespace detail {
// Polar Express schedule (Amsel et al. 2025), with the paper's safety factor 1.01 applied
// to every polynomial but the last: (a/1.01, b/1.01³, c/1.01⁵).
inline const std::array<std::array<double, 3>, 8>& polar_express_coefficients() {
  static const auto table = [] {
    std::array<std::array<double, 3>, 8> t = {{
        {8.28721201814563, -23.595886519098837, 17.300387312530933},
        {4.107059111542203, -2.9478499167379106, 0.5448431082926601},
        {3.9486908534822946, -2.908902115962949, 0.5518191394370137},
        {3.3184196573706015, -2.488488024314874, 0.51004894012372},
        {2.300652019954817, -1.6689039845747493, 0.4188073119525673},
        {1.891301407787398, -1.2679958271945868, 0.37680408948524835},
        {1.8750014808534479, -1.2500016453999487, 0.3750001645474248},
        {1.875, -1.25, 0.375},
    }};
    for (size_t i = 0; i + 1 < t.size(); ++i) {
      t[i][0] /= 1.01;
      t[i][1] /= std::pow(1.01, 3);
      t[i][2] /= std::pow(1.01, 5);
    }
    return t;
  }();
  return table;
}
}  // namespace detail

/// Orthogonalises `g` with `steps` Newton-Schulz iterations (no output scale): a matrix
/// (2-D), or a batch of matrices of one shape (3-D, B × m × n), each orthogonalised on its
/// own with batched products (bmm), so that B matrices cost the launches of one.
inline torch::Tensor newton_schulz(const torch::Tensor& g, int64_t steps,
                                   NSCoefficients coefficients = NSCoefficients::Cubic) {
  TORCH_CHECK(g.dim() == 2 || g.dim() == 3, "mep::newton_schulz expects a matrix or a batch of matrices, got ",
              g.sizes());
  const bool batched = g.dim() == 3;
  const bool transposed = g.size(-2) > g.size(-1);
  torch::Tensor x = transposed ? g.transpose(-2, -1) : g;  // x is (small × large): A = x·xᵀ is small
  const auto norm = batched ? at::linalg_vector_norm(x, 2, {-2, -1}, /*keepdim=*/true) : x.norm();
  switch (coefficients) {
    case NSCoefficients::Cubic: x = x / norm.clamp(1e-4, 1e4); break;
    case NSCoefficients::Quintic: x = x / (norm + 1e-7); break;
    case NSCoefficients::PolarExpress: x = x / (norm * 1.01 + 1e-7); break;
  }
  // c·X + d·(Y·Z): addmm for a matrix (the rounding of the per-matrix path), baddbmm for a batch.
  const auto add_product = [batched](const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& z, double c,
                                     double d) {
    return batched ? torch::baddbmm(x, y, z, c, d) : torch::addmm(x, y, z, c, d);
  };
  for (int64_t k = 0; k < steps; ++k) {
    auto xt = x.transpose(-2, -1);
    auto a = batched ? torch::bmm(x, xt) : torch::mm(x, xt);
    if (coefficients == NSCoefficients::Cubic) {
      x = add_product(x, a, x, 1.5, -0.5);
      continue;
    }
    double ca = 3.4445, cb = -4.7750, cc = 2.0315;
    if (coefficients == NSCoefficients::PolarExpress) {
      const auto& table = detail::polar_express_coefficients();
      const auto& row = table[std::min<size_t>(static_cast<size_t>(k), table.size() - 1)];
      ca = row[0], cb = row[1], cc = row[2];
    }
    auto b = add_product(a, a, a, cb, cc);  // b·A + c·A²
    x = add_product(x, b, x, ca, 1.0);      // a·X + B·X
  }
  return transposed ? x.transpose(-2, -1) : x;
}

/// The output scale s of an m × n orthogonalised update, the one formula for every policy
/// that scales one (NewtonSchulz, FisherNewtonSchulz, MuonUpdate, Dion): 1 (None),
/// √max(1, m/n) (Muon) or 0.2·√max(m, n) (AdamW).
inline double ns_output_scale(NSScale scale, int64_t rows, int64_t cols) {
  switch (scale) {
    case NSScale::Muon: return std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
    case NSScale::AdamW: return 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)));
    case NSScale::None: break;
  }
  return 1.0;
}

/// The Muon update policy: u = scale · NS(g) for matrices, u = g otherwise.
struct NewtonSchulz {
  template <class Derived>
  struct Options {
    MEP_ARG(int64_t, ns_steps, 5)
    MEP_ARG(NSCoefficients, ns_coefficients, NSCoefficients::Cubic)
    MEP_ARG(NSScale, ns_scale, NSScale::None)
    void validate() const {
      MEP_CHECK_OPTION(ns_steps_ >= 0, "ns_steps", ns_steps_, "a value >= 0");
      MEP_CHECK_ENUM_OPTION(ns_coefficients_, "ns_coefficients");
      MEP_CHECK_ENUM_OPTION(ns_scale_, "ns_scale");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("ns_steps", ns_steps_), v("ns_coefficients", ns_coefficients_), v("ns_scale", ns_scale_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("ns_steps", "Newton–Schulz iterations from X₀ = G / ‖G‖_F towards the polar factor U·Vᵀ of G = U·Σ·Vᵀ "
                    "(0: u = X₀)");
      v("ns_coefficients", "cubic, X ← 1.5·X − 0.5·(X·Xᵀ)·X; quintic, X ← a·X + (b·A + c·A²)·X, A = X·Xᵀ, "
                           "(a,b,c) = (3.4445, −4.7750, 2.0315); polar_express, a per-iteration (a,b,c)");
      v("ns_scale", "output scale s of u = s·NS(G) for an m × n matrix: none 1, muon √max(1, m/n), "
                    "adamw 0.2·√max(m, n)");
    }
  };

  static constexpr bool coupled_weight_decay = false;  // decoupled: W ← W(1 − lr·λ) − lr·m
  static constexpr bool owns_momentum = false;

  int64_t steps = 5;
  NSCoefficients coefficients = NSCoefficients::Cubic;
  NSScale scale = NSScale::None;

  NewtonSchulz() = default;
  template <class O>
  explicit NewtonSchulz(const O& o) : steps(o.ns_steps()), coefficients(o.ns_coefficients()), scale(o.ns_scale()) {}

  torch::Tensor direction(const torch::Tensor& g, ParamState&) const {
    if (!is_matrix(g)) return g;
    return orthogonalise(as_matrix(g)).reshape(g.sizes());
  }

  /// The directions of a group's gradients: the matrices of one shape orthogonalised as one
  /// batch (newton_schulz on B × m × n), a shape with one matrix as `direction` does.
  std::vector<torch::Tensor> directions(const std::vector<torch::Tensor>& g, const std::vector<ParamState*>& st) const {
    std::vector<torch::Tensor> u(g.size());
    std::vector<std::pair<std::vector<int64_t>, std::vector<size_t>>> shapes;  // shape → indices, in first-seen order
    for (size_t i = 0; i < g.size(); ++i) {
      if (!is_matrix(g[i])) {
        u[i] = g[i];
        continue;
      }
      auto shape = g[i].sizes().vec();
      auto it = std::find_if(shapes.begin(), shapes.end(), [&](const auto& e) { return e.first == shape; });
      if (it == shapes.end()) it = shapes.insert(shapes.end(), {shape, {}});
      it->second.push_back(i);
    }
    for (const auto& [shape, at] : shapes) {
      if (at.size() == 1) {
        u[at[0]] = direction(g[at[0]], *st[at[0]]);
        continue;
      }
      std::vector<torch::Tensor> batch;
      for (size_t i : at) batch.push_back(as_matrix(g[i]));
      const auto x = torch::stack(batch);
      auto o = newton_schulz(x, steps, coefficients);
      const double s = ns_output_scale(scale, x.size(1), x.size(2));
      if (s != 1.0) o = o * s;
      for (size_t k = 0; k < at.size(); ++k) u[at[k]] = o[static_cast<int64_t>(k)].reshape(g[at[k]].sizes());
    }
    return u;
  }

  /// s · NS(m) for a 2-D tensor m (m × n), s = ns_output_scale(scale, m, n).
  torch::Tensor orthogonalise(const torch::Tensor& m) const {
    auto u = newton_schulz(m, steps, coefficients);
    const double s = ns_output_scale(scale, m.size(0), m.size(1));
    if (s != 1.0) u = u * s;
    return u;
  }
};

}  // namespace mep
