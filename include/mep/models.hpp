#pragma once
/// \file models.hpp
/// The models of mep_bench's tables (the README's Results), for MNIST-shaped input [B, 1, 28, 28].

#include <torch/torch.h>

#include <stdexcept>
#include <string>

namespace mep::models {

/// Flatten, Linear(784,256), ReLU, Linear(256,10).
inline torch::nn::Sequential mlp_small() {
  return torch::nn::Sequential(torch::nn::Flatten(), torch::nn::Linear(784, 256), torch::nn::ReLU(),
                               torch::nn::Linear(256, 10));
}

/// Flatten, Linear(784,512), ReLU, Dropout(0.2), Linear(512,256), ReLU, Dropout(0.2), Linear(256,10).
inline torch::nn::Sequential mlp() {
  return torch::nn::Sequential(torch::nn::Flatten(), torch::nn::Linear(784, 512), torch::nn::ReLU(),
                               torch::nn::Dropout(0.2), torch::nn::Linear(512, 256), torch::nn::ReLU(),
                               torch::nn::Dropout(0.2), torch::nn::Linear(256, 10));
}

/// Conv(1,32,3,p1), ReLU, MaxPool(2), Conv(32,64,3,p1), ReLU, MaxPool(2), Flatten,
/// Linear(3136,128), ReLU, Linear(128,10).
inline torch::nn::Sequential cnn() {
  namespace nn = torch::nn;
  return nn::Sequential(nn::Conv2d(nn::Conv2dOptions(1, 32, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Conv2d(nn::Conv2dOptions(32, 64, 3).padding(1)), nn::ReLU(), nn::MaxPool2d(2),
                        nn::Flatten(), nn::Linear(3136, 128), nn::ReLU(), nn::Linear(128, 10));
}

/// The model named `name` (mlp_small, mlp, cnn); std::invalid_argument otherwise.
inline torch::nn::Sequential by_name(const std::string& name) {
  if (name == "mlp_small") return mlp_small();
  if (name == "mlp") return mlp();
  if (name == "cnn") return cnn();
  throw std::invalid_argument("mep: unknown model '" + name + "' (expected mlp_small, mlp or cnn)");
}

}  // namespace mep::models
