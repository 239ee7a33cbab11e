#pragma once
/// \file chain.hpp
/// A `torch::nn::Sequential` read as a chain of segments (ep/segment.hpp):
///
///   x ─a₀→ f₁ → s₁ ─a₁→ f₂ → s₂ … ─a_{L−1}→ f_L → s_L ─post→ ŷ
///
/// Every module that can sit in a Sequential has its place:
///   layers f_i with an analytic form   Linear, Conv1d, Conv2d
///   ops a_i with an analytic form      activations (ReLU, LeakyReLU, Sigmoid, Tanh, GELU, SiLU, ELU,
///                                      Softplus, Softmax, LogSoftmax), norms (LayerNorm, BatchNorm1d/2d),
///                                      pooling (Max/Avg 1d/2d, adaptive average), Flatten, Dropout
///                                      (1d/2d/3d, alpha, feature-alpha) and Identity
///   any other parameter-free module    an op run through its forward (autograd_module.hpp)
///   any other module with parameters   a layer run through its forward: its output is a state
/// What EP cannot run is a ChainError naming the module and its position, when the chain is
/// read: a module whose forward() does not take one tensor, or returns a tuple (RNN, LSTM,
/// GRU, LSTMCell); an Embedding after a state (it reads indices); a module with parameters at
/// two positions, or two modules sharing a parameter (each position has its own state); a
/// model without a layer. LibTorch has no forward hooks, so this is how EP sees the states.
/// The chain is structure only: the per-step values (states, errors, frozen BatchNorm
/// statistics) live in the workspace (ep/workspace.hpp). This file is the one place that
/// maps module types to layers and ops.

#include <mep/ep/chain_error.hpp>
#include <mep/ep/segment.hpp>

#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace mep {

/// How the chain reads modules: the one place that maps module types to layers and ops.
namespace chain_reading {
/// The argument with which the chain asks a module's forward() what it takes, without running it.
struct ArityProbe {};

inline Segment layer_of(LayerKind kind, const std::shared_ptr<torch::nn::Module>& m, const torch::Tensor& weight,
                        const torch::Tensor& bias) {
  Segment seg;
  seg.kind = kind, seg.module = m, seg.weight = weight, seg.bias = bias;
  return seg;
}

// Reads stride/padding/dilation/groups; `visit` is found by ADL for c10::variant (1.13)
// and std::variant (2.x) alike.
template <class Options>
void set_conv(Segment& seg, const Options& o) {
  using Array = std::decay_t<decltype(o.kernel_size())>;
  seg.stride = at::IntArrayRef(*o.stride()).vec();
  seg.dilation = at::IntArrayRef(*o.dilation()).vec();
  seg.groups = o.groups();
  bool explicit_padding = false, zeros_mode = false;
  visit(
      [&](const auto& p) {
        if constexpr (std::is_same_v<std::decay_t<decltype(p)>, Array>) {
          seg.padding = at::IntArrayRef(*p).vec();
          explicit_padding = true;
        }
      },
      o.padding());
  visit([&](const auto& m) { zeros_mode = std::is_same_v<std::decay_t<decltype(m)>, torch::enumtype::kZeros>; },
        o.padding_mode());
  seg.zero_padding = explicit_padding && zeros_mode;
}

// The layer with an analytic form a module makes (Linear, Conv1d, Conv2d); nothing otherwise.
inline std::optional<Segment> read_layer(const std::shared_ptr<torch::nn::Module>& m) {
  if (auto lin = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m))
    return layer_of(LayerKind::Linear, m, lin->weight, lin->bias);
  if (auto c1 = std::dynamic_pointer_cast<torch::nn::Conv1dImpl>(m)) {
    Segment seg = layer_of(LayerKind::Conv1d, m, c1->weight, c1->bias);
    set_conv(seg, c1->options);
    return seg;
  }
  if (auto c2 = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m)) {
    Segment seg = layer_of(LayerKind::Conv2d, m, c2->weight, c2->bias);
    set_conv(seg, c2->options);
    return seg;
  }
  return std::nullopt;
}

template <class Pool, class O>
Pool pool(int64_t dims, const O& o) {
  Pool p;
  auto widen = [&](std::vector<int64_t> v, int64_t fill) {  // 1-D pooling runs as [1, k] 2-D pooling
    if (dims == 1) v.insert(v.begin(), fill);
    return v;
  };
  p.dims = dims;
  p.kernel = widen(at::IntArrayRef(*o.kernel_size()).vec(), 1);
  p.stride = widen(at::IntArrayRef(*o.stride()).vec(), 1);
  p.padding = widen(at::IntArrayRef(*o.padding()).vec(), 0);
  p.ceil_mode = o.ceil_mode();
  return p;
}

inline AutogradModule autograd_module(const torch::nn::AnyModule& any, size_t position) {
  AutogradModule a;
  a.any = any;
  a.module = any.ptr();
  a.name = a.module->name();
  a.position = position;
  a.stateful = !a.module->buffers().empty();
  return a;
}

// The op a parameter-free module or known norm makes; nothing for a layer with parameters.
inline std::optional<Op> read_op(const torch::nn::AnyModule& any, size_t position) {
  namespace nn = torch::nn;
  const auto m = any.ptr();
  auto op = [&](Op::Fn fn) { return std::optional<Op>(Op{std::move(fn), m, position}); };
  using Fn = ops::Activation::Fn;
  auto activation = [&](Fn fn, double a = 0, double b = 0) { return op(ops::Activation{{}, fn, a, b}); };
  if (std::dynamic_pointer_cast<nn::ReLUImpl>(m)) return activation(Fn::ReLU);
  if (auto r = std::dynamic_pointer_cast<nn::LeakyReLUImpl>(m)) return activation(Fn::LeakyReLU, r->options.negative_slope());
  if (std::dynamic_pointer_cast<nn::SigmoidImpl>(m)) return activation(Fn::Sigmoid);
  if (std::dynamic_pointer_cast<nn::TanhImpl>(m)) return activation(Fn::Tanh);
  if (auto g = std::dynamic_pointer_cast<nn::GELUImpl>(m))
    return activation(g->options.approximate() == "tanh" ? Fn::GELUTanh : Fn::GELU);
  if (std::dynamic_pointer_cast<nn::SiLUImpl>(m)) return activation(Fn::SiLU);
  if (auto e = std::dynamic_pointer_cast<nn::ELUImpl>(m)) return activation(Fn::ELU, e->options.alpha());
  if (auto s = std::dynamic_pointer_cast<nn::SoftplusImpl>(m))
    return activation(Fn::Softplus, s->options.beta(), s->options.threshold());
  if (auto s = std::dynamic_pointer_cast<nn::SoftmaxImpl>(m)) return op(ops::Softmax{{}, s->options.dim()});
  if (auto s = std::dynamic_pointer_cast<nn::LogSoftmaxImpl>(m)) return op(ops::LogSoftmax{{}, s->options.dim()});
  if (auto f = std::dynamic_pointer_cast<nn::FlattenImpl>(m))
    return op(ops::Flatten{{}, f->options.start_dim(), f->options.end_dim()});
  if (std::dynamic_pointer_cast<nn::DropoutImpl>(m) || std::dynamic_pointer_cast<nn::Dropout2dImpl>(m) ||
      std::dynamic_pointer_cast<nn::Dropout3dImpl>(m) || std::dynamic_pointer_cast<nn::AlphaDropoutImpl>(m) ||
      std::dynamic_pointer_cast<nn::FeatureAlphaDropoutImpl>(m) || std::dynamic_pointer_cast<nn::IdentityImpl>(m))
    return op(ops::Identity{});
  if (auto ln = std::dynamic_pointer_cast<nn::LayerNormImpl>(m))
    return op(ops::LayerNorm{{}, ln->options.normalized_shape(), ln->options.eps(), ln->weight, ln->bias});
  if (auto bn = BatchNorm::from(m)) return op(std::move(*bn));
  if (auto p = std::dynamic_pointer_cast<nn::MaxPool1dImpl>(m)) {
    auto pool_op = pool<ops::MaxPool>(1, p->options);
    pool_op.dilation = {1, (*p->options.dilation())[0]};
    return op(std::move(pool_op));
  }
  if (auto p = std::dynamic_pointer_cast<nn::MaxPool2dImpl>(m)) {
    auto pool_op = pool<ops::MaxPool>(2, p->options);
    pool_op.dilation = at::IntArrayRef(*p->options.dilation()).vec();
    return op(std::move(pool_op));
  }
  if (auto p = std::dynamic_pointer_cast<nn::AvgPool1dImpl>(m)) {
    auto pool_op = pool<ops::AvgPool>(1, p->options);
    pool_op.count_include_pad = p->options.count_include_pad();
    return op(std::move(pool_op));
  }
  if (auto p = std::dynamic_pointer_cast<nn::AvgPool2dImpl>(m)) {
    auto pool_op = pool<ops::AvgPool>(2, p->options);
    pool_op.count_include_pad = p->options.count_include_pad();
    pool_op.divisor = p->options.divisor_override();
    return op(std::move(pool_op));
  }
  if (auto p = std::dynamic_pointer_cast<nn::AdaptiveAvgPool1dImpl>(m)) {
    ops::AdaptiveAvgPool pool_op;
    pool_op.dims = 1, pool_op.size = {(*p->options.output_size())[0]};
    return op(std::move(pool_op));
  }
  if (auto p = std::dynamic_pointer_cast<nn::AdaptiveAvgPool2dImpl>(m)) {
    ops::AdaptiveAvgPool pool_op;
    for (const auto& v : *p->options.output_size()) pool_op.size.push_back(v.has_value() ? *v : -1);
    return op(std::move(pool_op));
  }
  if (!m->parameters().empty()) return std::nullopt;
  return op(ops::ModuleOp{{}, autograd_module(any, position)});
}

// What the chain can refuse before any input: tuples, indices after a state, a module or
// parameter at two positions.
inline void check_placement(const torch::nn::Module& m, size_t position, bool after_state,
                            std::unordered_map<const torch::nn::Module*, size_t>& placed,
                            std::unordered_map<const c10::TensorImpl*, size_t>& owner) {
  namespace nn = torch::nn;
  std::ostringstream os;
  os << "mep: " << m.name() << " at position " << position << " of the Sequential ";
  if (dynamic_cast<const nn::RNNImpl*>(&m) || dynamic_cast<const nn::LSTMImpl*>(&m) ||
      dynamic_cast<const nn::GRUImpl*>(&m) || dynamic_cast<const nn::LSTMCellImpl*>(&m)) {
    os << "returns a tuple (its output and its state); EP needs a module that maps one tensor to one tensor";
    throw ChainError(os.str());
  }
  if (after_state && (dynamic_cast<const nn::EmbeddingImpl*>(&m) || dynamic_cast<const nn::EmbeddingBagImpl*>(&m))) {
    os << "reads integer indices, but its input here is a state of the layers before it; it can only come "
          "before every layer";
    throw ChainError(os.str());
  }
  const auto params = m.parameters();
  if (params.empty()) return;
  auto [it, fresh] = placed.emplace(&m, position);
  if (!fresh) {
    os << "is the module at position " << it->second << " again; EP gives every position its own state, so a "
       << "module with parameters can appear only once";
    throw ChainError(os.str());
  }
  for (const auto& p : params) {
    auto [at, first] = owner.emplace(p.unsafeGetTensorImpl(), position);
    if (!first) {
      os << "shares a parameter with the module at position " << at->second
         << "; EP gives every position its own state and parameters";
      throw ChainError(os.str());
    }
  }
}

// Asks the forward() of a module EP runs through autograd what it takes, without running
// it: AnyModule checks the number of arguments, then their types, before the call.
inline void probe(const torch::nn::AnyModule& module, size_t position) {
  torch::nn::AnyModule any = module;
  const auto m = any.ptr();
  if (read_layer(m)) return;
  if (auto op = read_op(module, position); op && op->analytic()) return;
  std::string message;
  try {
    any.any_forward(ArityProbe{});
    return;
  } catch (const c10::Error& e) {
    message = e.what_without_backtrace();
  }
  const bool one_argument = message.find("ArityProbe") != std::string::npos;
  if (one_argument && message.find("Tensor") != std::string::npos) return;
  std::ostringstream os;
  os << "mep: " << m->name() << " at position " << position << " of the Sequential cannot run in a chain: "
     << (one_argument ? "its forward() does not take a tensor" : "its forward() does not take one tensor")
     << " (" << message << ")";
  throw ChainError(os.str());
}
}  // namespace chain_reading

/// The chain read from a Sequential; holds the modules (shared), so the model's parameters
/// are the chain's.
struct Chain {
  std::vector<Segment> segments;
  std::vector<Op> post;  // ops after the last layer: ŷ = post(s_L)
  std::vector<std::shared_ptr<torch::nn::Module>> autograd_modules;  // the modules run through their forward

  /// Reads `model`; throws ChainError for a module EP cannot run or a model without layers.
  static Chain from(const torch::nn::Sequential& model) {
    if (model.is_empty()) throw ChainError("mep: the model is null");
    Chain chain;
    std::vector<Op> pending;
    std::unordered_map<const torch::nn::Module*, size_t> placed;  // modules with parameters → position
    std::unordered_map<const c10::TensorImpl*, size_t> owner;     // parameters → position
    size_t position = 0;
    for (auto it = model->begin(); it != model->end(); ++it, ++position) {
      const torch::nn::AnyModule& any = *it;
      const auto m = any.ptr();
      chain_reading::check_placement(*m, position, !chain.segments.empty(), placed, owner);
      std::optional<Segment> layer = chain_reading::read_layer(m);
      if (!layer) {
        if (auto op = chain_reading::read_op(any, position)) {
          pending.push_back(std::move(*op));
          continue;
        }
        layer = chain_reading::layer_of(LayerKind::Module, m, {}, {});
        layer->block = chain_reading::autograd_module(any, position);
      }
      Segment& seg = *layer;
      seg.position = position;
      seg.pre = std::move(pending);
      pending.clear();
      chain.segments.push_back(std::move(seg));
    }
    if (chain.segments.empty())
      throw ChainError(
          "mep: the model has no layer for EP to settle (a Linear, Conv1d, Conv2d or another module with parameters)");
    chain.post = std::move(pending);
    for (const auto& seg : chain.segments) {
      for (const auto& op : seg.pre)
        if (!op.analytic()) chain.autograd_modules.push_back(op.module);
      if (seg.kind == LayerKind::Module) chain.autograd_modules.push_back(seg.module);
    }
    for (const auto& op : chain.post)
      if (!op.analytic()) chain.autograd_modules.push_back(op.module);
    // Ops run through their forward are read last: a module is probed only once the chain is otherwise sound.
    position = 0;
    for (auto it = model->begin(); it != model->end(); ++it, ++position) chain_reading::probe(*it, position);
    return chain;
  }

  size_t size() const { return segments.size(); }

  /// The weight of the layer that maps the input (a spectral constraint may leave it free):
  /// the first module with a parameter of two or more dims, ops and norms aside — a Linear's
  /// or Conv's weight, or a user block's first matrix; null when there is none.
  static c10::TensorImpl* input_layer_weight(const torch::nn::Sequential& model) {
    size_t position = 0;
    for (auto it = model->begin(); it != model->end(); ++it, ++position) {
      const auto m = it->ptr();
      if (auto layer = chain_reading::read_layer(m)) return layer->weight.unsafeGetTensorImpl();
      if (chain_reading::read_op(*it, position)) continue;
      for (const auto& p : m->parameters())
        if (p.dim() >= 2) return p.unsafeGetTensorImpl();
    }
    return nullptr;
  }

  /// Parameters in the model's order: each segment's ops (norms), its layer, then `post`.
  std::vector<torch::Tensor> parameters() const {
    std::vector<torch::Tensor> out;
    auto add = [&](const std::shared_ptr<torch::nn::Module>& m) {
      for (const auto& p : m->parameters()) out.push_back(p);
    };
    for (const auto& seg : segments) {
      for (const auto& op : seg.pre) add(op.module);
      add(seg.module);
    }
    for (const auto& op : post) add(op.module);
    return out;
  }

};

}  // namespace mep
