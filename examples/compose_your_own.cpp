// Compose your own optimizer from policies: symmetric EP gradients with cross-entropy
// nudging, settled by heavy-ball descent instead of the default layer sweeps (the settling
// policy is the EP gradient's parameter), a Dion low-rank update and the spectral constraint,
// without error feedback
// (mep::ErrorFeedback in the last slot adds it; see the README for what it does to EP).
// The options type gathers every policy's options, so the setters of all four chain.
//
//   compose_your_own [data_dir]      (default: data/mnist)
#include <mep/mep.hpp>

#include <cstdio>
#include <exception>
#include <string>

using SymmetricDionEP = mep::Optimizer<mep::BasicEPGradient<mep::HeavyBall>, mep::Dion, mep::SpectralConstraint,
                                       mep::NoFeedback>;

int main(int argc, char** argv) {
  try {
    const std::string dir = argc > 1 ? argv[1] : "data/mnist";
    torch::manual_seed(0);
    auto train = mep::data::load_split(dir, true, 2000);
    auto test = mep::data::load_split(dir, false, 500);
    auto model = mep::models::mlp_small();

    SymmetricDionEP opt(model, SymmetricDionEP::Options(0.01)
                                   .beta(0.2)
                                   .symmetric(true)                 // EPGradient
                                   .loss(mep::Loss::CrossEntropy)
                                   .settle_steps(10)                // HeavyBall
                                   .settle_lr(0.5)
                                   .adaptive(false)
                                   .rank_frac(0.25)                 // Dion
                                   .dion_thresh(10000)
                                   .gamma(0.95));                   // SpectralConstraint
    for (int epoch = 1; epoch <= 2; ++epoch) {
      auto perm = torch::randperm(train.images.size(0), torch::kLong);
      for (int64_t i = 0; i < perm.size(0); i += 128) {
        auto idx = perm.slice(0, i, i + 128);
        opt.step(train.images.index_select(0, idx), train.labels.index_select(0, idx));
      }
      torch::NoGradGuard no_grad;
      const double acc = model->forward(test.images).argmax(1).eq(test.labels).to(torch::kFloat64).mean().item<double>();
      std::printf("epoch %d  test accuracy %.2f%%\n", epoch, 100 * acc);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compose_your_own: %s\n", e.what());
    return 1;
  }
}
