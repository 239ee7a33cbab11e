#pragma once
/// \file workspace.hpp
/// The per-step values of the EP engine, as data: everything a step computes on one batch
/// shape lives here, allocated once by the feedforward pass (ep/feedforward.hpp) and reused
/// while the shape, dtype and device stay the same. The structural types (chain, segments,
/// ops) hold no per-step value; the functions of ep/energy.hpp read and write this.
///
/// Names follow the energy (ep/energy.hpp): states s_l, feedforward states f_l(…), the layer
/// errors ε_l = −∂E_l/∂f_l and δ_l = ∂E_l/∂s_l, and the state gradients ∂E/∂s_l.

#include <mep/loss.hpp>

#include <torch/torch.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace mep {

struct Chain;

/// Frozen statistics of a BatchNorm op for one step, and the affine map they make
/// (ep/batch_norm.hpp).
struct NormStatistics {
  torch::Tensor mean, var, scale, shift;
  int64_t count = 0;  // values per channel they came from (0: nothing for the running statistics to take in)
  std::vector<torch::Tensor> saved_running;  // running mean, var, count (or a module's buffers) before the last commit
};

/// Per-step buffers of one op: its output, what its VJP needs, its VJP's result.
struct OpTape {
  torch::Tensor out, aux, grad;  // aux: MaxPool's indices; LayerNorm's mean (grad holds nothing then)
  torch::Tensor rstd;            // LayerNorm: 1/σ per sample
  NormStatistics norm;           // BatchNorm
  torch::Tensor ff_in;           // a module run through its forward, with buffers: its feedforward input
};

/// Views of a segment's weight made once and kept while the weight's data stays where it
/// was (ep/segment.hpp: `WeightViews::fits`), so that a step does not make them again: W as
/// a matrix and its transpose for the power iterations of ‖W‖₂, with their vectors (the
/// fixed start 1, and u, v), and Wᵀ for a Linear layer's forward.
struct WeightViews {
  const void* data = nullptr;  // the weight's data when they were made
  std::vector<int64_t> sizes;
  torch::TensorOptions options;
  torch::Tensor w, wt;          // W as out × rest, and Wᵀ (power iterations)
  torch::Tensor ones, u, v;     // the start vector (never written), W·v, Wᵀ·u
  torch::Tensor linear_t;       // a Linear weight's Wᵀ (forward)
};

/// Per-step buffers of one segment s_{l−1} ─a→ in_l ─f→ f_l(in_l) (ep/segment.hpp).
struct SegmentTape {
  std::vector<OpTape> ops;
  torch::Tensor in;            // a(s_{l−1}), the layer's input
  torch::Tensor pred;          // f_l(in)
  torch::Tensor eps, delta;    // ε_l and δ_l (the same tensor for ½‖s − f‖²)
  torch::Tensor back;          // J_lᵀ·ε_l with respect to s_{l−1}
  torch::Tensor layer_grad;    // (∂f/∂in)ᵀ·ε_l, before the ops' VJPs
  torch::Tensor leaf, graph;   // autograd: s_{l−1} as a leaf, and f_l built from it
  torch::Tensor ff_in;         // a module layer with buffers: its input at the feedforward states
  std::vector<torch::Tensor> saved_buffers;  // that module's buffers before the last commit
  mutable WeightViews views;   // made on first use (a cache: const readers fill it)
  mutable torch::Tensor eps_t; // ε_lᵀ of a Linear layer (the Hebbian product), kept while ε_l stays put
};

/// How the output is nudged towards the target (ep/energy.hpp).
struct Nudging {
  Loss loss = Loss::MSE;
  double label_smoothing = 0.1;  // cross-entropy only
  double temperature = 1.0;      // softmax temperature of the KL last-layer term

  /// Whether the last internal term is the KL divergence (cross-entropy) rather than ½‖s_L − f_L‖².
  bool kl_last() const { return loss == Loss::CrossEntropy; }
  /// Label smoothing of the loss EP approximates (cross-entropy only).
  double loss_smoothing() const { return loss == Loss::CrossEntropy ? label_smoothing : 0.0; }
};

/// Buffers shaped like the states that settling policies keep between steps, by name;
/// allocated on first use (ep/settling.hpp: `States::scratch`).
struct Scratch {
  std::vector<torch::Tensor> velocity, saved_states, saved_velocity, saved_gradients, step;
};

/// Numbers kept as 0-dim tensors, by value (ep/gradient.hpp: `scale_tensor`).
struct ScaleCache {
  std::vector<std::pair<double, torch::Tensor>> scales;
};

/// The values of one EP step on one chain and batch shape.
struct Workspace {
  // What the step runs on.
  const Chain* chain = nullptr;
  Nudging nudging;
  bool analytic = true;  // analytic VJPs where the segment has them (else autograd everywhere)
  std::vector<int64_t> shape;
  torch::TensorOptions options;

  // States and what the energy leaves.
  std::vector<torch::Tensor> s;        // states s_1..s_L
  std::vector<torch::Tensor> ff;       // feedforward states
  std::vector<torch::Tensor> dE_ds;    // ∂E/∂s_l (after energy's evaluate)
  std::vector<SegmentTape> tape;       // per segment
  std::vector<OpTape> post_tape;       // the ops after the last layer
  torch::Tensor output;                // ŷ = post(s_L) at the feedforward states
  torch::Tensor target;                // the dense target y (one-hot or smoothed)
  bool at_feedforward = false;         // the tapes describe the feedforward states (every ε_l = 0)

  // The nudged output and the energy's sums.
  struct Sums {
    torch::Tensor out, diff, dcost, nudged_delta, kl, rows, row, total, sq_out;
    std::vector<torch::Tensor> sq;
    // Made with the buffers above: the squares viewed as [B, rest] (sq_rows, sq_out_rows),
    // zeros [B] (the first term of rows is added to them), and the residual's per-state
    // sums [2, L] (Σ(∂E/∂s_l)², Σs_l²) in the states' dtype with their 0-dim views, and in
    // float64 with its columns.
    std::vector<torch::Tensor> sq_rows;
    torch::Tensor sq_out_rows, zeros, partial, partial_d;
    std::vector<torch::Tensor> partial_slots, partial_cols;
  } sums;

  Scratch scratch;
  ScaleCache scales;  // the parameter gradients' factors

  size_t size() const { return s.size(); }
  int64_t batch() const { return shape.empty() ? 0 : shape[0]; }

};

}  // namespace mep
