#pragma once
/// \file ops.hpp
/// The ops a_i between two layers: parameter-free maps and norms, each a small struct that
/// knows its map in analytic form (no autograd graph):
///
///   forward   out = a(in)           into the op's tape (`forward`), or as a function (`apply`)
///   VJP       (∂a/∂in)ᵀ·g           into the tape
///   gain      an upper bound of ‖∂a/∂in‖₂ that depends on neither learned values nor
///             statistics (the norms' part is `norm_gain`, at the statistics in the tape)
///
/// The forward and VJP of activations, pooling, Flatten, Identity and BatchNorm write into
/// buffers allocated once per batch shape (`prepare`) and allocate nothing; LayerNorm runs
/// through ATen's layer-norm kernels, which return fresh tensors. Dropout (every kind) is the
/// identity, as EP has no dropout. BatchNorm lives in ep/batch_norm.hpp; a module without an
/// analytic form runs through its forward (`ModuleOp`, ep/autograd_module.hpp).

#include <mep/ep/autograd_module.hpp>
#include <mep/ep/batch_norm.hpp>
#include <mep/ep/workspace.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <variant>
#include <vector>

namespace mep {

namespace ops {

/// What every op has unless it says otherwise: out and grad buffers shaped by one call of
/// `apply`, a gain of 1, no norm gain, no parameters.
template <class Op>
struct Base {
  void prepare(const torch::Tensor& in, OpTape& t) const {
    auto out = static_cast<const Op&>(*this).apply(in, t);
    t.out = torch::empty_like(out, torch::MemoryFormat::Contiguous);
    t.grad = torch::empty_like(in, torch::MemoryFormat::Contiguous);
  }
  double gain(const torch::Tensor&) const { return 1.0; }
  torch::Tensor norm_gain(const OpTape&) const { return {}; }
  void parameter_gradients(const torch::Tensor&, const torch::Tensor&, const OpTape&, std::vector<torch::Tensor>&) const {}
};

/// Dropout of every kind, and Identity: out = in.
struct Identity : Base<Identity> {
  void prepare(const torch::Tensor&, OpTape& t) const { t.out = t.grad = torch::Tensor(); }
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const { return x; }
  torch::Tensor forward(const torch::Tensor& in, OpTape&) const { return in; }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor&, OpTape&) const { return g; }
};

/// Flatten over [start, end]: a view of in.
struct Flatten : Base<Flatten> {
  int64_t start = 1, end = -1;
  void prepare(const torch::Tensor&, OpTape& t) const { t.out = t.grad = torch::Tensor(); }
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const { return x.flatten(start, end); }
  torch::Tensor forward(const torch::Tensor& in, OpTape&) const { return in.flatten(start, end); }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape&) const { return g.view(in.sizes()); }
};

/// An elementwise activation a(s), its derivative through ATen's backward kernels, and
/// sup|a′|, one row per activation of `Activation::table` (a, b: negative slope or alpha;
/// softplus's beta and threshold).
struct Activation : Base<Activation> {
  enum class Fn { ReLU, LeakyReLU, Sigmoid, Tanh, GELU, GELUTanh, SiLU, ELU, Softplus };
  Fn fn = Fn::ReLU;
  double a = 0, b = 0;

  struct Row {
    Fn fn;
    torch::Tensor (*apply)(const torch::Tensor& s, double a, double b);
    void (*into)(torch::Tensor& out, const torch::Tensor& s, double a, double b);
    // grad = a'(s)·g; `out` = a(s) for the activations whose derivative reads their output.
    void (*vjp)(torch::Tensor& grad, const torch::Tensor& g, const torch::Tensor& s, const torch::Tensor& out,
                double a, double b);
    double (*gain)(double a);
  };
  using T = torch::Tensor;
  static const Row& row(Fn fn) {
    static const Row table[] = {
        {Fn::ReLU, [](const T& s, double, double) { return torch::relu(s); },
         [](T& o, const T& s, double, double) { at::clamp_min_out(o, s, 0); },
         [](T& r, const T& g, const T& s, const T&, double, double) { at::threshold_backward_out(r, g, s, 0); },
         [](double) { return 1.0; }},
        {Fn::LeakyReLU, [](const T& s, double a, double) { return torch::leaky_relu(s, a); },
         [](T& o, const T& s, double a, double) { at::leaky_relu_out(o, s, a); },
         [](T& r, const T& g, const T& s, const T&, double a, double) { at::leaky_relu_backward_out(r, g, s, a, false); },
         [](double a) { return std::max(1.0, std::abs(a)); }},
        {Fn::Sigmoid, [](const T& s, double, double) { return torch::sigmoid(s); },
         [](T& o, const T& s, double, double) { at::sigmoid_out(o, s); },
         [](T& r, const T& g, const T&, const T& out, double, double) { at::sigmoid_backward_out(r, g, out); },
         [](double) { return 0.25; }},
        {Fn::Tanh, [](const T& s, double, double) { return torch::tanh(s); },
         [](T& o, const T& s, double, double) { at::tanh_out(o, s); },
         [](T& r, const T& g, const T&, const T& out, double, double) { at::tanh_backward_out(r, g, out); },
         [](double) { return 1.0; }},
        {Fn::GELU, [](const T& s, double, double) { return torch::gelu(s, "none"); },
         [](T& o, const T& s, double, double) { at::gelu_out(o, s, "none"); },
         [](T& r, const T& g, const T& s, const T&, double, double) { at::gelu_backward_out(r, g, s, "none"); },
         [](double) { return 1.129; }},
        {Fn::GELUTanh, [](const T& s, double, double) { return torch::gelu(s, "tanh"); },
         [](T& o, const T& s, double, double) { at::gelu_out(o, s, "tanh"); },
         [](T& r, const T& g, const T& s, const T&, double, double) { at::gelu_backward_out(r, g, s, "tanh"); },
         [](double) { return 1.129; }},
        {Fn::SiLU, [](const T& s, double, double) { return torch::silu(s); },
         [](T& o, const T& s, double, double) { at::silu_out(o, s); },
         [](T& r, const T& g, const T& s, const T&, double, double) { at::silu_backward_out(r, g, s); },
         [](double) { return 1.1; }},
        {Fn::ELU, [](const T& s, double a, double) { return torch::elu(s, a); },
         [](T& o, const T& s, double a, double) { at::elu_out(o, s, a); },
         [](T& r, const T& g, const T& s, const T&, double a, double) { at::elu_backward_out(r, g, a, 1, 1, false, s); },
         [](double a) { return std::max(1.0, std::abs(a)); }},
        {Fn::Softplus, [](const T& s, double a, double b) { return torch::softplus(s, a, b); },
         [](T& o, const T& s, double a, double b) { at::softplus_out(o, s, a, b); },
         [](T& r, const T& g, const T& s, const T&, double a, double b) { at::softplus_backward_out(r, g, s, a, b); },
         [](double) { return 1.0; }},
    };
    const Row& r = table[static_cast<size_t>(fn)];
    TORCH_INTERNAL_ASSERT(r.fn == fn, "mep: the activation table is out of the enum's order");
    return r;
  }

  torch::Tensor apply(const torch::Tensor& s, const OpTape&) const { return row(fn).apply(s, a, b); }
  torch::Tensor forward(const torch::Tensor& s, OpTape& t) const {
    row(fn).into(t.out, s, a, b);
    return t.out;
  }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& s, OpTape& t) const {
    row(fn).vjp(t.grad, g, s, t.out, a, b);
    return t.grad;
  }
  double gain(const torch::Tensor&) const { return row(fn).gain(a); }
};

/// softmax over `dim`; ‖diag p − ppᵀ‖ ≤ max p ≤ 1.
struct Softmax : Base<Softmax> {
  int64_t dim = 1;
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const { return torch::softmax(x, dim); }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const { return at::_softmax_out(t.out, in, dim, false); }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    return at::_softmax_backward_data_out(t.grad, g, t.out, dim, in.scalar_type());
  }
};

/// log-softmax over `dim`; over K classes ‖J‖ ≤ max(1, √(2(K − 1))) (√(‖J‖₁‖J‖_∞) for J = I − 1pᵀ).
struct LogSoftmax : Base<LogSoftmax> {
  int64_t dim = 1;
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const { return torch::log_softmax(x, dim); }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const { return at::_log_softmax_out(t.out, in, dim, false); }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    return at::_log_softmax_backward_data_out(t.grad, g, t.out, dim, in.scalar_type());
  }
  double gain(const torch::Tensor& in) const {
    return std::max(1.0, std::sqrt(2 * (static_cast<double>(in.size(dim)) - 1)));
  }
};

/// LayerNorm over the trailing `shape`: the bound max|γ|·max_b 1/σ_b at the tape's statistics.
struct LayerNorm : Base<LayerNorm> {
  std::vector<int64_t> shape;
  double eps = 1e-5;
  torch::Tensor weight, bias;  // undefined without elementwise affine

  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const {
    return torch::layer_norm(x, shape, weight, bias, eps);
  }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    auto r = at::native_layer_norm(in, shape, weight, bias, eps);
    t.out = std::get<0>(r), t.aux = std::get<1>(r), t.rstd = std::get<2>(r);
    return t.out;
  }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    t.grad = std::get<0>(at::native_layer_norm_backward(g, in, shape, t.aux, t.rstd, weight, bias, {true, false, false}));
    return t.grad;
  }
  torch::Tensor norm_gain(const OpTape& t) const {
    auto g = t.rstd.max();
    return weight.defined() ? g * weight.abs().max() : g;
  }
  void parameter_gradients(const torch::Tensor& g, const torch::Tensor& in, const OpTape& t,
                           std::vector<torch::Tensor>& out) const {
    if (!weight.defined() && !bias.defined()) return;
    auto r = at::native_layer_norm_backward(g, in, shape, t.aux, t.rstd, weight, bias,
                                            {false, weight.defined(), bias.defined()});
    if (weight.defined()) out.push_back(std::get<1>(r));
    if (bias.defined()) out.push_back(std::get<2>(r));
  }
};

/// An op over 1 or 2 spatial dimensions, run in 2-D ([N, C, W] as [N, C, 1, W]).
struct Spatial {
  int64_t dims = 2;
  torch::Tensor as2d(const torch::Tensor& x) const { return dims == 1 ? x.unsqueeze(-2) : x; }
  torch::Tensor from2d(const torch::Tensor& x) const { return dims == 1 ? x.squeeze(-2) : x; }
};

/// Pooling with windows: kernel, stride, padding per spatial dimension.
struct Pooling : Spatial {
  std::vector<int64_t> kernel, stride, padding;
  bool ceil_mode = false;
  /// The most windows one input element enters, m = Π_d min(k_d, ⌊((k_d − 1)·dil_d + s_d)/s_d⌋),
  /// and the taps per window.
  std::pair<double, double> overlap(const std::vector<int64_t>& dilation) const {
    double m = 1, taps = 1;
    for (size_t d = 0; d < kernel.size(); ++d) {
      const int64_t dil = dilation.empty() ? 1 : dilation[d];
      m *= static_cast<double>(std::min(kernel[d], ((kernel[d] - 1) * dil + stride[d]) / stride[d]));
      taps *= static_cast<double>(kernel[d]);
    }
    return {m, taps};
  }
};

/// Max pooling; ‖J‖ ≤ √m (√(‖J‖₁‖J‖_∞)).
struct MaxPool : Base<MaxPool>, Pooling {
  std::vector<int64_t> dilation;
  void prepare(const torch::Tensor& in, OpTape& t) const {
    Base<MaxPool>::prepare(in, t);
    t.aux = torch::empty(as2d(t.out).sizes(), in.options().dtype(torch::kLong));
  }
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const {
    return from2d(std::get<0>(at::max_pool2d_with_indices(as2d(x), kernel, stride, padding, dilation, ceil_mode)));
  }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    auto out2 = as2d(t.out);
    at::max_pool2d_with_indices_out(out2, t.aux, as2d(in), kernel, stride, padding, dilation, ceil_mode);
    return t.out;
  }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    auto g2 = as2d(t.grad);
    at::max_pool2d_with_indices_backward_out(g2, as2d(g), as2d(in), kernel, stride, padding, dilation, ceil_mode, t.aux);
    return t.grad;
  }
  double gain(const torch::Tensor&) const { return std::sqrt(overlap(dilation).first); }
};

/// Average pooling; ‖J‖ ≤ √(m/k) with k taps per window (√m where border windows divide by
/// less, √(m·k)/d with divisor d).
struct AvgPool : Base<AvgPool>, Pooling {
  bool count_include_pad = true;
  c10::optional<int64_t> divisor;
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const {
    return from2d(at::avg_pool2d(as2d(x), kernel, stride, padding, ceil_mode, count_include_pad, divisor));
  }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    auto out2 = as2d(t.out);
    at::avg_pool2d_out(out2, as2d(in), kernel, stride, padding, ceil_mode, count_include_pad, divisor);
    return t.out;
  }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    auto g2 = as2d(t.grad);
    at::avg_pool2d_backward_out(g2, as2d(g), as2d(in), kernel, stride, padding, ceil_mode, count_include_pad, divisor);
    return t.grad;
  }
  double gain(const torch::Tensor&) const {
    const auto [m, taps] = overlap({});
    if (divisor.has_value()) return std::sqrt(m * taps) / static_cast<double>(*divisor);
    return count_include_pad && !ceil_mode ? std::sqrt(m / taps) : std::sqrt(m);
  }
};

/// Adaptive average pooling to `size` (−1: the input's size); per dimension of n inputs and
/// o outputs the bound takes 1/(n/o) for disjoint windows, else at most 2/⌊n/o⌋ (n > o) or
/// ⌈o/n⌉ + 1 (n ≤ o) windows per input.
struct AdaptiveAvgPool : Base<AdaptiveAvgPool>, Spatial {
  std::vector<int64_t> size;

  std::vector<int64_t> output_size(const torch::Tensor& x) const {
    if (dims == 1) return {1, size[0]};
    std::vector<int64_t> out = size;
    for (size_t d = 0; d < 2; ++d)
      if (out[d] < 0) out[d] = x.size(x.dim() - 2 + static_cast<int64_t>(d));
    return out;
  }
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const {
    return from2d(at::adaptive_avg_pool2d(as2d(x), output_size(x)));
  }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    auto out2 = as2d(t.out);
    at::adaptive_avg_pool2d_out(out2, as2d(in), output_size(in));
    return t.out;
  }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    auto g2 = as2d(t.grad);
    at::_adaptive_avg_pool2d_backward_out(g2, as2d(g), as2d(in));
    return t.grad;
  }
  double gain(const torch::Tensor& in) const {
    const auto x = as2d(in);
    const auto out = output_size(in);
    double c = 1;
    for (size_t d = 0; d < 2; ++d) {
      const int64_t n = x.size(x.dim() - 2 + static_cast<int64_t>(d));
      const int64_t o = out[d];
      if (n % o == 0) c /= static_cast<double>(n / o);
      else if (n > o) c *= 2.0 / static_cast<double>(n / o);
      else c *= static_cast<double>((o + n - 1) / n + 1);
    }
    return std::sqrt(c);
  }
};

/// A parameter-free module without an analytic form, run through its forward; its VJP is
/// autograd's. It has no gain bound (1 here): its segment's ‖J‖ comes from power iterations.
struct ModuleOp : Base<ModuleOp> {
  AutogradModule call;
  void prepare(const torch::Tensor& in, OpTape& t) const {
    auto out = call.forward(in);
    call.check_deterministic(in, out);  // runs it twice, to refuse a random output
    t.out = out;
    t.grad = torch::Tensor();
  }
  torch::Tensor apply(const torch::Tensor& x, const OpTape&) const { return call.forward(x); }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const { return t.out = call.forward(in); }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const { return t.grad = call.vjp(g, in); }
};

}  // namespace ops

/// An op between two layers: one of the structs above, with its module and place.
struct Op {
  using Fn = std::variant<ops::Identity, ops::Flatten, ops::Activation, ops::Softmax, ops::LogSoftmax, BatchNorm,
                          ops::LayerNorm, ops::MaxPool, ops::AvgPool, ops::AdaptiveAvgPool, ops::ModuleOp>;
  Fn fn;
  std::shared_ptr<torch::nn::Module> module;
  size_t position = 0;  // in the Sequential

  template <class T>
  bool is() const { return std::holds_alternative<T>(fn); }
  template <class T>
  const T* as() const { return std::get_if<T>(&fn); }
  /// Whether the op has an analytic form (otherwise it is a module run through its forward).
  bool analytic() const { return !is<ops::ModuleOp>(); }

  /// Allocates the tape's buffers for input `in`.
  void prepare(const torch::Tensor& in, OpTape& t) const {
    std::visit([&](const auto& f) { f.prepare(in, t); }, fn);
  }
  /// a(x) as a function (allocates; autograd-capable; BatchNorm at the tape's frozen statistics).
  torch::Tensor apply(const torch::Tensor& x, const OpTape& t) const {
    return std::visit([&](const auto& f) { return f.apply(x, t); }, fn);
  }
  /// out = a(in) into the tape (a view of `in` for Flatten, `in` itself for Identity).
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    return std::visit([&](const auto& f) { return f.forward(in, t); }, fn);
  }
  /// The output the last `forward` left for input `in`, without running the op again.
  torch::Tensor output(const torch::Tensor& in, const OpTape& t) const {
    if (is<ops::Identity>()) return in;
    if (const auto* f = as<ops::Flatten>()) return in.flatten(f->start, f->end);
    return t.out;
  }
  /// (∂a/∂in)ᵀ·g at `in`, after `forward(in, t)`: into the tape, or a view.
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    return std::visit([&](const auto& f) { return f.vjp(g, in, t); }, fn);
  }
  double gain(const torch::Tensor& in) const {
    return std::visit([&](const auto& f) { return f.gain(in); }, fn);
  }
  /// The norms' part of the bound, a 0-dim tensor (undefined for the other ops).
  torch::Tensor norm_gain(const OpTape& t) const {
    return std::visit([&](const auto& f) { return f.norm_gain(t); }, fn);
  }
  /// The gradients of a norm's weight and bias for `g` at its output, appended in module order.
  void parameter_gradients(const torch::Tensor& g, const torch::Tensor& in, const OpTape& t,
                           std::vector<torch::Tensor>& out) const {
    std::visit([&](const auto& f) { f.parameter_gradients(g, in, t, out); }, fn);
  }
  /// Whether the op has learned parameters of its own (a norm's affine map).
  bool has_parameters() const {
    if (const auto* n = as<ops::LayerNorm>()) return n->weight.defined() || n->bias.defined();
    if (const auto* n = as<BatchNorm>()) return n->weight.defined() || n->bias.defined();
    return false;
  }
};

}  // namespace mep
