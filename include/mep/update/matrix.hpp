#pragma once
/// \file matrix.hpp
/// How update policies see a parameter: a matrix (out × everything else). Conv kernels
/// [out, in, kh, kw] become [out, in·kh·kw]; tensors below 2-D are not matrices.

#include <torch/torch.h>

namespace mep {

inline bool is_matrix(const torch::Tensor& t) { return t.dim() >= 2; }

/// `t` viewed as [size(0), numel/size(0)] (a view when `t` is contiguous).
inline torch::Tensor as_matrix(const torch::Tensor& t) { return t.reshape({t.size(0), -1}); }

}  // namespace mep
