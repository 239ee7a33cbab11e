#pragma once
/// \file chain.hpp
/// A `torch::nn::Sequential` read as a chain of segments (SPEC §1, segment.hpp):
///
///   x ─a₀→ f₁ → s₁ ─a₁→ f₂ → s₂ … ─a_{L−1}→ f_L → s_L ─post→ ŷ
///
/// Layers f_i are Linear, Conv1d, Conv2d; the ops a_i between them are activations (ReLU,
/// LeakyReLU, Sigmoid, Tanh, GELU, SiLU, ELU, Softplus, Softmax), norms (LayerNorm,
/// BatchNorm1d/2d), pooling (Max/Avg 1d/2d, adaptive average), Flatten and Dropout.
/// Any other module is a ChainError naming its type and position. LibTorch has no forward
/// hooks, so this is how EP sees the states. The chain is structure only: the per-step
/// values (states, errors, frozen BatchNorm statistics) live in the engine's workspace.

#include <mep/segment.hpp>

#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mep {

/// Thrown for a model EP cannot read (unsupported module, no layer).
class ChainError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// The chain read from a Sequential; holds the modules (shared), so the model's parameters
/// are the chain's.
struct Chain {
  std::vector<Segment> segments;
  std::vector<Op> post;  // ops after the last layer: ŷ = post(s_L)

  /// Reads `model`; throws ChainError for an unsupported module or a model without layers.
  static Chain from(const torch::nn::Sequential& model) {
    if (model.is_empty()) throw ChainError("mep: the model is null");
    Chain chain;
    std::vector<Op> pending;
    size_t position = 0;
    for (const auto& named : model->named_children()) {
      const auto& m = named.value();
      Segment seg;
      seg.module = m;
      if (auto lin = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
        seg.kind = LayerKind::Linear, seg.weight = lin->weight, seg.bias = lin->bias;
      } else if (auto c1 = std::dynamic_pointer_cast<torch::nn::Conv1dImpl>(m)) {
        seg.kind = LayerKind::Conv1d, seg.weight = c1->weight, seg.bias = c1->bias;
        set_conv(seg, c1->options);
      } else if (auto c2 = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m)) {
        seg.kind = LayerKind::Conv2d, seg.weight = c2->weight, seg.bias = c2->bias;
        set_conv(seg, c2->options);
      } else {
        pending.push_back(read_op(m, position++));
        continue;
      }
      seg.pre = std::move(pending);
      pending.clear();
      chain.segments.push_back(std::move(seg));
      ++position;
    }
    if (chain.segments.empty())
      throw ChainError("mep: the model has no Linear, Conv1d or Conv2d layer for EP to settle");
    chain.post = std::move(pending);
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

  static Op read_op(const std::shared_ptr<torch::nn::Module>& m, size_t position) {
    namespace nn = torch::nn;
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
    if (std::dynamic_pointer_cast<nn::DropoutImpl>(m) || std::dynamic_pointer_cast<nn::Dropout2dImpl>(m)) {
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
    std::ostringstream os;
    os << "mep: unsupported module " << m->name() << " at position " << position
       << " of the Sequential (EP supports Linear, Conv1d, Conv2d, activations, LayerNorm, BatchNorm1d/2d, "
          "pooling, Flatten and Dropout)";
    throw ChainError(os.str());
  }
};

}  // namespace mep
