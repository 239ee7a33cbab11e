// The data of a run and the evaluation of a model on it.

#include "data.hpp"

#include <mep/mep.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>

namespace mep_bench {
namespace {
constexpr int64_t kEvalBatch = 1000;  // evaluation batch (no gradients, so larger than training's)
}  // namespace

Split load_split(const std::string& dir, bool train, int64_t limit, const std::vector<double>& normalize,
                 const torch::Device& device) {
  try {
    auto ds = mep::data::load_split(dir, train, limit, normalize[0], normalize[1]);
    return {ds.images.to(device), ds.labels.to(device)};
  } catch (const mep::data::IdxError& e) {
    throw std::runtime_error(fmt::format("cannot load the {} split (--{} {}): {}", train ? "training" : "test",
                                         train ? "train" : "test", limit, e.what()));
  }
}

Eval evaluate(torch::nn::Sequential& model, const Split& split) {
  torch::NoGradGuard no_grad;
  model->eval();
  const int64_t n = split.size();
  auto loss_sum = torch::zeros({}, split.x.options().dtype(torch::kDouble));
  auto correct = torch::zeros({}, split.y.options());
  for (int64_t start = 0; start < n; start += kEvalBatch) {
    const int64_t len = std::min(kEvalBatch, n - start);
    auto out = model->forward(split.x.narrow(0, start, len));
    auto y = split.y.narrow(0, start, len);
    namespace F = torch::nn::functional;
    loss_sum += F::cross_entropy(out, y, F::CrossEntropyFuncOptions().reduction(torch::kSum)).to(torch::kDouble);
    correct += out.argmax(1).eq(y).sum();
  }
  model->train();
  return {loss_sum.item<double>() / n, static_cast<double>(correct.item<int64_t>()) / n};
}

}  // namespace mep_bench
