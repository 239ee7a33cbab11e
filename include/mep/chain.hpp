#pragma once
/// \file chain.hpp
/// A `torch::nn::Sequential` read as a chain of segments (SPEC §1, segment.hpp):
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
/// statistics) live in the engine's workspace.

#include <mep/chain_error.hpp>
#include <mep/segment.hpp>

#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace mep {

namespace detail {
/// The argument with which the chain asks a module's forward() what it takes, without running it.
struct ArityProbe {};
}  // namespace detail

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
      check_placement(*m, position, !chain.segments.empty(), placed, owner);
      Segment seg;
      seg.module = m;
      seg.position = position;
      if (auto lin = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
        seg.kind = LayerKind::Linear, seg.weight = lin->weight, seg.bias = lin->bias;
      } else if (auto c1 = std::dynamic_pointer_cast<torch::nn::Conv1dImpl>(m)) {
        seg.kind = LayerKind::Conv1d, seg.weight = c1->weight, seg.bias = c1->bias;
        set_conv(seg, c1->options);
      } else if (auto c2 = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m)) {
        seg.kind = LayerKind::Conv2d, seg.weight = c2->weight, seg.bias = c2->bias;
        set_conv(seg, c2->options);
      } else if (auto op = read_op(any, position)) {
        op->position = position;
        pending.push_back(std::move(*op));
        continue;
      } else {
        seg.kind = LayerKind::Module;
        seg.block = autograd_module(any, position);
      }
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
        if (op.kind == OpKind::Module) chain.autograd_modules.push_back(op.module);
      if (seg.kind == LayerKind::Module) chain.autograd_modules.push_back(seg.module);
    }
    for (const auto& op : chain.post)
      if (op.kind == OpKind::Module) chain.autograd_modules.push_back(op.module);
    // Ops run through their forward are read last: a module is probed only once the chain is otherwise sound.
    position = 0;
    for (auto it = model->begin(); it != model->end(); ++it, ++position) probe(*it, position);
    return chain;
  }

  size_t size() const { return segments.size(); }

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

 private:
  // Reads stride/padding/dilation/groups; `visit` is found by ADL for c10::variant (1.13)
  // and std::variant (2.x) alike.
  template <class Options>
  static void set_conv(Segment& seg, const Options& o) {
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

  template <class O>
  static void set_pool(Op& op, OpKind kind, int64_t dims, const O& o) {
    op.kind = kind, op.pool_dims = dims;
    auto widen = [&](std::vector<int64_t> v, int64_t fill) {  // 1-D pooling runs as [1, k] 2-D pooling
      if (dims == 1) v.insert(v.begin(), fill);
      return v;
    };
    op.kernel = widen(at::IntArrayRef(*o.kernel_size()).vec(), 1);
    op.stride = widen(at::IntArrayRef(*o.stride()).vec(), 1);
    op.padding = widen(at::IntArrayRef(*o.padding()).vec(), 0);
    op.ceil_mode = o.ceil_mode();
  }

  // The op a parameter-free module or known norm makes; nothing for a layer with parameters.
  static std::optional<Op> read_op(const torch::nn::AnyModule& any, size_t position) {
    namespace nn = torch::nn;
    const auto m = any.ptr();
    Op op;
    op.module = m;
    auto activation = [&](Activation a, double p1 = 0, double p2 = 0) {
      op.kind = OpKind::Activation, op.act = a, op.a = p1, op.b = p2;
      return op;
    };
    if (std::dynamic_pointer_cast<nn::ReLUImpl>(m)) return activation(Activation::ReLU);
    if (auto r = std::dynamic_pointer_cast<nn::LeakyReLUImpl>(m)) return activation(Activation::LeakyReLU, r->options.negative_slope());
    if (std::dynamic_pointer_cast<nn::SigmoidImpl>(m)) return activation(Activation::Sigmoid);
    if (std::dynamic_pointer_cast<nn::TanhImpl>(m)) return activation(Activation::Tanh);
    if (auto g = std::dynamic_pointer_cast<nn::GELUImpl>(m))
      return activation(g->options.approximate() == "tanh" ? Activation::GELUTanh : Activation::GELU);
    if (std::dynamic_pointer_cast<nn::SiLUImpl>(m)) return activation(Activation::SiLU);
    if (auto e = std::dynamic_pointer_cast<nn::ELUImpl>(m)) return activation(Activation::ELU, e->options.alpha());
    if (auto s = std::dynamic_pointer_cast<nn::SoftplusImpl>(m))
      return activation(Activation::Softplus, s->options.beta(), s->options.threshold());
    if (auto s = std::dynamic_pointer_cast<nn::SoftmaxImpl>(m)) {
      op.kind = OpKind::Softmax, op.start_dim = s->options.dim();
      return op;
    }
    if (auto f = std::dynamic_pointer_cast<nn::FlattenImpl>(m)) {
      op.kind = OpKind::Flatten, op.start_dim = f->options.start_dim(), op.end_dim = f->options.end_dim();
      return op;
    }
    if (std::dynamic_pointer_cast<nn::DropoutImpl>(m) || std::dynamic_pointer_cast<nn::Dropout2dImpl>(m) ||
        std::dynamic_pointer_cast<nn::Dropout3dImpl>(m) || std::dynamic_pointer_cast<nn::AlphaDropoutImpl>(m) ||
        std::dynamic_pointer_cast<nn::FeatureAlphaDropoutImpl>(m) || std::dynamic_pointer_cast<nn::IdentityImpl>(m)) {
      op.kind = OpKind::Dropout;
      return op;
    }
    if (auto ln = std::dynamic_pointer_cast<nn::LayerNormImpl>(m)) {
      op.kind = OpKind::LayerNorm, op.normalized_shape = ln->options.normalized_shape(), op.norm_eps = ln->options.eps();
      op.weight = ln->weight, op.bias = ln->bias;
      return op;
    }
    auto batch_norm = [&](auto& bn) {
      op.kind = OpKind::BatchNorm, op.norm_eps = bn.options.eps(), op.weight = bn.weight, op.bias = bn.bias;
      return op;
    };
    if (auto bn = std::dynamic_pointer_cast<nn::BatchNorm1dImpl>(m)) return batch_norm(*bn);
    if (auto bn = std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(m)) return batch_norm(*bn);
    if (auto p = std::dynamic_pointer_cast<nn::MaxPool1dImpl>(m)) {
      set_pool(op, OpKind::MaxPool, 1, p->options);
      op.dilation = {1, (*p->options.dilation())[0]};
      return op;
    }
    if (auto p = std::dynamic_pointer_cast<nn::MaxPool2dImpl>(m)) {
      set_pool(op, OpKind::MaxPool, 2, p->options);
      op.dilation = at::IntArrayRef(*p->options.dilation()).vec();
      return op;
    }
    auto avg = [&](auto& p, int64_t dims) {
      set_pool(op, OpKind::AvgPool, dims, p.options);
      op.count_include_pad = p.options.count_include_pad();
      return op;
    };
    if (auto p = std::dynamic_pointer_cast<nn::AvgPool1dImpl>(m)) return avg(*p, 1);
    if (auto p = std::dynamic_pointer_cast<nn::AvgPool2dImpl>(m)) {
      avg(*p, 2);
      op.divisor = p->options.divisor_override();
      return op;
    }
    if (auto p = std::dynamic_pointer_cast<nn::AdaptiveAvgPool1dImpl>(m)) {
      op.kind = OpKind::AdaptiveAvgPool, op.pool_dims = 1, op.output_size = {(*p->options.output_size())[0]};
      return op;
    }
    if (auto p = std::dynamic_pointer_cast<nn::AdaptiveAvgPool2dImpl>(m)) {
      op.kind = OpKind::AdaptiveAvgPool, op.pool_dims = 2;
      for (const auto& v : *p->options.output_size()) op.output_size.push_back(v.has_value() ? *v : -1);
      return op;
    }
    if (auto s = std::dynamic_pointer_cast<nn::LogSoftmaxImpl>(m)) {
      op.kind = OpKind::LogSoftmax, op.start_dim = s->options.dim();
      return op;
    }
    if (!m->parameters().empty()) return std::nullopt;
    op.kind = OpKind::Module;
    op.call = autograd_module(any, position);
    return op;
  }

  static AutogradModule autograd_module(const torch::nn::AnyModule& any, size_t position) {
    AutogradModule a;
    a.any = any;
    a.module = any.ptr();
    a.name = a.module->name();
    a.position = position;
    a.stateful = !a.module->buffers().empty();
    return a;
  }

  // What the chain can refuse before any input: tuples, indices after a state, a module or
  // parameter at two positions.
  static void check_placement(const torch::nn::Module& m, size_t position, bool after_state,
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
  static void probe(const torch::nn::AnyModule& module, size_t position) {
    torch::nn::AnyModule any = module;
    const auto m = any.ptr();
    if (dynamic_cast<const torch::nn::LinearImpl*>(m.get()) || dynamic_cast<const torch::nn::Conv1dImpl*>(m.get()) ||
        dynamic_cast<const torch::nn::Conv2dImpl*>(m.get()))
      return;
    if (auto op = read_op(module, position); op && op->kind != OpKind::Module) return;
    std::string message;
    try {
      any.any_forward(detail::ArityProbe{});
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
};

}  // namespace mep
