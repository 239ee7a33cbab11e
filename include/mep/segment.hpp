#pragma once
/// \file segment.hpp
/// The unit of the EP engine: a *segment* is a state-producing layer f (Linear, Conv1d,
/// Conv2d, or any other module with parameters) with the ops a that feed it (activations,
/// pooling, Flatten, Dropout, norms, or any other parameter-free module):
///
///   s_{l−1} ─a→ in_l ─f→ f_l(in_l)
///
/// A segment knows three things, each in analytic form (no autograd graph):
///   forward      in = a(s), pred = f(in)
///   input VJP    J_lᵀ·e = a'(s)ᵀ·(∂f/∂in)ᵀ·e          (what settling needs)
///   parameter gradient  (∂f/∂θ)ᵀ·e for the layer and the norms inside a
/// The ops of a segment write into an `OpTape` and the segment into a `SegmentTape`: the
/// buffers of the engine's workspace (energy.hpp), allocated once per batch shape, so that
/// the forward and the VJP of Linear layers, activations, pooling, Flatten, Dropout and
/// BatchNorm allocate nothing. Convolutions run through ATen's convolution kernels, which
/// return fresh tensors (LibTorch has no out= form of them); LayerNorm through ATen's
/// layer-norm kernels likewise. An op or layer without an analytic form (a convolution
/// with a non-zero padding mode, a module run through its forward: autograd_module.hpp)
/// makes its segment take autograd's vector-Jacobian product and parameter gradient
/// instead; `analytic = false` takes autograd's vector-Jacobian product everywhere (tests,
/// benchmarks). ‖J‖ of a segment with a module run through its forward comes from power
/// iterations through autograd.
///
/// Dropout (every kind) is the identity (EP has no dropout), as is Identity. BatchNorm
/// normalises with statistics frozen for the step (the batch's in train mode, the running ones in eval mode), which
/// makes it an affine map per channel, x·scale + shift; those statistics live in the
/// workspace, not in the op.

#include <mep/autograd_module.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace mep {

/// Module: a parameter-free module without an analytic form, run through its forward.
enum class OpKind {
  Activation, Flatten, Dropout, BatchNorm, LayerNorm, MaxPool, AvgPool, AdaptiveAvgPool, Softmax, LogSoftmax, Module
};
enum class Activation { ReLU, LeakyReLU, Sigmoid, Tanh, GELU, GELUTanh, SiLU, ELU, Softplus };

/// Per-step buffers of one op: its output, what its VJP needs, its VJP's result.
struct OpTape {
  torch::Tensor out, aux, grad;
  // BatchNorm: statistics frozen for the step, the affine map they make, and the number
  // of values per channel they came from (0: nothing for the running statistics to take in).
  torch::Tensor mean, var, scale, shift;
  int64_t count = 0;
  std::vector<torch::Tensor> saved_running;  // running mean, var, count (or a module's buffers) before the last commit
  torch::Tensor ff_in;                       // OpKind::Module with buffers: its input at the feedforward states
};

/// A parameter-free or normalising op between two layers (SPEC §1).
struct Op {
  OpKind kind = OpKind::Dropout;
  std::shared_ptr<torch::nn::Module> module;
  size_t position = 0;  // in the Sequential
  Activation act = Activation::ReLU;
  double a = 0, b = 0;                  // activation parameters: slope/alpha, (beta, threshold)
  int64_t start_dim = 1, end_dim = -1;  // Flatten; Softmax and LogSoftmax use start_dim as their dim
  int64_t pool_dims = 2;                // pooling over 1 or 2 spatial dimensions
  std::vector<int64_t> kernel, stride, padding, dilation, output_size;  // pooling
  bool ceil_mode = false, count_include_pad = true;
  c10::optional<int64_t> divisor;
  double norm_eps = 1e-5;
  std::vector<int64_t> normalized_shape;  // LayerNorm

  torch::Tensor weight, bias;             // norms: affine parameters (undefined without)
  AutogradModule call;                    // OpKind::Module

  bool analytic() const { return kind != OpKind::Module; }

  /// The op as a function (allocates); BatchNorm uses the frozen statistics of `t`.
  torch::Tensor forward(const torch::Tensor& x, const OpTape& t) const {
    switch (kind) {
      case OpKind::Dropout: return x;
      case OpKind::Flatten: return x.flatten(start_dim, end_dim);
      case OpKind::Activation: return activate(x);
      case OpKind::Softmax: return torch::softmax(x, start_dim);
      case OpKind::LogSoftmax: return torch::log_softmax(x, start_dim);
      case OpKind::Module: return call.forward(x);
      case OpKind::BatchNorm: return torch::batch_norm(x, weight, bias, t.mean, t.var, false, 0.0, norm_eps, false);
      case OpKind::LayerNorm: return torch::layer_norm(x, normalized_shape, weight, bias, norm_eps);
      case OpKind::MaxPool:
        return from2d(std::get<0>(at::max_pool2d_with_indices(as2d(x), kernel, stride, padding, dilation, ceil_mode)));
      case OpKind::AvgPool:
        return from2d(at::avg_pool2d(as2d(x), kernel, stride, padding, ceil_mode, count_include_pad, divisor));
      case OpKind::AdaptiveAvgPool: return from2d(at::adaptive_avg_pool2d(as2d(x), adaptive_size(x)));
    }
    return x;
  }

  torch::Tensor activate(const torch::Tensor& s) const {
    switch (act) {
      case Activation::ReLU: return torch::relu(s);
      case Activation::LeakyReLU: return torch::leaky_relu(s, a);
      case Activation::Sigmoid: return torch::sigmoid(s);
      case Activation::Tanh: return torch::tanh(s);
      case Activation::GELU: return torch::gelu(s, "none");
      case Activation::GELUTanh: return torch::gelu(s, "tanh");
      case Activation::SiLU: return torch::silu(s);
      case Activation::ELU: return torch::elu(s, a);
      case Activation::Softplus: return torch::softplus(s, a, b);
    }
    return s;
  }

  /// Allocates the buffers of `t` for input `in` (runs the op once to learn its shape; a
  /// module run through its forward twice, to refuse one whose output is random).
  void prepare(const torch::Tensor& in, OpTape& t) const {
    auto out = kind == OpKind::BatchNorm ? in : forward(in, static_cast<const OpTape&>(t));
    if (kind == OpKind::Module) {
      call.check_deterministic(in, out);
      t.out = out;
      t.grad = torch::Tensor();
      return;
    }
    if (kind == OpKind::Flatten || kind == OpKind::Dropout) {
      t.out = torch::Tensor();
      t.grad = torch::Tensor();
      return;
    }
    t.out = torch::empty_like(out, torch::MemoryFormat::Contiguous);
    t.grad = torch::empty_like(in, torch::MemoryFormat::Contiguous);
    if (kind == OpKind::MaxPool) t.aux = torch::empty(as2d(t.out).sizes(), in.options().dtype(torch::kLong));
  }

  /// out = op(in), into the tape (a view of `in` for Flatten, `in` itself for Dropout).
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    switch (kind) {
      case OpKind::Dropout: return in;
      case OpKind::Flatten: return in.flatten(start_dim, end_dim);
      case OpKind::Activation: activate_out(in, t.out); return t.out;
      case OpKind::Softmax: at::_softmax_out(t.out, in, start_dim, false); return t.out;
      case OpKind::LogSoftmax: at::_log_softmax_out(t.out, in, start_dim, false); return t.out;
      case OpKind::Module: t.out = call.forward(in); return t.out;
      case OpKind::BatchNorm: {
        auto scale = channel_view(t.scale, in), shift = channel_view(t.shift, in);
        at::mul_out(t.out, in, scale);
        t.out.add_(shift);
        return t.out;
      }
      case OpKind::LayerNorm: {
        auto r = at::native_layer_norm(in, normalized_shape, weight, bias, norm_eps);
        t.out = std::get<0>(r), t.mean = std::get<1>(r), t.var = std::get<2>(r);  // var holds rstd
        return t.out;
      }
      case OpKind::MaxPool: {
        auto out2 = as2d(t.out);
        at::max_pool2d_with_indices_out(out2, t.aux, as2d(in), kernel, stride, padding, dilation, ceil_mode);
        return t.out;
      }
      case OpKind::AvgPool: {
        auto out2 = as2d(t.out);
        at::avg_pool2d_out(out2, as2d(in), kernel, stride, padding, ceil_mode, count_include_pad, divisor);
        return t.out;
      }
      case OpKind::AdaptiveAvgPool: {
        auto out2 = as2d(t.out);
        at::adaptive_avg_pool2d_out(out2, as2d(in), adaptive_size(in));
        return t.out;
      }
    }
    return in;
  }

  /// Its VJP (∂op/∂in)ᵀ·grad at `in`, after `forward(in, t)`: into t.grad, or a view.
  torch::Tensor vjp(const torch::Tensor& grad, const torch::Tensor& in, OpTape& t) const {
    switch (kind) {
      case OpKind::Dropout: return grad;
      case OpKind::Flatten: return grad.view(in.sizes());
      case OpKind::Activation: activation_vjp(grad, in, t); return t.grad;
      case OpKind::Softmax: at::_softmax_backward_data_out(t.grad, grad, t.out, start_dim, in.scalar_type()); return t.grad;
      case OpKind::LogSoftmax:
        at::_log_softmax_backward_data_out(t.grad, grad, t.out, start_dim, in.scalar_type());
        return t.grad;
      case OpKind::Module: t.grad = call.vjp(grad, in); return t.grad;
      case OpKind::BatchNorm: at::mul_out(t.grad, grad, channel_view(t.scale, in)); return t.grad;
      case OpKind::LayerNorm:
        t.grad = std::get<0>(at::native_layer_norm_backward(grad, in, normalized_shape, t.mean, t.var, weight, bias,
                                                            {true, false, false}));
        return t.grad;
      case OpKind::MaxPool: {
        auto g2 = as2d(t.grad);
        at::max_pool2d_with_indices_backward_out(g2, as2d(grad), as2d(in), kernel, stride, padding, dilation,
                                                 ceil_mode, t.aux);
        return t.grad;
      }
      case OpKind::AvgPool: {
        auto g2 = as2d(t.grad);
        at::avg_pool2d_backward_out(g2, as2d(grad), as2d(in), kernel, stride, padding, ceil_mode, count_include_pad,
                                    divisor);
        return t.grad;
      }
      case OpKind::AdaptiveAvgPool: {
        auto g2 = as2d(t.grad);
        at::_adaptive_avg_pool2d_backward_out(g2, as2d(grad), as2d(in));
        return t.grad;
      }
    }
    return grad;
  }

  /// An upper bound of ‖∂op/∂in‖₂ for input `in`, as far as it depends on neither learned
  /// values nor statistics (the norms' part is `norm_gain`; here they count 1):
  ///   activations sup|a′| (ReLU, tanh, softplus 1; sigmoid ¼; GELU 1.129; SiLU 1.100;
  ///   leaky ReLU and ELU max(1, |a|)); Softmax 1 (‖diag p − ppᵀ‖ ≤ max p); LogSoftmax over K
  ///   classes max(1, √(2(K − 1))) (√(‖J‖₁‖J‖_∞) for J = I − 1pᵀ); Flatten, Dropout 1;
  ///   pooling √(‖J‖₁‖J‖_∞): max √m, m = the most windows sharing one input; average √(m/k)
  ///   with k taps per window (√m where border windows divide by less, √(m·k)/d with divisor d).
  ///   A module run through its forward has no such bound: its segment's norm comes from
  ///   power iterations instead (Segment::jacobian_norm), and it counts 1 here.
  double gain(const torch::Tensor& in) const {
    switch (kind) {
      case OpKind::LogSoftmax: {
        const double k = static_cast<double>(in.size(start_dim));
        return std::max(1.0, std::sqrt(2 * (k - 1)));
      }
      case OpKind::Module:
      case OpKind::Dropout:
      case OpKind::Flatten:
      case OpKind::BatchNorm:
      case OpKind::LayerNorm:
      case OpKind::Softmax: return 1.0;
      case OpKind::Activation:
        switch (act) {
          case Activation::Sigmoid: return 0.25;
          case Activation::GELU:
          case Activation::GELUTanh: return 1.129;
          case Activation::SiLU: return 1.1;
          case Activation::LeakyReLU:
          case Activation::ELU: return std::max(1.0, std::abs(a));
          default: return 1.0;
        }
      case OpKind::MaxPool:
      case OpKind::AvgPool: {
        double m = 1, taps = 1;
        for (size_t d = 0; d < kernel.size(); ++d) {
          const int64_t dil = kind == OpKind::MaxPool ? dilation[d] : 1;
          m *= static_cast<double>(std::min(kernel[d], ((kernel[d] - 1) * dil + stride[d]) / stride[d]));
          taps *= static_cast<double>(kernel[d]);
        }
        if (kind == OpKind::MaxPool) return std::sqrt(m);
        if (divisor.has_value()) return std::sqrt(m * taps) / static_cast<double>(*divisor);
        return count_include_pad && !ceil_mode ? std::sqrt(m / taps) : std::sqrt(m);
      }
      case OpKind::AdaptiveAvgPool: {
        const auto x = as2d(in);
        const auto out = adaptive_size(in);
        double c = 1;
        for (size_t d = 0; d < 2; ++d) {
          const int64_t n = x.size(x.dim() - 2 + static_cast<int64_t>(d));
          const int64_t o = out[d];
          if (n % o == 0) c /= static_cast<double>(n / o);        // disjoint windows of n/o
          else if (n > o) c *= 2.0 / static_cast<double>(n / o);  // at most two windows, each ≥ ⌊n/o⌋ wide
          else c *= static_cast<double>((o + n - 1) / n + 1);     // at most ⌈o/n⌉ + 1 windows
        }
        return std::sqrt(c);
      }
    }
    return 1.0;
  }
  /// The norms' part of that bound at the statistics recorded in `t`, a 0-dim tensor:
  /// BatchNorm max_c |γ_c|/√(σ²_c + ε) (frozen statistics), LayerNorm max|γ|·max_b 1/σ_b.
  /// Undefined for the other ops.
  torch::Tensor norm_gain(const OpTape& t) const {
    if (kind == OpKind::BatchNorm) return t.scale.abs().max();
    if (kind != OpKind::LayerNorm) return torch::Tensor();
    auto g = t.var.max();  // native_layer_norm's rstd per sample
    return weight.defined() ? g * weight.abs().max() : g;
  }

  /// Gradients of the norm's weight and bias for `grad` at its output (undefined when the
  /// norm has none), appended in module order.
  void parameter_gradients(const torch::Tensor& grad, const torch::Tensor& in, const OpTape& t,
                           std::vector<torch::Tensor>& out) const {
    const auto& w = weight;
    const auto& bb = bias;
    if (!w.defined() && !bb.defined()) return;
    torch::Tensor gw, gb;
    if (kind == OpKind::LayerNorm) {
      auto r = at::native_layer_norm_backward(grad, in, normalized_shape, t.mean, t.var, w, bb,
                                              {false, w.defined(), bb.defined()});
      gw = std::get<1>(r), gb = std::get<2>(r);
    } else {  // BatchNorm: x̂ = (x − μ)/√(σ² + ε); ∂w = Σ g·x̂, ∂b = Σ g over all but the channel
      std::vector<int64_t> dims{0};
      for (int64_t d = 2; d < in.dim(); ++d) dims.push_back(d);
      auto xhat = (in - channel_view(t.mean, in)) * channel_view((t.var + norm_eps).rsqrt(), in);
      if (w.defined()) gw = (grad * xhat).sum(dims);
      if (bb.defined()) gb = grad.sum(dims);
    }
    if (w.defined()) out.push_back(gw);
    if (bb.defined()) out.push_back(gb);
  }

 private:
  // Pooling runs on 4-D [N, C, H, W] views; 1-D pooling on [N, C, 1, W].
  torch::Tensor as2d(const torch::Tensor& x) const { return pool_dims == 1 ? x.unsqueeze(-2) : x; }
  torch::Tensor from2d(const torch::Tensor& x) const { return pool_dims == 1 ? x.squeeze(-2) : x; }
  std::vector<int64_t> adaptive_size(const torch::Tensor& x) const {
    if (pool_dims == 1) return {1, output_size[0]};
    std::vector<int64_t> out = output_size;
    for (size_t d = 0; d < 2; ++d)
      if (out[d] < 0) out[d] = x.size(x.dim() - 2 + static_cast<int64_t>(d));
    return out;
  }

  static torch::Tensor channel_view(const torch::Tensor& v, const torch::Tensor& like) {
    std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
    shape[1] = v.numel();
    return v.view(shape);
  }

  void activate_out(const torch::Tensor& s, torch::Tensor& out) const {
    switch (act) {
      case Activation::ReLU: at::clamp_min_out(out, s, 0); break;
      case Activation::LeakyReLU: at::leaky_relu_out(out, s, a); break;
      case Activation::Sigmoid: at::sigmoid_out(out, s); break;
      case Activation::Tanh: at::tanh_out(out, s); break;
      case Activation::GELU: at::gelu_out(out, s, "none"); break;
      case Activation::GELUTanh: at::gelu_out(out, s, "tanh"); break;
      case Activation::SiLU: at::silu_out(out, s); break;
      case Activation::ELU: at::elu_out(out, s, a); break;
      case Activation::Softplus: at::softplus_out(out, s, a, b); break;
    }
  }

  // ATen's derivative kernels: a'(s)·g elementwise.
  void activation_vjp(const torch::Tensor& g, const torch::Tensor& s, OpTape& t) const {
    switch (act) {
      case Activation::ReLU: at::threshold_backward_out(t.grad, g, s, 0); break;
      case Activation::LeakyReLU: at::leaky_relu_backward_out(t.grad, g, s, a, false); break;
      case Activation::Sigmoid: at::sigmoid_backward_out(t.grad, g, t.out); break;
      case Activation::Tanh: at::tanh_backward_out(t.grad, g, t.out); break;
      case Activation::GELU: at::gelu_backward_out(t.grad, g, s, "none"); break;
      case Activation::GELUTanh: at::gelu_backward_out(t.grad, g, s, "tanh"); break;
      case Activation::SiLU: at::silu_backward_out(t.grad, g, s); break;
      case Activation::ELU: at::elu_backward_out(t.grad, g, a, 1, 1, false, s); break;
      case Activation::Softplus: at::softplus_backward_out(t.grad, g, s, a, b); break;
    }
  }
};

/// Module: any other module with parameters (a user's block), run through its forward.
enum class LayerKind { Linear, Conv1d, Conv2d, Module };

/// Per-step buffers of one segment.
struct SegmentTape {
  std::vector<OpTape> ops;
  torch::Tensor in;            // a(s_{l−1}), the layer's input
  torch::Tensor pred;          // f_l(in)
  torch::Tensor eps, delta;    // ε_l = −∂E_l/∂f_l and δ_l = ∂E_l/∂s_l (the same tensor for ½‖s − f‖²)
  torch::Tensor back;          // J_lᵀ·ε_l with respect to s_{l−1}
  torch::Tensor layer_grad;    // (∂f/∂in)ᵀ·ε_l, before the ops' VJPs
  torch::Tensor leaf, graph;   // autograd fallback: s_{l−1} as a leaf, and f_l built from it
  torch::Tensor ff_in;         // LayerKind::Module with buffers: its input at the feedforward states
  std::vector<torch::Tensor> saved_buffers;  // that module's buffers before the last commit
};

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
    for (const auto& op : pre)
      if (!op.analytic()) return false;
    return true;
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

  /// f(in) for the layer alone (allocates unless `out` is given for a 2-D Linear).
  torch::Tensor layer_forward(const torch::Tensor& in, torch::Tensor* out = nullptr) const {
    switch (kind) {
      case LayerKind::Linear:
        if (in.dim() == 2) {
          if (out != nullptr && out->defined()) {
            if (bias.defined()) at::addmm_out(*out, bias, in, weight.t());
            else at::mm_out(*out, in, weight.t());
            return *out;
          }
          return bias.defined() ? torch::addmm(bias, in, weight.t()) : torch::mm(in, weight.t());
        }
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
  torch::Tensor forward(const torch::Tensor& s, const std::vector<OpTape>& ops) const {
    torch::Tensor h = s;
    for (size_t j = 0; j < pre.size(); ++j) h = pre[j].forward(h, ops[j]);
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

  /// Allocates `t` for input state `s` (shapes from one functional forward).
  void prepare(const torch::Tensor& s, SegmentTape& t) const {
    t.ops.resize(pre.size());
    torch::Tensor h = s;
    for (size_t j = 0; j < pre.size(); ++j) {
      pre[j].prepare(h, t.ops[j]);
      if (pre[j].kind == OpKind::Module) h = t.ops[j].out;
      else if (pre[j].kind != OpKind::BatchNorm) h = pre[j].forward(h, static_cast<const OpTape&>(t.ops[j]));
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
  /// (for the VJP fallback).
  void forward(const torch::Tensor& s, SegmentTape& t, bool autograd) const {
    if (autograd || !analytic()) {
      torch::AutoGradMode grad_mode(true);
      t.leaf = s.detach().requires_grad_(true);
      torch::Tensor h = t.leaf;
      for (size_t j = 0; j < pre.size(); ++j) h = pre[j].forward(h, static_cast<const OpTape&>(t.ops[j]));
      t.in = h.detach();
      t.graph = layer_forward(h);
      t.pred = t.graph.detach();
      return;
    }
    t.leaf = t.graph = torch::Tensor();
    torch::Tensor h = s;
    for (size_t j = 0; j < pre.size(); ++j) h = pre[j].forward(h, t.ops[j]);
    t.in = h;
    if (kind == LayerKind::Linear && h.dim() == 2) layer_forward(h, &t.pred);
    else t.pred = layer_forward(h);  // ATen's convolution returns a new tensor
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
    for (size_t j = pre.size(); j-- > 0;) g = pre[j].vjp(g, j == 0 ? s : op_input(s, t, j), t.ops[j]);
    t.back = g;
    return t.back;
  }

  /// An estimate of ‖J_l‖₂ = ‖∂f_l/∂s_{l−1}‖₂ at the point recorded in `t` (after forward or
  /// feedforward), as a 0-dim tensor on the weight's device: the ops' bounds (Op::gain,
  /// Op::norm_gain) times ‖W‖₂ for a Linear layer, ‖W‖₂·√m for a convolution, W viewed as
  /// out × (in/groups · kernel) and m = Π_d min(k_d, ⌈((k_d − 1)·dilation_d + 1)/stride_d⌉)
  /// the most patches one input element enters. ‖W‖₂ comes from `iters` power iterations
  /// from a fixed start vector: deterministic, and an estimate from below. A segment with a
  /// module run through its forward (autograd_jacobian) takes `iters` power iterations on
  /// J_lᵀJ_l through autograd instead (jacobian_norm_by_power_iteration: about 2·iters + 3
  /// passes through the segment), also from below.
  torch::Tensor jacobian_norm(const torch::Tensor& s, const SegmentTape& t, int64_t iters) const {
    if (autograd_jacobian())
      return jacobian_norm_by_power_iteration([&](const torch::Tensor& x) { return forward(x, t.ops); }, s, iters);
    torch::NoGradGuard no_grad;
    const auto w = weight.flatten(1);
    auto v = torch::ones({w.size(1)}, w.options());
    auto u = torch::empty({w.size(0)}, w.options());
    for (int64_t k = 0; k < iters; ++k) {
      at::mv_out(u, w, v);
      at::mv_out(v, w.t(), u);
      if (k % 2 == 1 || k + 1 == iters) v.div_(v.norm().clamp_min(1e-30));  // (WᵀW)² scales by ≤ σ⁴
    }
    auto bound = at::mv_out(u, w, v).norm();
    double fixed = 1;
    for (size_t d = 0; d + 2 < static_cast<size_t>(weight.dim()); ++d)
      fixed *= static_cast<double>(std::min(weight.size(static_cast<int64_t>(d) + 2),
                                            ((weight.size(static_cast<int64_t>(d) + 2) - 1) * dilation[d] + stride[d]) / stride[d]));
    fixed = std::sqrt(fixed);
    for (size_t j = 0; j < pre.size(); ++j) {
      fixed *= pre[j].gain(op_input(s, t, j));
      auto g = pre[j].norm_gain(t.ops[j]);
      if (g.defined()) bound = bound * g;
    }
    return bound * fixed;
  }

  /// The input of op j (the output of op j−1; `s` for j = 0).
  torch::Tensor op_input(const torch::Tensor& s, const SegmentTape& t, size_t j) const {
    torch::Tensor h = s;
    for (size_t k = 0; k < j; ++k) {
      const auto& op = pre[k];
      h = op.kind == OpKind::Dropout ? h : op.kind == OpKind::Flatten ? h.flatten(op.start_dim, op.end_dim) : t.ops[k].out;
    }
    return h;
  }
};

}  // namespace mep
