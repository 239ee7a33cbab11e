#pragma once
/// \file loss.hpp
/// The losses EP approximates and backprop minimises, and the validation of targets.
///
///   MSE:           L = mean_b Σ_k (ŷ_bk − y_bk)²   (y one-hot for class targets; no ½,
///                  the reference's convention, so ∂L/∂ŷ = 2(ŷ − y)/B)
///   CrossEntropy:  L = mean_b CE(ŷ_b, y_b) with label smoothing (0.1 in EP nudging)
///   NLL:           L = mean_b −Σ_k y_bk·ŷ_bk for log-probabilities ŷ (a model ending in
///                  LogSoftmax): −ŷ_{b,y_b} for class targets, torch::nll_loss; no smoothing

#include <mep/options.hpp>

#include <torch/torch.h>

#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

namespace mep {

enum class Loss { MSE, CrossEntropy, NLL };

/// The names of the losses: in options set by name (OptimizerOptions::set), in records, in
/// messages and when printed (options.hpp).
inline const std::vector<std::pair<Loss, const char*>>& enum_names(Loss) {
  static const std::vector<std::pair<Loss, const char*>> names = {{Loss::MSE, "mse"}, {Loss::CrossEntropy, "ce"}, {Loss::NLL, "nll"}};
  return names;
}

/// The loss's name in enum_names ("mse", "ce", "nll"); "?" for a value outside it.
inline const char* to_string(Loss loss) {
  const char* name = enum_name(loss);
  return name ? name : "?";
}

/// Thrown for a target that does not fit the model's output.
class TargetError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// Checks what the host knows of `target` against an output of shape [B, K] (or [B, ...]):
/// int64 class indices of shape [B], or a floating tensor of the output's shape. Throws
/// TargetError saying what was expected otherwise. Reads no value.
inline void check_target_shape(const torch::Tensor& target, at::IntArrayRef output_shape) {
  std::ostringstream os;
  if (!target.defined()) throw TargetError("mep: target is undefined");
  const int64_t batch = output_shape.empty() ? 0 : output_shape[0];
  if (target.scalar_type() == torch::kLong) {
    if (target.dim() != 1 || target.size(0) != batch) {
      os << "mep: class-index target must have shape [" << batch << "] (the batch size), got "
         << target.sizes();
      throw TargetError(os.str());
    }
    if (output_shape.size() != 2) {
      os << "mep: class-index targets need a 2-D output [B, classes], the model gives " << output_shape;
      throw TargetError(os.str());
    }
    return;
  }
  if (!torch::isFloatingType(target.scalar_type())) {
    os << "mep: target must be int64 class indices or a floating tensor, got dtype " << target.scalar_type();
    throw TargetError(os.str());
  }
  if (target.sizes() != output_shape) {
    os << "mep: float target must have the output's shape " << output_shape << ", got " << target.sizes();
    throw TargetError(os.str());
  }
}

/// Throws the TargetError `check_target` gives for the values of a target that passed
/// `check_target_shape`, or returns. Reads the target on the host (the failure path).
inline void throw_if_bad_target_values(const torch::Tensor& target, at::IntArrayRef output_shape) {
  if (target.scalar_type() == torch::kLong) {
    if (target.numel() == 0) return;
    const int64_t classes = output_shape[1];
    auto range = torch::stack({target.min(), target.max()}).cpu();
    const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
    if (lo < 0 || hi >= classes) {
      std::ostringstream os;
      os << "mep: class index out of range: targets span [" << lo << ", " << hi << "] but the model has "
         << classes << " outputs (expected indices in [0, " << classes - 1 << "])";
      throw TargetError(os.str());
    }
    return;
  }
  if (!torch::isfinite(target).all().item<bool>()) throw TargetError("mep: target contains NaN or infinite values");
}

/// Checks `target` against an output of shape [B, K] (or [B, ...]): int64 class indices of
/// shape [B] within [0, K), or a floating tensor of the output's shape; finite values.
/// Throws TargetError saying what was expected otherwise. One device sync (range/NaN check);
/// `safe_target` and `target_valid` check the values without one.
inline void check_target(const torch::Tensor& target, at::IntArrayRef output_shape) {
  check_target_shape(target, output_shape);
  throw_if_bad_target_values(target, output_shape);
}

/// Class indices clamped into [0, classes) (what one-hot encodings and the losses index with,
/// so that a bad label never reads out of bounds: `target_valid` reports it); a float target
/// itself.
inline torch::Tensor safe_target(const torch::Tensor& target, int64_t classes) {
  if (target.scalar_type() != torch::kLong || classes <= 0) return target;
  return target.clamp(0, classes - 1);
}

/// Whether the values of `target` (shape-checked) are valid, as a 0-dim bool tensor on its
/// device, without reading it: class indices in range (`safe` = safe_target(target, K), which
/// equals the target exactly then), or every value of a float target finite.
inline torch::Tensor target_valid(const torch::Tensor& target, const torch::Tensor& safe) {
  if (target.scalar_type() == torch::kLong) return safe.eq(target).all();
  return target.mul(0).sum().eq(0);  // 0·x is 0 for a finite x and NaN otherwise
}

/// One-hot encoding of class indices, or the float target itself, in `like`'s dtype/device.
/// Indices out of [0, K) are clamped (they never index out of bounds; `target_valid` says
/// whether there were any), so that no value is read on the host.
/// `in_range`: the indices are known to be in [0, K) already (safe_target's), not clamped again.
inline torch::Tensor dense_target(const torch::Tensor& target, const torch::Tensor& like, bool in_range = false) {
  if (target.scalar_type() == torch::kLong) {
    const int64_t classes = like.size(1);
    const auto index = in_range ? target : safe_target(target, classes);
    return torch::zeros({target.size(0), classes}, like.options()).scatter_(1, index.unsqueeze(1), 1.0);
  }
  return target.to(like.options());
}

/// Mean over the batch of the per-sample loss of `output` against `target` (label smoothing:
/// cross-entropy only).
inline torch::Tensor loss_value(Loss loss, const torch::Tensor& output, const torch::Tensor& target,
                                double label_smoothing = 0.0) {
  if (loss == Loss::MSE) {
    auto diff = output - dense_target(target, output);
    return diff.pow(2).sum() / output.size(0);
  }
  if (loss == Loss::NLL) {
    if (target.scalar_type() == torch::kLong) return torch::nll_loss(output, target);
    return -(target.to(output.options()) * output).sum() / output.size(0);
  }
  namespace F = torch::nn::functional;
  if (target.scalar_type() == torch::kLong)
    return F::cross_entropy(output, target, F::CrossEntropyFuncOptions().label_smoothing(label_smoothing));
  // Soft targets: smoothed distribution against log-softmax.
  auto y = target.to(output.options());
  if (label_smoothing > 0) y = y * (1 - label_smoothing) + label_smoothing / output.size(1);
  return -(y * torch::log_softmax(output, 1)).sum() / output.size(0);
}

}  // namespace mep
