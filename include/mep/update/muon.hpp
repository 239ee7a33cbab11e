#pragma once
/// \file muon.hpp
/// Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
/// https://kellerjordan.github.io/posts/muon/, and modded-nanogpt), computed as
/// `torch.optim.Muon` computes it (torch/optim/_muon.py, its default `use_addmm=False` path).
/// For a matrix parameter θ of shape A × B with gradient g, momentum μ, learning rate γ and
/// weight decay λ, at every step:
///
///   M ← M + (1 − μ)·(g − M)                 (M = 0 at first; `buf.lerp_(g, 1 − μ)`)
///   U = g + μ·(M − g)  with Nesterov,  U = M  without
///   X = bf16(U), transposed when A > B (so that X·Xᵀ is the smaller Gram matrix)
///   X ← X / max(‖X‖_F, ε)
///   k times:  G = X·Xᵀ;  H = b·G + (c·G)·G;  X ← a·X + H·X     ((a,b,c) = (3.4445, −4.7750, 2.0315))
///   O = X (transposed back)
///   θ ← θ·(1 − γ·λ) − γ·s·O,   s = √max(1, A/B)      (ns_scale muon: torch's "original")
///                               s = 0.2·√max(A, B)    (ns_scale adamw: torch's "match_rms_adamw",
///                                                      Liu et al. 2025, arXiv:2502.16982)
///                               s = 1                 (ns_scale none)
///
/// Every operation is torch's, in torch's order and dtypes, so that a float32 parameter
/// follows `torch.optim.Muon` bit for bit on the same device and LibTorch build.
/// `direction(g, state)` returns O un-scaled, in the dtype Newton–Schulz ran in (bfloat16 by
/// default, as torch's `param.add_(update, alpha=-adjusted_lr)` sees it); the optimizer
/// applies the weight decay with the unadjusted γ (`coupled_weight_decay = false`) and the
/// update as `θ.add_(O, −γ·lr_scale(θ))`.
///
/// Options beyond torch's: `ns_bfloat16(false)` runs Newton–Schulz in the parameter's own
/// dtype; `ns_coefficients` also takes Cubic, (a,b,c) = (1.5, −0.5, 0) in the same form (what
/// torch computes given those coefficients), and PolarExpress (Amsel et al. 2025,
/// arXiv:2505.16932), a per-iteration (a,b,c) schedule with X ← X / max(1.01·‖X‖_F, ε).
/// `conv_as_matrix(true)` departs from torch, which refuses every parameter that is not 2-D:
/// a tensor of three or more dims (a conv kernel [out, in, kh, kw]) is then viewed as the
/// matrix out × in·kh·kw, for Newton–Schulz and for s, as Jordan's own Muon does for conv
/// filters.
///
/// Muon takes matrices only: biases, norm gains and other non-matrix parameters (and, by
/// Jordan's recipe, the embeddings and the output layer) go to AdamW. `split_for_muon` sorts
/// parameters into the two, as KellerJordan/Muon's MuonWithAuxAdam recipe does:
///
///   auto s = mep::split_for_muon(model->parameters());
///   mep::Muon muon(s.matrices, mep::MuonOptions(0.02));
///   mep::AdamW adamw(s.others, mep::AdamWOptions(3e-4));
///
/// One departure from torch's arithmetic: when the gradient is already in Newton–Schulz's
/// dtype (a bfloat16 parameter, or ns_bfloat16(false)) and Nesterov is off, torch's
/// `grad.bfloat16()` is the momentum buffer itself and its in-place normalisation rescales
/// the buffer; here the buffer is left alone (the step's update is the same, later ones differ).

#include <mep/options.hpp>
#include <mep/state.hpp>
#include <mep/update/newton_schulz.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace mep {

/// Whether Muon takes `p`: a real floating-point matrix, or with `conv_as_matrix` a tensor of
/// three or more dims (a conv kernel), viewed as size(0) × the rest.
inline bool muon_takes(const torch::Tensor& p, bool conv_as_matrix = false) {
  if (!p.defined() || !p.is_floating_point()) return false;
  return p.dim() == 2 || (conv_as_matrix && p.dim() >= 3);
}

struct MuonUpdate {
  template <class Derived>
  struct Options {
    /// μ of the momentum buffer M ← M + (1 − μ)·(g − M).
    MEP_ARG(double, momentum, 0.95)
    /// Orthogonalise g + μ·(M − g) rather than M.
    MEP_ARG(bool, nesterov, true)
    /// Newton–Schulz iterations (0: the Frobenius-normalised update).
    MEP_ARG(int64_t, ns_steps, 5)
    /// Quintic (torch's and Jordan's), Cubic or PolarExpress.
    MEP_ARG(NSCoefficients, ns_coefficients, NSCoefficients::Quintic)
    /// The learning-rate scale s: Muon √max(1, A/B), AdamW 0.2·√max(A, B), None 1.
    MEP_ARG(NSScale, ns_scale, NSScale::Muon)
    /// ε of the normalisation X / max(‖X‖_F, ε).
    MEP_ARG(double, eps, 1e-7)
    /// Newton–Schulz in bfloat16, as torch; false: in the parameter's dtype.
    MEP_ARG(bool, ns_bfloat16, true)
    /// Conv kernels (3 or more dims) as out × in·kh·kw matrices; torch refuses them.
    MEP_ARG(bool, conv_as_matrix, false)

    void validate() const {
      MEP_CHECK_OPTION(momentum_ >= 0 && momentum_ < 1, "momentum", momentum_, "a value in [0, 1)");
      MEP_CHECK_OPTION(ns_steps_ >= 0 && ns_steps_ < 100, "ns_steps", ns_steps_, "a value in [0, 100), as torch");
      MEP_CHECK_ENUM_OPTION(ns_coefficients_, "ns_coefficients");
      MEP_CHECK_ENUM_OPTION(ns_scale_, "ns_scale");
      MEP_CHECK_OPTION(eps_ > 0 && std::isfinite(eps_), "eps", eps_, "a finite value > 0");
    }
    template <class V>
    void visit_options(V&& v) const {
      v("momentum", momentum_), v("nesterov", nesterov_), v("ns_steps", ns_steps_);
      v("ns_coefficients", ns_coefficients_), v("ns_scale", ns_scale_), v("eps", eps_);
      v("ns_bfloat16", ns_bfloat16_), v("conv_as_matrix", conv_as_matrix_);
    }
    template <class V>
    static void visit_option_docs(V&& v) {
      v("momentum", "μ of Muon's momentum buffer M ← M + (1 − μ)·(g − M)");
      v("nesterov", "orthogonalise g + μ·(M − g) rather than M");
      v("ns_steps", "Newton–Schulz iterations (0: the Frobenius-normalised update)");
      v("ns_coefficients", "quintic, (a,b,c) = (3.4445, −4.7750, 2.0315) as torch; cubic, (1.5, −0.5, 0); "
                           "polar_express, a per-iteration schedule");
      v("ns_scale", "the learning-rate scale s of an A × B matrix: muon √max(1, A/B), adamw 0.2·√max(A, B), none 1");
      v("eps", "ε of the normalisation X / max(‖X‖_F, ε)");
      v("ns_bfloat16", "Newton–Schulz in bfloat16, as torch; false: in the parameter's dtype");
      v("conv_as_matrix", "conv kernels (3 or more dims) as out × in·kh·kw matrices; torch refuses them");
    }
  };

  static constexpr bool coupled_weight_decay = false;  // θ ← θ(1 − γλ), with the unadjusted γ
  static constexpr bool owns_momentum = true;          // the buffer "momentum_buffer"

  double momentum = 0.95;
  bool nesterov = true;
  int64_t ns_steps = 5;
  NSCoefficients ns_coefficients = NSCoefficients::Quintic;
  NSScale ns_scale = NSScale::Muon;
  double eps = 1e-7;
  bool ns_bfloat16 = true;
  bool conv_as_matrix = false;

  MuonUpdate() = default;
  template <class O>
  explicit MuonUpdate(const O& o)
      : momentum(o.momentum()),
        nesterov(o.nesterov()),
        ns_steps(o.ns_steps()),
        ns_coefficients(o.ns_coefficients()),
        ns_scale(o.ns_scale()),
        eps(o.eps()),
        ns_bfloat16(o.ns_bfloat16()),
        conv_as_matrix(o.conv_as_matrix()) {}

  /// Throws OptionError unless Muon takes `p` (see muon_takes); `which` names it in the
  /// message, as "parameter 3 (group 0)".
  void check_parameter(const torch::Tensor& p, const std::string& which) const {
    if (muon_takes(p, conv_as_matrix)) return;
    std::ostringstream os;
    os << "mep::Muon: " << which;
    if (!p.defined()) {
      os << " is undefined";
    } else {
      os << " has shape " << p.sizes();
      if (!p.is_floating_point()) os << " and dtype " << p.scalar_type() << " (not a real floating-point type)";
    }
    os << "; mep::Muon takes matrices only, as torch.optim.Muon; give biases, norms and embeddings (all but the "
          "hidden layers' weight matrices) to mep::AdamW (see mep::split_for_muon)";
    if (p.defined() && p.is_floating_point() && p.dim() >= 3)
      os << ", or set conv_as_matrix(true) to treat a conv kernel as an out × in·kh·kw matrix";
    throw OptionError(os.str());
  }

  /// The factor s of the learning rate for parameter `p` (A × B its matrix shape).
  double lr_scale(const torch::Tensor& p) const {
    if (p.dim() < 2) return 1.0;
    const int64_t rows = p.size(0);
    const int64_t cols = p.dim() == 2 ? p.size(1) : (rows == 0 ? 0 : p.numel() / rows);
    return ns_output_scale(ns_scale, rows, cols);
  }

  /// O for gradient `g`: momentum, then Newton–Schulz; shaped like `g`, in Newton–Schulz's
  /// dtype. Updates the state's "momentum_buffer".
  torch::Tensor direction(const torch::Tensor& g, ParamState& st) const {
    check_parameter(g, "a gradient");
    torch::Tensor& buf = ParamState::zeros_like(st.momentum_buffer, g);
    buf.lerp_(g, 1 - momentum);
    const torch::Tensor update = nesterov ? g.lerp(buf, momentum) : buf;
    if (g.dim() == 2) return orthogonalise(update);
    return orthogonalise(update.reshape({update.size(0), -1})).reshape(g.sizes());
  }

  /// Newton–Schulz on the matrix `m` (k = ns_steps iterations), as torch's
  /// `_zeropower_via_newtonschulz(..., use_addmm=False)`.
  torch::Tensor orthogonalise(const torch::Tensor& m) const {
    const auto dtype = ns_bfloat16 ? torch::kBFloat16 : m.scalar_type();
    torch::Tensor x = m.to(dtype, /*non_blocking=*/false, /*copy=*/true);  // never the caller's tensor
    const bool tall = m.size(0) > m.size(1);
    if (tall) x = x.t();
    torch::Tensor norm = at::linalg_vector_norm(x, 2);  // torch's Tensor.norm() for p = "fro"
    if (ns_coefficients == NSCoefficients::PolarExpress) norm = norm * 1.01;
    x.div_(norm.clamp(eps));
    for (int64_t k = 0; k < ns_steps; ++k) {
      const auto [a, b, c] = coefficients(k);
      const auto gram = torch::mm(x, x.t());
      const auto gram_update = gram * b + torch::mm(gram * c, gram);
      x = x * a + torch::mm(gram_update, x);
    }
    return tall ? x.t() : x;
  }

  /// (a, b, c) of iteration k.
  std::tuple<double, double, double> coefficients(int64_t k) const {
    switch (ns_coefficients) {
      case NSCoefficients::Cubic: return {1.5, -0.5, 0.0};
      case NSCoefficients::PolarExpress: {
        const auto& table = detail::polar_express_coefficients();
        const auto& row = table[std::min<size_t>(static_cast<size_t>(k), table.size() - 1)];
        return {row[0], row[1], row[2]};
      }
      case NSCoefficients::Quintic: break;
    }
    return {3.4445, -4.7750, 2.0315};
  }
};

/// Parameters sorted for the two-optimizer recipe: `matrices` for mep::Muon, `others`
/// (biases, norm gains, and what the caller routes there) for mep::AdamW. The names are
/// filled by the overloads that take a module.
struct MuonSplit {
  std::vector<torch::Tensor> matrices;
  std::vector<torch::Tensor> others;
  std::vector<std::string> matrix_names;
  std::vector<std::string> other_names;
};

/// Sorts `params` by muon_takes(p, conv_as_matrix), keeping their order.
inline MuonSplit split_for_muon(const std::vector<torch::Tensor>& params, bool conv_as_matrix = false) {
  MuonSplit s;
  for (const auto& p : params) (muon_takes(p, conv_as_matrix) ? s.matrices : s.others).push_back(p);
  return s;
}

/// Sorts a module's parameters as KellerJordan/Muon's MuonWithAuxAdam recipe does: the
/// matrices (conv kernels too with `conv_as_matrix`) to Muon, except those named in
/// `to_others` (names as `named_parameters()` spells them, e.g. the embedding and the output
/// layer: {"0.weight", "4.weight"}), which go to AdamW with every non-matrix parameter.
/// Throws std::invalid_argument for a name in `to_others` that the module does not have.
inline MuonSplit split_for_muon(const torch::nn::Module& module, bool conv_as_matrix = false,
                                const std::vector<std::string>& to_others = {}) {
  std::set<std::string> excluded(to_others.begin(), to_others.end());
  MuonSplit s;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const bool to_adamw = excluded.erase(item.key()) > 0 || !muon_takes(item.value(), conv_as_matrix);
    (to_adamw ? s.others : s.matrices).push_back(item.value());
    (to_adamw ? s.other_names : s.matrix_names).push_back(item.key());
  }
  if (!excluded.empty()) {
    std::string names;
    for (const auto& n : excluded) names += (names.empty() ? "'" : ", '") + n + "'";
    throw std::invalid_argument("mep::split_for_muon: the module has no parameter named " + names);
  }
  return s;
}
template <class M>
MuonSplit split_for_muon(const torch::nn::ModuleHolder<M>& module, bool conv_as_matrix = false,
                         const std::vector<std::string>& to_others = {}) {
  return split_for_muon(*module, conv_as_matrix, to_others);
}

}  // namespace mep
