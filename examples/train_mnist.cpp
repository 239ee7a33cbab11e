// Trains a small MLP on MNIST with mep::Muon in a plain LibTorch loop.
//
//   train_mnist [data_dir] [epochs]      (defaults: data/mnist, 1)
//
// data_dir holds the IDX files made by data/make_datasets.sh. A 2,000-sample training
// subset keeps a run to a few seconds; the whole test split is evaluated every epoch.
#include <mep/mep.hpp>

#include <algorithm>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

namespace {

constexpr int64_t kTrainSamples = 2000;
constexpr int64_t kBatch = 64;

int parse_epochs(const std::string& s) {
  size_t used = 0;
  int epochs = 0;
  try {
    epochs = std::stoi(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || epochs < 1) throw std::invalid_argument("epochs must be a positive integer, got '" + s + "'");
  return epochs;
}

// Fraction of `data` classified correctly, in batches.
double accuracy(torch::nn::Sequential& model, const mep::data::IdxDataset& data, torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  int64_t correct = 0;
  const int64_t n = data.images.size(0);
  for (int64_t i = 0; i < n; i += 500) {
    const int64_t b = std::min<int64_t>(500, n - i);
    auto logits = model->forward(data.images.narrow(0, i, b).to(device));
    correct += logits.argmax(1).eq(data.labels.narrow(0, i, b).to(device)).sum().item<int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(n);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc > 3 || (argc > 1 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help"))) {
      std::printf("usage: train_mnist [data_dir] [epochs]   (defaults: data/mnist 1)\n");
      return argc > 3 ? 2 : 0;
    }
    const std::string dir = argc > 1 ? argv[1] : "data/mnist";
    const int epochs = argc > 2 ? parse_epochs(argv[2]) : 1;

    torch::manual_seed(0);
    const torch::Device device = mep::default_device();
    const auto train = mep::data::load_split(dir, /*train=*/true, kTrainSamples);
    const auto test = mep::data::load_split(dir, /*train=*/false);

    auto model = mep::models::mlp_small();
    model->to(device);
    // Muon orthogonalises the weight matrices; the biases go to AdamW (Jordan's recipe).
    const auto split = mep::split_for_muon(model->parameters());
    mep::Muon muon(split.matrices, mep::MuonOptions(0.02));
    mep::AdamW adamw(split.others, mep::AdamWOptions(3e-3));
    std::printf("train_mnist: %lld train / %lld test samples from %s, device %s\n",
                static_cast<long long>(train.images.size(0)), static_cast<long long>(test.images.size(0)),
                dir.c_str(), device.str().c_str());

    const int64_t n = train.images.size(0);
    for (int epoch = 1; epoch <= epochs; ++epoch) {
      model->train();
      auto order = torch::randperm(n, torch::kLong);
      double total = 0;
      for (int64_t i = 0; i < n; i += kBatch) {
        auto idx = order.narrow(0, i, std::min(kBatch, n - i));
        auto x = train.images.index_select(0, idx).to(device);
        auto y = train.labels.index_select(0, idx).to(device);
        muon.zero_grad(), adamw.zero_grad();
        auto loss = torch::nn::functional::cross_entropy(model->forward(x), y);
        loss.backward();
        muon.step(), adamw.step();
        total += loss.item<double>() * static_cast<double>(idx.size(0));
      }
      std::printf("epoch %d  train loss %.4f  test accuracy %.2f%%\n", epoch, total / static_cast<double>(n),
                  100.0 * accuracy(model, test, device));
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_mnist: %s\n", e.what());
    return 1;
  }
}
