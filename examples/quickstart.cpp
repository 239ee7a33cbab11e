// Quick start: SMEP (EP gradients + Newton-Schulz + spectral constraint) on MNIST in a
// plain LibTorch loop. The optimizer owns the gradient computation: one call per batch
// settles the network, forms the EP gradients and updates the weights.
//
//   quickstart [data_dir] [epochs]      (defaults: data/mnist, 2)
#include <mep/mep.hpp>

#include <cstdio>
#include <exception>
#include <string>

int main(int argc, char** argv) {
  try {
    const std::string dir = argc > 1 ? argv[1] : "data/mnist";
    const int epochs = argc > 2 ? std::stoi(argv[2]) : 2;
    torch::manual_seed(0);
    auto train = mep::data::load_split(dir, /*train=*/true, /*limit=*/3000);
    auto test = mep::data::load_split(dir, /*train=*/false, /*limit=*/500);

    torch::nn::Sequential model(torch::nn::Flatten(), torch::nn::Linear(784, 256), torch::nn::ReLU(),
                                torch::nn::Linear(256, 10));
    mep::SMEP opt(model, mep::SMEPOptions(0.01).beta(0.5));  // default settling: 2 layer sweeps

    for (int epoch = 1; epoch <= epochs; ++epoch) {
      auto perm = torch::randperm(train.images.size(0), torch::kLong);
      double loss = 0;
      int batches = 0;
      for (int64_t i = 0; i < perm.size(0); i += 128) {
        auto idx = perm.slice(0, i, i + 128);
        loss += opt.step(train.images.index_select(0, idx), train.labels.index_select(0, idx)).item<double>();
        ++batches;
      }
      torch::NoGradGuard no_grad;
      const double acc = model->forward(test.images).argmax(1).eq(test.labels).to(torch::kFloat64).mean().item<double>();
      const auto& settled = opt.settle_report();  // what settling did in the last step
      std::printf("epoch %d  loss %.4f  test accuracy %.2f%%  (settling: %lld sweeps, residual %.1e)\n", epoch,
                  loss / batches, 100 * acc, static_cast<long long>(settled.steps()), settled.residual());
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "quickstart: %s\n", e.what());
    return 1;
  }
}
