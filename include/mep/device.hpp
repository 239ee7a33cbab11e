#pragma once
/// \file device.hpp
/// Device selection: tensors follow the model, so the only choice is where to put it.

#include <torch/torch.h>

namespace mep {

/// CUDA when LibTorch sees a GPU, CPU otherwise.
inline torch::Device default_device() {
  return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
}

}  // namespace mep
