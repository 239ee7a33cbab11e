#pragma once
/// \file segment.hpp
/// The unit of the EP engine: a *segment* is a state-producing layer f (Linear, Conv1d,
/// Conv2d, or any other module with parameters) with the ops a that feed it (ep/ops.hpp):
///
///   s_{l−1} ─a→ in_l ─f→ f_l(in_l)
///
/// A segment knows, in analytic form where it can (no autograd graph):
///   forward      in = a(s), pred = f(in)
///   input VJP    J_lᵀ·e = a'(s)ᵀ·(∂f/∂in)ᵀ·e          (what settling needs)
///   ‖J_l‖₂       ‖W‖₂ times the ops' bounds              (what LayerSweep's step size needs)
/// It writes into its `SegmentTape` (ep/workspace.hpp), allocated once per batch shape, so
/// that the forward and the VJP of Linear layers and of the analytic ops allocate nothing.
/// Convolutions run through ATen's convolution kernels, which return fresh tensors (LibTorch
/// has no out= form of them). A segment with an op or layer without an analytic form (a
/// convolution with a non-zero padding mode, a module run through its forward:
/// ep/autograd_module.hpp) takes autograd's vector-Jacobian product instead, and its ‖J‖
/// comes from power iterations through autograd; `analytic = false` takes autograd's
/// vector-Jacobian product everywhere (tests, benchmarks).

#include <mep/ep/autograd_module.hpp>
#include <mep/ep/ops.hpp>
#include <mep/ep/workspace.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace mep {

/// Module: any other module with parameters (a user's block), run through its forward.
enum class LayerKind { Linear, Conv1d, Conv2d, Module };

/// A state-producing layer f_l and the ops a_{l−1} that feed it.
struct Segment {
  LayerKind kind = LayerKind::Linear;
  std::shared_ptr<torch::nn::Module> module;
  size_t position = 0;  // in the Sequential
  torch::Tensor weight, bias;  // bias may be undefined
  std::vector<Op> pre;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  bool zero_padding = true;  // conv: explicit zero padding, so the analytic VJP applies
  AutogradModule block;      // LayerKind::Module

  /// Whether the analytic forward, VJP and parameter gradient apply (otherwise: autograd
  /// through the modules' forms).
  bool analytic() const {
    if (kind == LayerKind::Module || (kind != LayerKind::Linear && !zero_padding)) return false;
    return !autograd_jacobian();
  }

  /// Whether ‖J‖ comes from power iterations through autograd (a module run through its
  /// forward) rather than from the weight's norm and the ops' bounds.
  bool autograd_jacobian() const {
    if (kind == LayerKind::Module) return true;
    for (const auto& op : pre)
      if (!op.analytic()) return true;
    return false;
  }

  /// The parameters of the segment in the model's order: its ops' (norms), then its layer's.
  std::vector<torch::Tensor> parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& op : pre)
      for (const auto& p : op.module->parameters()) out.push_back(p);
    for (const auto& p : module->parameters()) out.push_back(p);
    return out;
  }

  /// A parameter that says the dtype and device the segment computes in.
  torch::Tensor reference_parameter() const {
    if (weight.defined()) return weight;
    auto params = module->parameters();
    return params.empty() ? torch::Tensor() : params.front();
  }

  /// f(in) for the layer alone (allocates; autograd-capable).
  torch::Tensor layer_forward(const torch::Tensor& in) const {
    switch (kind) {
      case LayerKind::Linear:
        if (in.dim() == 2) return bias.defined() ? torch::addmm(bias, in, weight.t()) : torch::mm(in, weight.t());
        return torch::linear(in, weight, bias);
      case LayerKind::Conv1d:
        if (zero_padding) return torch::conv1d(in, weight, bias, stride, padding, dilation, groups);
        return module->as<torch::nn::Conv1d>()->forward(in);
      case LayerKind::Conv2d:
        if (zero_padding) return torch::conv2d(in, weight, bias, stride, padding, dilation, groups);
        return module->as<torch::nn::Conv2d>()->forward(in);
      case LayerKind::Module: return block.forward(in);
    }
    return in;
  }

  /// The segment as a function of s_{l−1} (allocates; autograd-capable).
  torch::Tensor apply(const torch::Tensor& s, const std::vector<OpTape>& ops) const {
    torch::Tensor h = s;
    for (size_t j = 0; j < pre.size(); ++j) h = pre[j].apply(h, ops[j]);
    return layer_forward(h);
  }

  /// (∂f/∂in)ᵀ·e for the layer alone, into `out` where it can.
  torch::Tensor layer_vjp(const torch::Tensor& e, const torch::Tensor& in, torch::Tensor& out) const {
    if (kind == LayerKind::Linear) {
      if (e.dim() == 2 && out.defined()) return at::mm_out(out, e, weight);
      return torch::matmul(e, weight);
    }
    if (kind == LayerKind::Module) return block.vjp(e, in);
    return std::get<0>(at::convolution_backward(e, in, weight, c10::nullopt, stride, padding, dilation,
                                                /*transposed=*/false, std::vector<int64_t>(stride.size(), 0), groups,
                                                {true, false, false}));
  }

  /// Allocates `t` for input state `s` (shapes from one functional forward; BatchNorm keeps
  /// its input's shape and has no statistics yet).
  void prepare(const torch::Tensor& s, SegmentTape& t) const {
    t.ops.resize(pre.size());
    torch::Tensor h = s;
    for (size_t j = 0; j < pre.size(); ++j) {
      pre[j].prepare(h, t.ops[j]);
      if (pre[j].is<ops::ModuleOp>()) h = t.ops[j].out;
      else if (!pre[j].is<BatchNorm>()) h = pre[j].apply(h, t.ops[j]);
    }
    auto f = layer_forward(h);
    if (kind == LayerKind::Module) block.check_deterministic(h, f);
    t.pred = torch::empty_like(f, torch::MemoryFormat::Contiguous);
    t.eps = torch::empty_like(t.pred);
    t.delta = t.eps;
    t.back = torch::Tensor();
    t.layer_grad = kind == LayerKind::Linear && h.dim() == 2 ? torch::empty_like(h, torch::MemoryFormat::Contiguous)
                                                              : torch::Tensor();
  }

  /// in = a(s), pred = f(in), into the tape. With `autograd`, builds a graph from s instead
  /// (for the VJP through autograd).
  void forward(const torch::Tensor& s, SegmentTape& t, bool autograd) const {
    if (autograd || !analytic()) {
      torch::AutoGradMode grad_mode(true);
      t.leaf = s.detach().requires_grad_(true);
      torch::Tensor h = t.leaf;
      for (size_t j = 0; j < pre.size(); ++j) h = pre[j].apply(h, t.ops[j]);
      t.in = h.detach();
      t.graph = layer_forward(h);
      t.pred = t.graph.detach();
      return;
    }
    t.leaf = t.graph = torch::Tensor();
    torch::Tensor h = s;
    for (size_t j = 0; j < pre.size(); ++j) h = pre[j].forward(h, t.ops[j]);
    t.in = h;
    layer_into(h, t);
  }

  /// pred = f(in) into the tape (ATen's convolution returns a new tensor); a 2-D Linear
  /// layer with its Wᵀ view kept in the tape (WeightViews).
  void layer_into(const torch::Tensor& in, SegmentTape& t) const {
    if (kind == LayerKind::Linear && in.dim() == 2 && t.pred.defined()) {
      WeightViews& v = views(t);
      if (!v.linear_t.defined()) v.linear_t = weight.t();
      if (bias.defined()) at::addmm_out(t.pred, bias, in, v.linear_t);
      else at::mm_out(t.pred, in, v.linear_t);
      return;
    }
    t.pred = layer_forward(in);
  }

  /// J_lᵀ·e with respect to s_{l−1}, after forward(s, t): into t.back.
  const torch::Tensor& vjp(const torch::Tensor& e, const torch::Tensor& s, SegmentTape& t) const {
    if (!t.leaf.defined() && !analytic()) forward(s, t, true);
    if (t.leaf.defined()) {
      t.back = torch::autograd::grad({t.graph}, {t.leaf}, {e}, /*retain_graph=*/true, /*create_graph=*/false,
                                     /*allow_unused=*/true)[0];
      if (!t.back.defined()) t.back = torch::zeros_like(s);  // f_l does not depend on s_{l−1}
      return t.back;
    }
    torch::Tensor g = layer_vjp(e, t.in, t.layer_grad);
    for (size_t j = pre.size(); j-- > 0;) g = pre[j].vjp(g, op_input(s, t, j), t.ops[j]);
    t.back = g;
    return t.back;
  }

  /// An estimate of ‖J_l‖₂ = ‖∂f_l/∂s_{l−1}‖₂ at the point recorded in `t`, as a 0-dim tensor
  /// on the weight's device: the ops' bounds (Op::gain, Op::norm_gain) times ‖W‖₂ for a
  /// Linear layer, ‖W‖₂·√m for a convolution, W viewed as out × (in/groups · kernel) and
  /// m = Π_d min(k_d, ⌈((k_d − 1)·dilation_d + 1)/stride_d⌉) the most patches one input
  /// element enters. ‖W‖₂ comes from `iters` power iterations from a fixed start vector:
  /// deterministic, and an estimate from below. A segment with a module run through its
  /// forward (autograd_jacobian) takes `iters` power iterations on J_lᵀJ_l through autograd
  /// instead (about 2·iters + 3 passes through the segment), also from below.
  torch::Tensor jacobian_norm(const torch::Tensor& s, const SegmentTape& t, int64_t iters) const {
    if (autograd_jacobian())
      return jacobian_norm_by_power_iteration([&](const torch::Tensor& x) { return apply(x, t.ops); }, s, iters);
    torch::NoGradGuard no_grad;
    WeightViews& p = views(t);
    if (!p.w.defined()) {
      p.w = weight.flatten(1), p.wt = p.w.t();
      p.ones = torch::ones({p.w.size(1)}, p.w.options());
      p.v = torch::empty_like(p.ones);
      p.u = torch::empty({p.w.size(0)}, p.w.options());
    }
    const auto &w = p.w, &wt = p.wt;
    auto &u = p.u, &v = p.v;
    // u = W·v as addmv with β = 0 (what mv_out runs, without its allocation); the first
    // product reads the start vector 1 itself, which no product writes.
    const torch::Tensor* x = &p.ones;
    for (int64_t k = 0; k < iters; ++k) {
      at::addmv_out(u, u, w, *x, 0, 1);
      at::addmv_out(v, v, wt, u, 0, 1);
      x = &v;
      if (k % 2 == 1 || k + 1 == iters) v.div_(v.norm().clamp_min(1e-30));  // (WᵀW)² scales by ≤ σ⁴
    }
    auto bound = at::addmv_out(u, u, w, *x, 0, 1).norm();
    double fixed = 1;
    for (size_t d = 0; d + 2 < static_cast<size_t>(weight.dim()); ++d) {
      const int64_t k = weight.size(static_cast<int64_t>(d) + 2);
      fixed *= static_cast<double>(std::min(k, ((k - 1) * dilation[d] + stride[d]) / stride[d]));
    }
    fixed = std::sqrt(fixed);
    for (size_t j = 0; j < pre.size(); ++j) {
      fixed *= pre[j].gain(op_input(s, t, j));
      auto g = pre[j].norm_gain(t.ops[j]);
      if (g.defined()) bound = bound * g;
    }
    return fixed == 1 ? bound : bound * fixed;
  }

  /// The tape's views of the weight (WeightViews), emptied first when the weight's data has
  /// moved, changed type or shape since they were made.
  WeightViews& views(const SegmentTape& t) const {
    WeightViews& v = t.views;
    const void* data = weight.data_ptr();
    if (v.data != data || v.sizes != weight.sizes().vec() || !v.options.type_equal(weight.options())) {
      v = WeightViews();
      v.data = data, v.sizes = weight.sizes().vec(), v.options = weight.options();
    }
    return v;
  }

  /// The input of op j (the output of op j−1; `s` for j = 0), as the last forward left it.
  torch::Tensor op_input(const torch::Tensor& s, const SegmentTape& t, size_t j) const {
    torch::Tensor h = s;
    for (size_t k = 0; k < j; ++k) h = pre[k].output(h, t.ops[k]);
    return h;
  }
};

}  // namespace mep
