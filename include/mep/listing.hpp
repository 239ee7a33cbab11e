#pragma once
/// \file listing.hpp
/// EP for a model written as a custom torch::nn::Module: its layers listed in forward order,
/// as a torch::nn::Sequential of the model's own submodules, with the functional steps of its
/// forward() as modules between them:
///
///   struct Net : torch::nn::Module {       // pytorch/examples, cpp/mnist
///     torch::Tensor forward(torch::Tensor x) {
///       x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
///       x = torch::relu(torch::max_pool2d(conv2_drop->forward(conv2->forward(x)), 2));
///       x = x.view({-1, 320});
///       x = torch::relu(fc1->forward(x));
///       x = torch::dropout(x, 0.5, is_training());
///       return torch::log_softmax(fc2->forward(x), 1);
///     }
///     torch::nn::Conv2d conv1, conv2;  torch::nn::Dropout2d conv2_drop;  torch::nn::Linear fc1, fc2;
///   };
///
///   namespace nn = torch::nn;
///   auto net = std::make_shared<Net>();
///   auto layers = mep::listing(net, nn::Sequential(
///       net->conv1, nn::MaxPool2d(2), nn::ReLU(),
///       net->conv2, net->conv2_drop, nn::MaxPool2d(2), nn::ReLU(),
///       nn::Flatten(),                                        // x.view({-1, 320})
///       net->fc1, nn::ReLU(), nn::Dropout(0.5),               // torch::dropout(x, 0.5, is_training())
///       net->fc2, nn::LogSoftmax(1)));
///   mep::SMEP opt(layers, mep::SMEPOptions().loss(mep::Loss::NLL));   // trains net's parameters
///
/// A functional step is any module: its analytic twin where LibTorch has one (nn::ReLU for
/// torch::relu, nn::MaxPool2d for torch::max_pool2d, nn::Flatten for view, nn::Dropout for
/// torch::dropout, nn::LogSoftmax for torch::log_softmax: ep/chain.hpp), or
/// nn::Functional(torch::relu), nn::Functional([](torch::Tensor x) { return torch::max_pool2d(x, 2); })
/// for any other, which EP runs through autograd (autograd_module.hpp).
///
/// The listing shares the modules, so training it trains the Net. `listing` refuses, with a
/// ChainError: a listing EP cannot read (ep/chain.hpp); a parameter of the Net the listing
/// leaves out (named as in net->named_parameters()); a module with parameters that is not
/// the Net's (it would be trained, but the Net's forward never uses it). Given an example
/// input, it also checks that the listing computes what the Net's forward computes (both in
/// eval mode) — the one thing it cannot see from the modules alone.

#include <mep/ep/autograd_module.hpp>
#include <mep/ep/chain.hpp>

#include <torch/torch.h>

#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace mep {

namespace detail {

inline const torch::nn::Module& module_of(const torch::nn::Module& net) { return net; }
template <class T>
const torch::nn::Module& module_of(const std::shared_ptr<T>& net) {
  if (!net) throw ChainError("mep: listing: the model is null");
  return *net;
}
template <class T>
const torch::nn::Module& module_of(const torch::nn::ModuleHolder<T>& net) {
  if (net.is_empty()) throw ChainError("mep: listing: the model is null");
  return *net;
}

template <class T>
std::shared_ptr<T> shared_module(const std::shared_ptr<T>& net) {
  return net;
}
template <class T>
std::shared_ptr<T> shared_module(const torch::nn::ModuleHolder<T>& net) {
  return net.ptr();
}

}  // namespace detail

/// `layers`, checked to be a listing of `net` (a std::shared_ptr to a Module, a TORCH_MODULE
/// holder, or a Module): every parameter of net in it, and no other. Throws ChainError
/// naming what is missing or foreign, or a module EP cannot run.
template <class Net>
torch::nn::Sequential listing(const Net& net, torch::nn::Sequential layers) {
  const torch::nn::Module& owner = detail::module_of(net);
  if (layers.is_empty()) throw ChainError("mep: listing: the Sequential is null");
  Chain::from(layers);
  std::unordered_set<const c10::TensorImpl*> own;
  for (const auto& p : owner.parameters()) own.insert(p.unsafeGetTensorImpl());
  std::unordered_set<const c10::TensorImpl*> listed;
  for (size_t position = 0; position < layers->size(); ++position) {
    const auto m = layers->ptr(position);
    for (const auto& p : m->parameters()) {
      listed.insert(p.unsafeGetTensorImpl());
      if (own.count(p.unsafeGetTensorImpl())) continue;
      std::ostringstream os;
      os << "mep: listing: " << m->name() << " at position " << position
         << " is not one of the model's modules: its parameters would be trained, but the model's forward never "
            "uses them; list the model's own module (e.g. net->fc1), not a new one";
      throw ChainError(os.str());
    }
  }
  std::vector<std::string> missing;
  for (const auto& kv : owner.named_parameters())
    if (!listed.count(kv.value().unsafeGetTensorImpl())) missing.push_back(kv.key());
  if (!missing.empty()) {
    std::ostringstream os;
    os << "mep: listing: the listing leaves out the model's parameter" << (missing.size() > 1 ? "s " : " ");
    for (size_t i = 0; i < missing.size(); ++i) os << (i ? ", " : "") << missing[i];
    os << "; list every layer of its forward, in order, as the model's own modules";
    throw ChainError(os.str());
  }
  return layers;
}

/// The same, and checks on `example` (a batch the Net takes) that the listing computes the
/// Net's forward, both in eval mode: outputs of one shape, equal to |Δ| ≤ 1e-4·max(1, max|y|).
/// `net` is a std::shared_ptr to the Net or its TORCH_MODULE holder.
template <class Net>
torch::nn::Sequential listing(const Net& net, torch::nn::Sequential layers, const torch::Tensor& example) {
  listing(net, layers);
  torch::NoGradGuard no_grad;
  const auto model = detail::shared_module(net);
  EvalMode eval({model, layers.ptr()});
  const torch::Tensor expected = model->forward(example);
  torch::Tensor actual;
  try {
    actual = layers->forward(example);
  } catch (const c10::Error& e) {
    throw ChainError(std::string("mep: listing: the listing fails on the example input where the model's forward "
                                 "runs: ") +
                     e.what_without_backtrace());
  }
  std::ostringstream os;
  if (actual.sizes() != expected.sizes()) {
    os << "mep: listing: the listing gives an output of shape " << actual.sizes() << " where the model's forward gives "
       << expected.sizes() << "; list the layers and functional steps of its forward, in order";
    throw ChainError(os.str());
  }
  if (expected.numel() == 0) return layers;
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double diff = (actual - expected).abs().max().item<double>();
  if (!(diff <= 1e-4 * scale)) {
    os << "mep: listing: the listing's output differs from the model's forward by up to " << diff
       << " on the example input; list the layers and functional steps of its forward, in order";
    throw ChainError(os.str());
  }
  return layers;
}

}  // namespace mep
