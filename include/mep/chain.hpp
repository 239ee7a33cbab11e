#pragma once
/// \file chain.hpp
/// A `torch::nn::Sequential` read as a chain (SPEC §1):
///
///   x ─a₀→ f₁ → s₁ ─a₁→ f₂ → s₂ … ─a_{L−1}→ f_L → s_L ─post→ ŷ
///
/// Layers f_i are Linear, Conv1d, Conv2d; the ops a_i between them are activations (ReLU,
/// LeakyReLU, Sigmoid, Tanh, GELU, SiLU, ELU, Softplus, Softmax), norms (LayerNorm,
/// BatchNorm1d/2d), pooling (Max/Avg 1d/2d, adaptive average), Flatten and Dropout.
/// Dropout is the identity everywhere in EP. Any other module is a ChainError naming its
/// type and position. LibTorch has no forward hooks, so this is how EP sees the states.
///
/// BatchNorm couples the samples of a batch; in EP it normalises with statistics frozen at
/// the feedforward pass of the step (the batch's in train mode, the running ones in eval
/// mode), so that settling stays per-sample. Running statistics are updated once per step.

#include <torch/torch.h>

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

enum class OpKind { Activation, Flatten, Dropout, Norm, Pool, Softmax };
enum class Activation { ReLU, LeakyReLU, Sigmoid, Tanh, GELU, GELUTanh, SiLU, ELU, Softplus };

/// A parameter-free or normalising op between two layers.
struct Op {
  OpKind kind;
  size_t position;  // index in the Sequential
  std::string type;
  std::shared_ptr<torch::nn::Module> module;
  Activation act = Activation::ReLU;
  double a = 0, b = 0;  // activation parameters: slope, alpha, (beta, threshold)
  int64_t start_dim = 1, end_dim = -1;  // Flatten
  // BatchNorm statistics frozen for the current step, and the number of values per
  // channel they came from when the running statistics still have to take them in.
  torch::Tensor frozen_mean, frozen_var;
  int64_t pending_count = 0;

  /// Pointwise in the sense of the analytic settling path: elementwise maps and reshapes.
  bool pointwise() const { return kind == OpKind::Activation || kind == OpKind::Flatten || kind == OpKind::Dropout; }

  torch::Tensor forward(const torch::Tensor& x) const {
    namespace F = torch::nn::functional;
    switch (kind) {
      case OpKind::Dropout: return x;
      case OpKind::Flatten: return x.flatten(start_dim, end_dim);
      case OpKind::Activation: return activate(x);
      case OpKind::Norm:
        if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(module)) return batch_norm(x, *bn);
        if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(module)) return batch_norm(x, *bn);
        return module->as<torch::nn::LayerNorm>()->forward(x);
      case OpKind::Pool:
      case OpKind::Softmax: break;
    }
    if (auto m = std::dynamic_pointer_cast<torch::nn::MaxPool1dImpl>(module)) return m->forward(x);
    if (auto m = std::dynamic_pointer_cast<torch::nn::MaxPool2dImpl>(module)) return m->forward(x);
    if (auto m = std::dynamic_pointer_cast<torch::nn::AvgPool1dImpl>(module)) return m->forward(x);
    if (auto m = std::dynamic_pointer_cast<torch::nn::AvgPool2dImpl>(module)) return m->forward(x);
    if (auto m = std::dynamic_pointer_cast<torch::nn::AdaptiveAvgPool1dImpl>(module)) return m->forward(x);
    if (auto m = std::dynamic_pointer_cast<torch::nn::AdaptiveAvgPool2dImpl>(module)) return m->forward(x);
    return module->as<torch::nn::Softmax>()->forward(x);
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

  /// The derivative a'(s) of an activation, elementwise (`out` = a(s), reused where it helps).
  torch::Tensor derivative(const torch::Tensor& s, const torch::Tensor& out) const {
    switch (act) {
      case Activation::ReLU: return (s > 0).to(s.scalar_type());
      case Activation::LeakyReLU: return torch::where(s > 0, torch::ones_like(s), torch::full_like(s, a));
      case Activation::Sigmoid: return out * (1 - out);
      case Activation::Tanh: return 1 - out * out;
      case Activation::GELU: {
        auto cdf = 0.5 * (1 + torch::erf(s * M_SQRT1_2));
        auto pdf = torch::exp(-0.5 * s * s) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
        return cdf + s * pdf;
      }
      case Activation::GELUTanh: {
        const double k = std::sqrt(2.0 / M_PI);
        auto inner = k * (s + 0.044715 * s.pow(3));
        auto t = torch::tanh(inner);
        return 0.5 * (1 + t) + 0.5 * s * (1 - t * t) * k * (1 + 3 * 0.044715 * s * s);
      }
      case Activation::SiLU: {
        auto sg = torch::sigmoid(s);
        return sg * (1 + s * (1 - sg));
      }
      case Activation::ELU: return torch::where(s > 0, torch::ones_like(s), out + a);
      case Activation::Softplus: {
        auto bs = s * a;
        return torch::where(bs > b, torch::ones_like(s), torch::sigmoid(bs));
      }
    }
    return torch::ones_like(s);
  }

 private:
  template <class BN>
  torch::Tensor batch_norm(const torch::Tensor& x, BN& bn) const {
    auto mean = frozen_mean.defined() ? frozen_mean : bn.running_mean;
    auto var = frozen_var.defined() ? frozen_var : bn.running_var;
    return torch::batch_norm(x, bn.weight, bn.bias, mean, var, /*training=*/false, 0.0, bn.options.eps(),
                             /*cudnn_enabled=*/false);
  }
};

enum class LayerKind { Linear, Conv1d, Conv2d };

/// A state-producing layer f_i and the ops a_{i−1} that feed it.
struct Layer {
  LayerKind kind;
  size_t position;
  std::string type;
  std::shared_ptr<torch::nn::Module> module;
  torch::Tensor weight, bias;  // bias may be undefined
  std::vector<Op> pre;         // a_{i−1}: ops between s_{i−1} (or x) and this layer
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  bool explicit_zero_padding = true;  // conv: the analytic input VJP applies

  /// The analytic settling path applies to the segment s_{i−1} → f_i: pointwise ops and a
  /// layer whose input VJP we compute without autograd.
  bool analytic() const {
    for (const auto& op : pre)
      if (!op.pointwise()) return false;
    return kind == LayerKind::Linear || explicit_zero_padding;
  }

  torch::Tensor forward(const torch::Tensor& in) const {
    switch (kind) {
      case LayerKind::Linear:
        return bias.defined() && in.dim() == 2 ? torch::addmm(bias, in, weight.t()) : torch::linear(in, weight, bias);
      case LayerKind::Conv1d:
        if (explicit_zero_padding) return torch::conv1d(in, weight, bias, stride, padding, dilation, groups);
        return module->as<torch::nn::Conv1d>()->forward(in);
      case LayerKind::Conv2d:
        if (explicit_zero_padding) return torch::conv2d(in, weight, bias, stride, padding, dilation, groups);
        return module->as<torch::nn::Conv2d>()->forward(in);
    }
    return in;
  }

  /// (∂f/∂in)ᵀ·grad_out for the layer alone (f is affine in its input).
  torch::Tensor input_vjp(const torch::Tensor& grad_out, const torch::Tensor& in) const {
    if (kind == LayerKind::Linear) return grad_out.dim() == 2 ? torch::mm(grad_out, weight) : torch::matmul(grad_out, weight);
    return std::get<0>(at::convolution_backward(grad_out, in, weight, c10::nullopt, stride, padding, dilation,
                                                /*transposed=*/false, std::vector<int64_t>(stride.size(), 0), groups,
                                                {true, false, false}));
  }

  /// Parameters of the layer and of its pre-ops (norms), in the model's order.
  std::vector<torch::Tensor> parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& op : pre)
      for (const auto& p : op.module->parameters()) out.push_back(p);
    for (const auto& p : module->parameters()) out.push_back(p);
    return out;
  }
};

/// The chain read from a Sequential; holds the modules (shared), so the model's parameters
/// are the chain's.
struct Chain {
  std::vector<Layer> layers;
  std::vector<Op> post;  // ops after the last layer: ŷ = post(s_L)

  /// Reads `model`; throws ChainError for an unsupported module or a model without layers.
  static Chain from(const torch::nn::Sequential& model) {
    if (model.is_empty()) throw ChainError("mep: the model is null");
    Chain chain;
    std::vector<Op> pending;
    size_t position = 0;
    for (const auto& named : model->named_children()) {
      const auto& m = named.value();
      Op op{OpKind::Dropout, position, m->name(), m};
      if (auto lin = std::dynamic_pointer_cast<torch::nn::LinearImpl>(m)) {
        chain.layers.push_back(make_layer(LayerKind::Linear, position, m, lin->weight, lin->bias, std::move(pending)));
        pending.clear();
      } else if (auto c1 = std::dynamic_pointer_cast<torch::nn::Conv1dImpl>(m)) {
        auto l = make_layer(LayerKind::Conv1d, position, m, c1->weight, c1->bias, std::move(pending));
        set_conv(l, c1->options);
        chain.layers.push_back(std::move(l));
        pending.clear();
      } else if (auto c2 = std::dynamic_pointer_cast<torch::nn::Conv2dImpl>(m)) {
        auto l = make_layer(LayerKind::Conv2d, position, m, c2->weight, c2->bias, std::move(pending));
        set_conv(l, c2->options);
        chain.layers.push_back(std::move(l));
        pending.clear();
      } else {
        read_op(op, m);
        pending.push_back(std::move(op));
      }
      ++position;
    }
    if (chain.layers.empty())
      throw ChainError("mep: the model has no Linear, Conv1d or Conv2d layer for EP to settle");
    chain.post = std::move(pending);
    return chain;
  }

  static torch::Tensor apply(const std::vector<Op>& ops, torch::Tensor x) {
    for (const auto& op : ops) x = op.forward(x);
    return x;
  }

  /// Feedforward states s_1..s_L (detached). With `freeze_norms`, BatchNorm statistics are
  /// frozen to this batch's (train mode) or the running ones (eval mode); the running
  /// statistics advance only at `commit_norm_statistics()`, once the step has succeeded.
  std::vector<torch::Tensor> feedforward(const torch::Tensor& x, bool freeze_norms = false) {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> states;
    torch::Tensor s = x;
    for (auto& layer : layers) {
      for (auto& op : layer.pre) {
        if (freeze_norms) freeze(op, s);
        s = op.forward(s);
      }
      s = layer.forward(s);
      states.push_back(s);
    }
    if (freeze_norms)
      for (auto& op : post) freeze(op, s), s = op.forward(s);
    return states;
  }

  /// Advances BatchNorm running statistics with the batch statistics frozen by the last
  /// `feedforward(x, true)` in train mode, as one forward pass of the model would.
  void commit_norm_statistics() {
    torch::NoGradGuard no_grad;
    auto commit = [](Op& op) {
      if (!op.pending_count) return;
      auto advance = [&](auto& bn) {
        const double mom = bn.options.momentum().value_or(0.1);
        const double n = static_cast<double>(op.pending_count);
        bn.running_mean.mul_(1 - mom).add_(op.frozen_mean, mom);
        bn.running_var.mul_(1 - mom).add_(op.frozen_var * (n / std::max(n - 1, 1.0)), mom);
        bn.num_batches_tracked.add_(1);
      };
      if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(op.module)) advance(*bn);
      if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(op.module)) advance(*bn);
      op.pending_count = 0;
    };
    for (auto& layer : layers)
      for (auto& op : layer.pre) commit(op);
    for (auto& op : post) commit(op);
  }

  std::vector<torch::Tensor> parameters() const {
    std::vector<torch::Tensor> out;
    for (const auto& l : layers)
      for (const auto& p : l.parameters()) out.push_back(p);
    for (const auto& op : post)
      for (const auto& p : op.module->parameters()) out.push_back(p);
    return out;
  }

 private:
  static Layer make_layer(LayerKind kind, size_t position, const std::shared_ptr<torch::nn::Module>& m,
                          const torch::Tensor& w, const torch::Tensor& b, std::vector<Op> pre) {
    Layer l{kind, position, m->name(), m, w, b, std::move(pre)};
    return l;
  }

  // Reads stride/padding/dilation/groups; `visit` is found by ADL for c10::variant (1.13)
  // and std::variant (2.x) alike.
  template <class Options>
  static void set_conv(Layer& l, const Options& o) {
    using Array = std::decay_t<decltype(o.kernel_size())>;
    l.stride = at::IntArrayRef(*o.stride()).vec();
    l.dilation = at::IntArrayRef(*o.dilation()).vec();
    l.groups = o.groups();
    bool explicit_padding = false, zeros_mode = false;
    visit(
        [&](const auto& p) {
          if constexpr (std::is_same_v<std::decay_t<decltype(p)>, Array>) {
            l.padding = at::IntArrayRef(*p).vec();
            explicit_padding = true;
          }
        },
        o.padding());
    visit([&](const auto& m) { zeros_mode = std::is_same_v<std::decay_t<decltype(m)>, torch::enumtype::kZeros>; },
          o.padding_mode());
    l.explicit_zero_padding = explicit_padding && zeros_mode;
  }

  static void read_op(Op& op, const std::shared_ptr<torch::nn::Module>& m) {
    namespace nn = torch::nn;
    auto activation = [&](Activation a, double p1 = 0, double p2 = 0) {
      op.kind = OpKind::Activation, op.act = a, op.a = p1, op.b = p2;
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
    if (std::dynamic_pointer_cast<nn::SoftmaxImpl>(m)) return void(op.kind = OpKind::Softmax);
    if (auto f = std::dynamic_pointer_cast<nn::FlattenImpl>(m)) {
      op.kind = OpKind::Flatten, op.start_dim = f->options.start_dim(), op.end_dim = f->options.end_dim();
      return;
    }
    if (std::dynamic_pointer_cast<nn::DropoutImpl>(m) || std::dynamic_pointer_cast<nn::Dropout2dImpl>(m))
      return void(op.kind = OpKind::Dropout);
    if (std::dynamic_pointer_cast<nn::LayerNormImpl>(m) || std::dynamic_pointer_cast<nn::BatchNorm1dImpl>(m) ||
        std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(m))
      return void(op.kind = OpKind::Norm);
    if (std::dynamic_pointer_cast<nn::MaxPool1dImpl>(m) || std::dynamic_pointer_cast<nn::MaxPool2dImpl>(m) ||
        std::dynamic_pointer_cast<nn::AvgPool1dImpl>(m) || std::dynamic_pointer_cast<nn::AvgPool2dImpl>(m) ||
        std::dynamic_pointer_cast<nn::AdaptiveAvgPool1dImpl>(m) ||
        std::dynamic_pointer_cast<nn::AdaptiveAvgPool2dImpl>(m))
      return void(op.kind = OpKind::Pool);
    std::ostringstream os;
    os << "mep: unsupported module " << m->name() << " at position " << op.position
       << " of the Sequential (EP supports Linear, Conv1d, Conv2d, activations, LayerNorm, BatchNorm1d/2d, "
          "pooling, Flatten and Dropout)";
    throw ChainError(os.str());
  }

  static void freeze(Op& op, const torch::Tensor& in) {
    if (op.kind != OpKind::Norm) return;
    auto update = [&](auto& bn) {
      if (!bn.is_training()) {
        op.frozen_mean = bn.running_mean, op.frozen_var = bn.running_var;
        return;
      }
      std::vector<int64_t> dims{0};
      for (int64_t d = 2; d < in.dim(); ++d) dims.push_back(d);
      op.frozen_mean = in.mean(dims);
      op.frozen_var = in.var(dims, /*unbiased=*/false);
      op.pending_count = bn.options.track_running_stats() && bn.running_mean.defined() ? in.numel() / in.size(1) : 0;
    };
    if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(op.module)) update(*bn);
    if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(op.module)) update(*bn);
  }
};

}  // namespace mep
