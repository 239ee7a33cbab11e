// Constraint policies: the spectral constraint (power-iteration scale rule and exact clip
// rule), and which layer the optimizers' spectral bound treats as the input layer.
#include <gtest/gtest.h>
#include <mep/mep.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

// Calls `enforce` 30 times on `w` with persisted u, v and returns, for each tolerance,
// the first call after which the exact σ(W) (by SVD) is within γ(1 + tol); -1 if never.
std::pair<int, int> calls_to_converge(torch::Tensor w) {
  mep::SpectralConstraint c;  // γ = 0.95, 3 power iterations
  mep::ParamState st;
  int within_1e2 = -1, within_1e3 = -1;
  for (int call = 1; call <= 30; ++call) {
    c.enforce(w, st);
    const double sigma = torch::linalg_svdvals(w.to(torch::kFloat64))[0].item<double>();
    if (within_1e2 < 0 && sigma <= c.gamma * (1 + 1e-2)) within_1e2 = call;
    if (within_1e3 < 0 && sigma <= c.gamma * (1 + 1e-3)) within_1e3 = call;
  }
  return {within_1e2, within_1e3};
}

TEST(Spectral, RepeatedCallsBringSigmaToGamma) {
  torch::manual_seed(6);
  // A 256×784 matrix with a decaying spectrum σ_i = 3·0.97^i, as trained layers have.
  auto u = std::get<0>(torch::linalg_qr(torch::randn({256, 256}, torch::kFloat64)));
  auto v = std::get<0>(torch::linalg_qr(torch::randn({784, 256}, torch::kFloat64)));
  auto s = 3.0 * torch::pow(0.97, torch::arange(256, torch::kFloat64));
  auto [within_1e2, within_1e3] = calls_to_converge(torch::mm(u * s, v.t()).to(torch::kFloat32));
  EXPECT_GE(within_1e2, 1);
  EXPECT_LE(within_1e2, 10);
  EXPECT_GE(within_1e3, 1);
  EXPECT_LE(within_1e3, 30);
}

TEST(Spectral, GaussianMatrixConvergesToo) {
  // An i.i.d. Gaussian matrix is the hard case: σ₁/σ₂ ≈ 1.005, so power iteration is slow
  // (over seeds the excess after 30 calls ranged 7e-5 .. 9e-3); it must still get there.
  torch::manual_seed(6);
  auto [within_1e2, within_1e3] = calls_to_converge(torch::randn({256, 784}) * 0.2);
  EXPECT_GE(within_1e2, 1);
  EXPECT_LE(within_1e2, 30);
}

TEST(Spectral, LeavesAMatrixBelowGammaUnchanged) {
  torch::manual_seed(7);
  mep::SpectralConstraint c;
  mep::ParamState st;
  auto w = torch::randn({50, 30});
  w = w / torch::linalg_svdvals(w)[0] * 0.5;
  auto before = w.clone();
  for (int i = 0; i < 5; ++i) c.enforce(w, st);
  EXPECT_TRUE(torch::equal(w, before));
  auto bias = torch::randn({5}) * 100;
  auto bias_before = bias.clone();
  c.enforce(bias, st);
  EXPECT_TRUE(torch::equal(bias, bias_before));
}

// The clip rule is W ← U·min(Σ, γ)·Vᵀ: against an SVD in float64, for a wide, a tall and a
// conv-shaped weight, with the singular values below γ and the vectors kept. The scale
// rule, on the same matrix, shrinks every singular value by the same factor.
TEST(Spectral, ClipSetsTheSingularValuesAboveGammaToGamma) {
  torch::manual_seed(8);
  mep::SpectralConstraint clip;
  clip.mode = mep::SpectralMode::Clip;
  mep::ParamState st;
  for (std::vector<int64_t> shape : {std::vector<int64_t>{30, 50}, {50, 30}, {16, 4, 3, 3}}) {
    // Singular values spread from 0.1 to 2.5: several above γ, several below.
    const int64_t rows = shape[0], cols = torch::ones(shape).reshape({rows, -1}).size(1), k = std::min(rows, cols);
    auto q1 = std::get<0>(torch::linalg_qr(torch::randn({rows, k}, torch::kFloat64)));
    auto q2 = std::get<0>(torch::linalg_qr(torch::randn({cols, k}, torch::kFloat64)));
    auto w = torch::mm(q1 * torch::linspace(2.5, 0.1, k, torch::kFloat64), q2.t()).reshape(shape);
    auto [u, s, vh] = torch::linalg_svd(w.reshape({rows, -1}), false);
    auto expected = torch::mm(u * s.clamp_max(clip.gamma), vh).reshape(shape);
    clip.enforce(w, st);
    EXPECT_LT((w - expected).abs().max().item<double>(), 1e-10) << shape;
    auto after = torch::linalg_svdvals(w.reshape({shape[0], -1}));
    EXPECT_LT(std::abs(after[0].item<double>() - clip.gamma), 1e-10);
    EXPECT_TRUE(st.buffer_names().empty());  // no state
  }
  mep::SpectralConstraint scale;  // the same matrix: every σ times γ/σ₁
  auto w = torch::randn({30, 50}, torch::kFloat64) * 0.4;
  auto s = torch::linalg_svdvals(w);
  for (int i = 0; i < 30; ++i) scale.enforce(w, st);
  EXPECT_LT((torch::linalg_svdvals(w) - s * (scale.gamma / s[0])).abs().max().item<double>(), 1e-6);
}

TEST(Spectral, ClipLeavesAMatrixBelowGammaUnchanged) {
  torch::manual_seed(9);
  mep::SpectralConstraint c;
  c.mode = mep::SpectralMode::Clip;
  mep::ParamState st;
  for (auto dtype : {torch::kFloat32, torch::kFloat64}) {
    auto w = torch::randn({40, 25}, dtype);
    w = w / torch::linalg_svdvals(w)[0] * 0.9;
    auto before = w.clone();
    c.enforce(w, st);
    EXPECT_TRUE(torch::equal(w, before)) << dtype;
  }
  auto w = torch::randn({40, 25}) * 10;  // float32: the bound holds to rounding
  c.enforce(w, st);
  EXPECT_LE(torch::linalg_svdvals(w.to(torch::kFloat64))[0].item<double>(), c.gamma * (1 + 1e-5));
}

// The spectral bound holds every weight, the input layer's too (the reference); with
// bound_input_layer(false) the input layer, whose W_1 never enters the settling Jacobians,
// is left free. The input layer is the first Linear/Conv of a model (after a BatchNorm
// here), or the first matrix of a parameter list. Both rules, scale and clip.
TEST(EPOptim, SpectralBoundLeavesTheInputLayerFreeOnlyWhenAsked) {
  const auto sigma = [](const torch::Tensor& w) {
    return torch::linalg_svdvals(w.detach().to(torch::kFloat64))[0].item<double>();
  };
  const auto model_with_large_weights = [&] {
    torch::manual_seed(18);
    torch::nn::Sequential m(torch::nn::BatchNorm1d(20), torch::nn::Linear(20, 32), torch::nn::ReLU(),
                            torch::nn::Linear(32, 32), torch::nn::ReLU(), torch::nn::Linear(32, 10));
    torch::NoGradGuard no_grad;
    for (auto& p : m->parameters())
      if (p.dim() == 2) p.mul_(3.0 / sigma(p));  // σ = 3 > γ everywhere
    return m;
  };
  const auto x = torch::randn({16, 20});
  const auto y = torch::randint(0, 10, {16}, torch::kLong);
  const double bounded = 0.95 * (1 + 1e-2);
  EXPECT_TRUE(mep::SMEPOptions().bound_input_layer());
  for (auto mode : {mep::SpectralMode::Scale, mep::SpectralMode::Clip})
    for (bool bound : {false, true}) {
      auto model = model_with_large_weights();
      auto o = mep::SMEPOptions(1e-3).spectral_mode(mode).bound_input_layer(bound);
      if (mode == mep::SpectralMode::Scale) o.power_iter(50);
      mep::SMEP opt(model, o);
      for (int i = 0; i < 3; ++i) opt.step(x, y);
      auto params = model->parameters();  // bn.weight, bn.bias, W1, b1, W2, b2, W3, b3
      if (bound) EXPECT_LE(sigma(params[2]), bounded);
      else EXPECT_GT(sigma(params[2]), 2.9);  // three steps of lr 1e-3 from σ = 3, never bounded
      EXPECT_EQ(opt.state_of(params[2]).has("spectral_u"), bound && mode == mep::SpectralMode::Scale);
      EXPECT_LE(sigma(params[4]), bounded);
      EXPECT_LE(sigma(params[6]), bounded);
    }
  // From a parameter list (Muon): the first parameter with two or more dimensions.
  for (bool bound : {false, true}) {
    auto model = model_with_large_weights();
    auto params = model->parameters();
    std::vector<torch::Tensor> list(params.begin() + 2, params.end());  // W1 first
    mep::reference::Muon opt(list, mep::reference::MuonOptions().power_iter(50).bound_input_layer(bound));
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    opt.step();
    EXPECT_EQ(sigma(params[2]) <= bounded, bound);
    EXPECT_LE(sigma(params[4]), bounded);
  }
  // The clip rule computes σ exactly: power_iter is refused with it, by name.
  try {
    mep::SMEP(model_with_large_weights(), mep::SMEPOptions().spectral_mode(mep::SpectralMode::Clip).power_iter(5));
    ADD_FAILURE() << "no error for power_iter with spectral_mode clip";
  } catch (const mep::OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("power_iter = 5"), std::string::npos) << e.what();
  }
}

// A user's block with parameters: EP runs it through autograd.
struct Block : torch::nn::Module {
  Block() : fc(register_module("fc", torch::nn::Linear(6, 5))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc->forward(x); }
  torch::nn::Linear fc;
};

TEST(TorchOptim, AUserBlockFirstIsTheInputLayer) {
  for (bool bound : {true, false}) {
    torch::manual_seed(4);
    auto block = std::make_shared<Block>();
    auto model = torch::nn::Sequential(block, torch::nn::Tanh(), torch::nn::Linear(5, 3));
    {
      torch::NoGradGuard no_grad;
      block->fc->weight.mul_(20);  // σ far above γ
    }
    mep::SMEP opt(model, mep::SMEPOptions(0.01).spectral_mode(mep::SpectralMode::Clip).bound_input_layer(bound));
    opt.step(torch::randn({8, 6}), torch::randint(0, 3, {8}, torch::kLong));
    auto sigma = [](const torch::Tensor& w) { return std::get<1>(torch::svd(w.detach())).max().item<double>(); };
    EXPECT_LE(sigma(model->parameters()[2]), 0.95 + 1e-4);  // the last Linear's weight
    if (bound) EXPECT_LE(sigma(block->fc->weight), 0.95 + 1e-4);
    else EXPECT_GT(sigma(block->fc->weight), 2.0);
  }
}

}  // namespace
