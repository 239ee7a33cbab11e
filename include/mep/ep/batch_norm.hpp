#pragma once
/// \file batch_norm.hpp
/// BatchNorm1d/2d as an op of the chain (ep/ops.hpp). EP settles a fixed function of the
/// states, so BatchNorm normalises with statistics frozen for the step — the batch's in
/// train mode, the running ones in eval mode (Ioffe & Szegedy 2015):
///
///   freeze   μ_c, σ²_c over all but the channel (biased), at the feedforward input
///   forward  x·scale_c + shift_c,   scale_c = γ_c/√(σ²_c + ε),   shift_c = β_c − μ_c·scale_c
///   VJP      g·scale_c;   ‖J‖ = max_c |scale_c|
///   ∂γ_c = Σ g·x̂,  ∂β_c = Σ g,   x̂ = (x − μ_c)/√(σ²_c + ε)
///   commit   running ← (1 − m)·running + m·batch statistic (σ² unbiased, n/(n − 1)), as
///            one forward pass in train mode would; `undo` puts them back.
///
/// This file is the only place that tells BatchNorm1d from BatchNorm2d.

#include <mep/ep/workspace.hpp>

#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

namespace mep {

struct BatchNorm {
  double eps = 1e-5;
  torch::Tensor weight, bias;  // undefined without affine
  std::shared_ptr<torch::nn::Module> module;

  /// The op for a BatchNorm1d or BatchNorm2d module; nothing for any other module.
  static std::optional<BatchNorm> from(const std::shared_ptr<torch::nn::Module>& m) {
    std::optional<BatchNorm> op;
    with_module(m, [&](auto& bn) { op = BatchNorm{bn.options.eps(), bn.weight, bn.bias, m}; });
    return op;
  }

  void prepare(const torch::Tensor& in, OpTape& t) const {
    t.out = torch::empty_like(in, torch::MemoryFormat::Contiguous);
    t.grad = torch::empty_like(in, torch::MemoryFormat::Contiguous);
  }
  torch::Tensor apply(const torch::Tensor& x, const OpTape& t) const {
    return torch::batch_norm(x, weight, bias, t.norm.mean, t.norm.var, false, 0.0, eps, false);
  }
  torch::Tensor forward(const torch::Tensor& in, OpTape& t) const {
    at::mul_out(t.out, in, channel_view(t.norm.scale, in));
    t.out.add_(channel_view(t.norm.shift, in));
    return t.out;
  }
  torch::Tensor vjp(const torch::Tensor& g, const torch::Tensor& in, OpTape& t) const {
    return at::mul_out(t.grad, g, channel_view(t.norm.scale, in));
  }
  double gain(const torch::Tensor&) const { return 1.0; }
  torch::Tensor norm_gain(const OpTape& t) const { return t.norm.scale.abs().max(); }
  void parameter_gradients(const torch::Tensor& g, const torch::Tensor& in, const OpTape& t,
                           std::vector<torch::Tensor>& out) const {
    if (!weight.defined() && !bias.defined()) return;
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < in.dim(); ++d) dims.push_back(d);
    auto xhat = (in - channel_view(t.norm.mean, in)) * channel_view((t.norm.var + eps).rsqrt(), in);
    if (weight.defined()) out.push_back((g * xhat).sum(dims));
    if (bias.defined()) out.push_back(g.sum(dims));
  }

  /// Freezes the statistics for the step at the feedforward input `in`.
  void freeze(const torch::Tensor& in, NormStatistics& n) const {
    with_module(module, [&](auto& bn) {
      const bool batch_stats = bn.is_training() || !bn.running_mean.defined();
      if (batch_stats) {
        std::vector<int64_t> dims{0};
        for (int64_t d = 2; d < in.dim(); ++d) dims.push_back(d);
        n.mean = in.mean(dims);
        n.var = in.var(dims, /*unbiased=*/false);
        n.count = bn.is_training() && bn.options.track_running_stats() && bn.running_mean.defined()
                      ? in.numel() / in.size(1)
                      : 0;
      } else {
        n.mean = bn.running_mean.clone(), n.var = bn.running_var.clone(), n.count = 0;
      }
    });
    auto rstd = (n.var + eps).rsqrt();
    n.scale = weight.defined() ? rstd * weight : rstd;
    n.shift = bias.defined() ? bias - n.mean * n.scale : -n.mean * n.scale;
  }

  /// Advances the running statistics with the frozen batch statistics (train mode only).
  void commit(NormStatistics& n) const {
    n.saved_running.clear();
    if (n.count == 0) return;
    with_module(module, [&](auto& bn) {
      n.saved_running = {bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()};
      const double mom = bn.options.momentum().value_or(0.1);
      const double count = static_cast<double>(n.count);
      bn.running_mean.mul_(1 - mom).add_(n.mean, mom);
      bn.running_var.mul_(1 - mom).add_(n.var * (count / std::max(count - 1, 1.0)), mom);
      bn.num_batches_tracked.add_(1);
    });
    n.count = 0;
  }

  /// Puts the running statistics back as they were before the last `commit`.
  void undo(NormStatistics& n) const {
    if (n.saved_running.empty()) return;
    with_module(module, [&](auto& bn) {
      bn.running_mean.copy_(n.saved_running[0]), bn.running_var.copy_(n.saved_running[1]);
      bn.num_batches_tracked.copy_(n.saved_running[2]);
    });
    n.saved_running.clear();
  }

 private:
  template <class F>
  static void with_module(const std::shared_ptr<torch::nn::Module>& m, F&& f) {
    if (auto bn = std::dynamic_pointer_cast<torch::nn::BatchNorm1dImpl>(m)) f(*bn);
    else if (auto bn2 = std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(m)) f(*bn2);
  }
  static torch::Tensor channel_view(const torch::Tensor& v, const torch::Tensor& like) {
    std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
    shape[1] = v.numel();
    return v.view(shape);
  }
};

}  // namespace mep
