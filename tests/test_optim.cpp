// Backprop optimizers, update and constraint policies, options, and state round-trips.
#include <gtest/gtest.h>
#include <mep/mep.hpp>

#include "support.hpp"

#include <cstdio>
#include <filesystem>

namespace {

torch::nn::Sequential small_mlp() {
  return torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::Tanh(), torch::nn::Linear(32, 10));
}

using mep_test::copy_parameters;
using mep_test::max_abs_diff;

// Runs `steps` steps of `ours` and `theirs` on two copies of one model, feeding both the
// gradient computed on `ours`'s copy, and returns the largest parameter difference.
template <class Ours, class Theirs>
double run_side_by_side(Ours& ours, torch::nn::Sequential& a, Theirs& theirs, torch::nn::Sequential& b,
                        int steps) {
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  for (int s = 0; s < steps; ++s) {
    ours.zero_grad();
    torch::nn::functional::cross_entropy(a->forward(x), y).backward();
    auto pa = a->parameters();
    auto pb = b->parameters();
    for (size_t i = 0; i < pa.size(); ++i) pb[i].mutable_grad() = pa[i].grad().clone();
    ours.step();
    theirs.step();
  }
  return max_abs_diff(a->parameters(), b->parameters());
}

struct TorchMatch : ::testing::TestWithParam<std::tuple<double, double, bool>> {};

TEST_P(TorchMatch, SGDMatchesTorchSGD) {
  auto [momentum, dampening, nesterov] = GetParam();
  torch::manual_seed(1);
  auto a = small_mlp(), b = small_mlp();
  copy_parameters(a, b);
  mep::SGD ours(a->parameters(),
                mep::SGDOptions(0.1).momentum(momentum).dampening(dampening).nesterov(nesterov).weight_decay(5e-4));
  torch::optim::SGD theirs(b->parameters(), torch::optim::SGDOptions(0.1)
                                                .momentum(momentum)
                                                .dampening(dampening)
                                                .nesterov(nesterov)
                                                .weight_decay(5e-4));
  EXPECT_LE(run_side_by_side(ours, a, theirs, b, 100), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Optim, TorchMatch,
                         ::testing::Values(std::make_tuple(0.9, 0.0, false), std::make_tuple(0.0, 0.0, false),
                                           std::make_tuple(0.9, 0.0, true), std::make_tuple(0.5, 0.3, false)));

TEST(Optim, AdamMatchesTorchAdam) {
  for (bool amsgrad : {false, true}) {
    torch::manual_seed(2);
    auto a = small_mlp(), b = small_mlp();
    copy_parameters(a, b);
    mep::Adam ours(a->parameters(), mep::AdamOptions(1e-3).weight_decay(5e-4).amsgrad(amsgrad));
    torch::optim::Adam theirs(b->parameters(), torch::optim::AdamOptions(1e-3).weight_decay(5e-4).amsgrad(amsgrad));
    EXPECT_LE(run_side_by_side(ours, a, theirs, b, 100), 1e-6) << "amsgrad " << amsgrad;
  }
}

TEST(Optim, ReferencePresetsHaveTheReferenceDefaults) {
  EXPECT_DOUBLE_EQ(mep::reference::SGDOptions().lr(), 0.1);
  EXPECT_DOUBLE_EQ(mep::reference::SGDOptions().momentum(), 0.9);
  EXPECT_DOUBLE_EQ(mep::reference::SGDOptions().weight_decay(), 5e-4);
  EXPECT_DOUBLE_EQ(mep::reference::AdamOptions().lr(), 1e-3);
  EXPECT_DOUBLE_EQ(mep::reference::AdamOptions().weight_decay(), 5e-4);
  EXPECT_DOUBLE_EQ(mep::reference::MuonOptions().lr(), 0.02);
  EXPECT_DOUBLE_EQ(mep::reference::MuonOptions().momentum(), 0.9);
  EXPECT_EQ(mep::reference::MuonOptions().ns_steps(), 5);
  EXPECT_EQ(mep::reference::MuonOptions().ns_coefficients(), mep::NSCoefficients::Cubic);
  EXPECT_DOUBLE_EQ(mep::reference::MuonOptions().gamma(), 0.95);
  EXPECT_DOUBLE_EQ(mep::reference::EqPropOptions().lr(), 0.01);
  EXPECT_DOUBLE_EQ(mep::EqPropOptions().lr(), 0.05);
  EXPECT_DOUBLE_EQ(mep::SMEPOptions().lr(), 0.01);
  EXPECT_DOUBLE_EQ(mep::SMEPOptions().momentum(), 0.9);
  EXPECT_DOUBLE_EQ(mep::SMEPOptions().weight_decay(), 5e-4);
  // Setters of different policies chain on one options object.
  auto o = mep::reference::MuonOptions(0.05).ns_steps(3).gamma(0.9).momentum(0.8).ns_coefficients(
      mep::NSCoefficients::Quintic);
  EXPECT_EQ(o.ns_steps(), 3);
  EXPECT_DOUBLE_EQ(o.gamma(), 0.9);
  EXPECT_DOUBLE_EQ(o.get_lr(), 0.05);
}

// ---- Newton-Schulz ------------------------------------------------------------------

TEST(NewtonSchulz, CubicEqualsTheFormulaComputedDirectly) {
  torch::manual_seed(3);
  for (auto shape : {std::vector<int64_t>{40, 25}, std::vector<int64_t>{25, 40}, std::vector<int64_t>{30, 30}}) {
    auto g = torch::randn(shape, torch::kFloat64);
    auto x = g / g.norm().clamp(1e-4, 1e4);
    auto eye = torch::eye(shape[1], torch::kFloat64);
    for (int k = 0; k < 5; ++k) x = 0.5 * torch::mm(x, 3 * eye - torch::mm(x.t(), x));
    auto ours = mep::newton_schulz(g, 5, mep::NSCoefficients::Cubic);
    EXPECT_LE((ours - x).abs().max().item<double>(), 1e-12) << shape;
  }
}

TEST(NewtonSchulz, ZeroStepsGiveTheNormalisedGradient) {
  auto g = torch::randn({12, 7}, torch::kFloat64) * 3;
  auto u = mep::newton_schulz(g, 0, mep::NSCoefficients::Cubic);
  EXPECT_TRUE(torch::allclose(u, g / g.norm()));
  EXPECT_NEAR(u.norm().item<double>(), 1.0, 1e-12);
}

TEST(NewtonSchulz, QuinticSingularValuesAfterFiveSteps) {
  torch::manual_seed(4);
  for (auto shape : {std::vector<int64_t>{784, 256}, std::vector<int64_t>{256, 784}}) {
    auto s = torch::linalg_svdvals(mep::newton_schulz(torch::randn(shape), 5, mep::NSCoefficients::Quintic));
    EXPECT_GE(s.min().item<double>(), 0.68) << shape;
    EXPECT_LE(s.max().item<double>(), 1.2) << shape;
  }
  // A square Gaussian matrix has singular values too close to 0 for five steps to lift
  // them all; at least 95 % must be in range.
  auto s = torch::linalg_svdvals(mep::newton_schulz(torch::randn({256, 256}), 5, mep::NSCoefficients::Quintic));
  const double inside = ((s >= 0.68) & (s <= 1.2)).to(torch::kFloat64).mean().item<double>();
  EXPECT_GE(inside, 0.95);
}

TEST(NewtonSchulz, PolarExpressConvergesTowardsThePolarFactor) {
  torch::manual_seed(5);
  auto g = torch::randn({128, 64}, torch::kFloat64);
  auto s = torch::linalg_svdvals(mep::newton_schulz(g, 8, mep::NSCoefficients::PolarExpress));
  EXPECT_GE(s.min().item<double>(), 0.9);
  EXPECT_LE(s.max().item<double>(), 1.1);
}

TEST(NewtonSchulz, PolicyKeepsShapesPassesVectorsAndScales) {
  mep::NewtonSchulz ns;
  mep::ParamState st;
  auto bias = torch::randn({10});
  EXPECT_TRUE(torch::equal(ns.direction(bias, st), bias));
  auto kernel = torch::randn({8, 3, 3, 3});
  auto u = ns.direction(kernel, st);
  EXPECT_EQ(u.sizes(), kernel.sizes());
  ns.scale = mep::NSScale::Muon;
  auto tall = torch::randn({64, 16});
  EXPECT_NEAR(ns.direction(tall, st).norm().item<double>() / mep::newton_schulz(tall, 5).norm().item<double>(), 2.0,
              1e-5);
}

// ---- Spectral constraint ----------------------------------------------------------

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
    EXPECT_TRUE(st.buffers.empty());  // no state
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

// ---- Error feedback ----------------------------------------------------------------

TEST(ErrorFeedback, FollowsItsRecurrence) {
  mep::ErrorFeedback ef;
  ef.enabled = true, ef.beta = 0.5, ef.max_grad_norm = 1.0, ef.rule = mep::ErrorRule::Reference;
  mep::ParamState st;
  auto g = torch::tensor({0.3, -0.2, 0.1}, torch::kFloat64);
  EXPECT_TRUE(torch::equal(ef.accumulate(g, st), g));  // no buffer yet
  auto u = torch::tensor({1.0, 0.0, -5.0}, torch::kFloat64);
  ef.remember(g, u, st);
  auto e1 = (g - u).clamp(-2.0, 2.0);  // β·0 + (g_aug − u), clamped to ±2·max_grad_norm
  EXPECT_TRUE(torch::allclose(st.get("error_feedback"), e1));
  auto g_aug = ef.accumulate(g, st);
  EXPECT_TRUE(torch::allclose(g_aug, g + 0.5 * e1));
  // The reference rule counts the buffer twice: with a constant g and u it grows like
  // (2β)^t; at β = 0.5 that is linear growth, e_t = t·(g − u) + ..., here checked for t = 2.
  ef.remember(g_aug, u, st);
  EXPECT_TRUE(torch::allclose(st.get("error_feedback"), (0.5 * e1 + g_aug - u).clamp(-2.0, 2.0)));
  // Projected: e ← g_aug − (⟨g_aug,u⟩/‖u‖²)·u, what u's direction dropped (no second β·e).
  ef.rule = mep::ErrorRule::Projected;
  mep::ParamState sp;
  sp.set("error_feedback", torch::full({3}, 0.4, torch::kFloat64));
  auto ga = ef.accumulate(g, sp);
  ef.remember(ga, u, sp);
  auto r = ga - ((ga * u).sum() / (u * u).sum()) * u;
  EXPECT_TRUE(torch::allclose(sp.get("error_feedback"), r));
  EXPECT_NEAR((sp.get("error_feedback") * u).sum().item<double>(), 0.0, 1e-12);  // orthogonal to u
  ef.enabled = false;
  mep::ParamState off;
  ef.remember(g, u, off);
  EXPECT_FALSE(off.has("error_feedback"));
}

// ---- Options validation -----------------------------------------------------------

template <class F>
void expect_option_error(F&& make, const std::string& name) {
  try {
    make();
    ADD_FAILURE() << "no exception for " << name;
  } catch (const mep::OptionError& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
  }
}

TEST(Optim, InvalidOptionsThrowNamingTheOption) {
  auto params = small_mlp()->parameters();
  expect_option_error([&] { mep::SGD(params, mep::SGDOptions(0.0)); }, "lr");
  expect_option_error([&] { mep::SGD(params, mep::SGDOptions(-1)); }, "lr");
  expect_option_error([&] { mep::SGD(params, mep::SGDOptions(0.1).momentum(1.0)); }, "momentum");
  expect_option_error([&] { mep::SGD(params, mep::SGDOptions(0.1).momentum(-0.1)); }, "momentum");
  expect_option_error([&] { mep::SGD(params, mep::SGDOptions(0.1).weight_decay(-1)); }, "weight_decay");
  expect_option_error([&] { mep::reference::Muon(params, mep::reference::MuonOptions(0.02).gamma(0.0)); }, "gamma");
  expect_option_error([&] { mep::reference::Muon(params, mep::reference::MuonOptions(0.02).gamma(1.5)); }, "gamma");
  expect_option_error([&] { mep::reference::Muon(params, mep::reference::MuonOptions(0.02).ns_steps(-1)); },
                      "ns_steps");
  expect_option_error([&] { mep::Adam(params, mep::AdamOptions(1e-3).betas({1.0, 0.999})); }, "betas");
  // Per-group options are validated too.
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(params, std::make_unique<mep::SGDOptions>(mep::SGDOptions(-0.5)));
  expect_option_error([&] { mep::SGD(groups, mep::SGDOptions(0.1)); }, "lr");
}

// ---- Robustness -------------------------------------------------------------------

TEST(Optim, NonFiniteGradientUpdatesNothing) {
  auto model = small_mlp();
  mep::reference::Muon opt(model->parameters(), mep::reference::MuonOptions(0.02));
  auto before = model->parameters();
  for (auto& p : before) p = p.detach().clone();
  auto params = model->parameters();
  for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
  params.back().mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  try {
    opt.step();
    FAIL() << "expected an exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite gradient"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("parameter 3"), std::string::npos) << e.what();
  }
  EXPECT_EQ(max_abs_diff(before, model->parameters()), 0.0);
}

// The same for the optimizers whose steps skip the rollback copies: a non-finite gradient
// is still named, and nothing changes.
TEST(Optim, NonFiniteGradientUpdatesNothingInSGDAndAdam) {
  const auto check = [](auto&& make, const char* name) {
    auto model = small_mlp();
    auto opt = make(model->parameters());
    auto before = model->parameters();
    for (auto& p : before) p = p.detach().clone();
    auto params = model->parameters();
    for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
    params.back().mutable_grad()[0] = std::numeric_limits<float>::infinity();
    try {
      opt.step();
      ADD_FAILURE() << name << ": expected an exception";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("parameter 3"), std::string::npos) << name << ": " << e.what();
    }
    EXPECT_EQ(max_abs_diff(before, model->parameters()), 0.0) << name;
    for (const auto& p : params) EXPECT_FALSE(opt.has_state(p)) << name;
  };
  check([](auto params) { return mep::SGD(params, mep::SGDOptions(0.1).momentum(0.9)); }, "sgd");
  check([](auto params) { return mep::Adam(params, mep::AdamOptions(1e-3)); }, "adam");
}

// SGD and Adam bound their update by the ranges of its inputs and, when the bound is finite,
// update in place without copies (no backup is made). Where it is not — values near the
// float limit, or Adam with ε = 0, where m = v = 0 gives 0/0 — the step takes the
// transactional path, and an update that overflows or divides 0 by 0 is rolled back whole.
template <class Opt>
struct BackupProbe : Opt {
  using Opt::Opt;
  size_t backups() const { return this->backups_.size(); }
};

TEST(Optim, BoundedStepsMakeNoCopiesAndUnboundedOnesRollBack) {
  torch::manual_seed(3);
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  auto model = small_mlp();
  BackupProbe<mep::SGD> sgd(model->parameters(), mep::SGDOptions(1.0).momentum(0.9));
  for (int i = 0; i < 3; ++i) {
    sgd.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    sgd.step();
  }
  EXPECT_EQ(sgd.backups(), 0u);

  // One weight near the float limit, its gradient pushing it past: W − lr·(μm + g) overflows.
  auto params = model->parameters();
  {
    torch::NoGradGuard no_grad;
    params[0][0][0].fill_(3e38f);
  }
  for (auto& p : params) p.mutable_grad() = torch::zeros_like(p);
  params[0].mutable_grad()[0][0] = -3e38f;
  auto before = params;
  for (auto& p : before) p = p.detach().clone();
  std::vector<torch::Tensor> momentum;
  for (const auto& p : params) momentum.push_back(sgd.state_of(p).get("momentum").clone());
  try {
    sgd.step();
    FAIL() << "expected an exception";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite parameter"), std::string::npos) << e.what();
  }
  EXPECT_GT(sgd.backups(), 0u);  // the transactional path ran
  EXPECT_EQ(max_abs_diff(before, params), 0.0);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(sgd.state_of(params[i]).step, 3);
    EXPECT_TRUE(sgd.state_of(params[i]).get("momentum").equal(momentum[i])) << i;
  }

  // The range of a state buffer changed in place since the last step is read again: here a
  // momentum near the float limit, which with lr = 2 takes W − lr·μ·m past it.
  auto other = small_mlp();
  BackupProbe<mep::SGD> sgd2(other->parameters(), mep::SGDOptions(1.0).momentum(0.9));
  auto op = other->parameters();
  for (auto& p : op) p.mutable_grad() = torch::full_like(p, 1e-3);
  sgd2.step();
  EXPECT_EQ(sgd2.backups(), 0u);
  {
    torch::NoGradGuard no_grad;
    sgd2.state_of(op[0]).get("momentum").fill_(3.3e38f);
  }
  sgd2.param_groups()[0].options().set_lr(2.0);
  auto other_before = op;
  for (auto& p : other_before) p = p.detach().clone();
  EXPECT_THROW(sgd2.step(), std::runtime_error);
  EXPECT_GT(sgd2.backups(), 0u);
  EXPECT_EQ(max_abs_diff(other_before, op), 0.0);

  // So is a buffer replaced by another (here through the state, as a load does).
  sgd2.param_groups()[0].options().set_lr(1.0);
  for (auto& p : op) p.mutable_grad() = torch::full_like(p, 1e-3);
  {
    torch::NoGradGuard no_grad;
    sgd2.state_of(op[0]).get("momentum").zero_();
  }
  sgd2.step();
  sgd2.state_of(op[0]).set("momentum", torch::full_like(op[0], 3.3e38f));
  sgd2.param_groups()[0].options().set_lr(2.0);
  for (size_t i = 0; i < op.size(); ++i) other_before[i] = op[i].detach().clone();
  EXPECT_THROW(sgd2.step(), std::runtime_error);
  EXPECT_EQ(max_abs_diff(other_before, op), 0.0);

  // Adam with ε = 0 on a zero gradient: m = v = 0, so u = 0/0.
  auto fresh = small_mlp();
  BackupProbe<mep::Adam> adam(fresh->parameters(), mep::AdamOptions(1e-3).eps(0).weight_decay(0));
  auto fp = fresh->parameters();
  for (auto& p : fp) p.mutable_grad() = torch::zeros_like(p);
  auto fresh_before = fp;
  for (auto& p : fresh_before) p = p.detach().clone();
  EXPECT_THROW(adam.step(), std::runtime_error);
  EXPECT_GT(adam.backups(), 0u);
  EXPECT_EQ(max_abs_diff(fresh_before, fp), 0.0);
  for (const auto& p : fp) EXPECT_FALSE(adam.has_state(p));
}

TEST(Optim, StepWithBatchNeedsTheModel) {
  auto model = small_mlp();
  mep::SGD opt(model->parameters(), mep::SGDOptions(0.1));
  EXPECT_THROW(opt.step(torch::randn({4, 20}), torch::zeros({4}, torch::kLong)), std::logic_error);
}

TEST(Optim, StepWithBatchEqualsBackwardThenStep) {
  torch::manual_seed(8);
  auto a = small_mlp(), b = small_mlp();
  copy_parameters(a, b);
  mep::Adam with_model(a, mep::AdamOptions(1e-3));
  mep::Adam plain(b->parameters(), mep::AdamOptions(1e-3));
  auto x = torch::randn({8, 20});
  auto y = torch::randint(0, 10, {8}, torch::kLong);
  for (int s = 0; s < 5; ++s) {
    auto loss = with_model.step(x, y);
    plain.zero_grad();
    auto ref = torch::nn::functional::cross_entropy(b->forward(x), y);
    ref.backward();
    plain.step();
    EXPECT_FLOAT_EQ(loss.item<float>(), ref.item<float>());
  }
  EXPECT_LE(max_abs_diff(a->parameters(), b->parameters()), 1e-7);
}

TEST(Optim, BadTargetsAreRejectedBeforeAnyWork) {
  auto model = small_mlp();
  mep::SGD opt(model, mep::SGDOptions(0.1));
  auto before = model->parameters()[0].detach().clone();
  auto x = torch::randn({4, 20});
  EXPECT_THROW(opt.step(x, torch::zeros({5}, torch::kLong)), mep::TargetError);
  EXPECT_THROW(opt.step(x, torch::full({4}, 10, torch::kLong)), mep::TargetError);
  EXPECT_THROW(opt.step(x, torch::full({4, 10}, NAN)), mep::TargetError);
  EXPECT_THROW(opt.step(x, torch::zeros({4}, torch::kInt)), mep::TargetError);
  EXPECT_TRUE(torch::equal(before, model->parameters()[0]));
}

TEST(Optim, ParameterGroupsKeepTheirOwnLearningRate) {
  auto model = small_mlp();
  auto params = model->parameters();
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{params[0], params[1]});
  groups.emplace_back(std::vector<torch::Tensor>{params[2], params[3]},
                      std::make_unique<mep::SGDOptions>(mep::SGDOptions(1e-3).momentum(0).weight_decay(0)));
  mep::SGD opt(groups, mep::SGDOptions(0.5).momentum(0).weight_decay(0));
  auto before = params[2].detach().clone();
  auto before0 = params[0].detach().clone();
  for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
  opt.step();
  EXPECT_NEAR((before - params[2]).abs().max().item<double>(), 1e-3, 1e-6);
  EXPECT_NEAR((before0 - params[0]).abs().max().item<double>(), 0.5, 1e-6);
}

// ---- Save / load --------------------------------------------------------------------

// Bit-identical resume of all eight optimizers: test_ep_optim.cpp.

TEST(Optim, LoadRejectsAMismatchedArchiveAndKeepsItsState) {
  auto a = small_mlp();
  mep::SGD opt(a, mep::SGDOptions(0.1).momentum(0.9));
  opt.step(torch::randn({4, 20}), torch::zeros({4}, torch::kLong));
  const auto path = (std::filesystem::temp_directory_path() / "mep_test_optim_mismatch.pt").string();
  torch::save(opt, path);
  auto other = torch::nn::Sequential(torch::nn::Linear(20, 10));
  mep::SGD small(other, mep::SGDOptions(0.1).momentum(0.9));
  small.step(torch::randn({4, 20}), torch::zeros({4}, torch::kLong));
  auto momentum = small.state_of(other->parameters()[0]).get("momentum").clone();
  EXPECT_THROW(torch::load(small, path), std::runtime_error);
  std::remove(path.c_str());
  EXPECT_TRUE(torch::equal(small.state_of(other->parameters()[0]).get("momentum"), momentum));
}

// ---- Enums: one table of names; error feedback's rules -------------------------------

template <class E>
void expect_printed_by_table(const std::vector<std::pair<E, std::string>>& expected) {
  static_assert(mep::has_enum_names_v<E>);
  std::vector<std::pair<E, std::string>> table;
  for (const auto& [value, name] : enum_names(E{})) table.emplace_back(value, name);
  EXPECT_EQ(table, expected);
  for (const auto& [value, name] : expected) {
    std::ostringstream os;
    os << value;
    EXPECT_EQ(os.str(), name);
    EXPECT_EQ(mep::detail::option_text(value), name);
    EXPECT_STREQ(mep::enum_name(value), name.c_str());
  }
  std::ostringstream os;
  os << static_cast<E>(7);  // outside the table: its number
  EXPECT_EQ(os.str(), "7");
  EXPECT_EQ(mep::enum_name(static_cast<E>(7)), nullptr);
}

TEST(Enums, PrintAndValidateByTheirOneTable) {
  expect_printed_by_table<mep::Loss>(
      {{mep::Loss::MSE, "mse"}, {mep::Loss::CrossEntropy, "ce"}, {mep::Loss::NLL, "nll"}});
  expect_printed_by_table<mep::NSCoefficients>({{mep::NSCoefficients::Cubic, "cubic"},
                                                {mep::NSCoefficients::Quintic, "quintic"},
                                                {mep::NSCoefficients::PolarExpress, "polar_express"}});
  expect_printed_by_table<mep::NSScale>(
      {{mep::NSScale::None, "none"}, {mep::NSScale::Muon, "muon"}, {mep::NSScale::AdamW, "adamw"}});
  expect_printed_by_table<mep::SpectralMode>({{mep::SpectralMode::Scale, "scale"}, {mep::SpectralMode::Clip, "clip"}});
  expect_printed_by_table<mep::ErrorRule>(
      {{mep::ErrorRule::Projected, "projected"}, {mep::ErrorRule::Reference, "reference"}});
  expect_printed_by_table<mep::Mode>({{mep::Mode::EP, "ep"}, {mep::Mode::Backprop, "backprop"}});
  EXPECT_STREQ(mep::to_string(mep::Loss::NLL), "nll");
  static_assert(!mep::has_enum_names_v<int> && !mep::has_enum_names_v<torch::ScalarType>);

  // A value outside the table is refused with the table's names, by MEP_CHECK_ENUM_OPTION.
  auto message = [](const auto& options) {
    try {
      options.validate();
    } catch (const mep::OptionError& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(message(mep::SGDOptions(0.1).loss(static_cast<mep::Loss>(9))),
            "mep: invalid option loss = 9 (expected one of mse, ce, nll)");
  EXPECT_EQ(message(mep::SMEPOptions().error_rule(static_cast<mep::ErrorRule>(-1))),
            "mep: invalid option error_rule = -1 (expected one of projected, reference)");
  EXPECT_EQ(message(mep::SMEPOptions().ns_scale(static_cast<mep::NSScale>(3))),
            "mep: invalid option ns_scale = 3 (expected one of none, muon, adamw)");
  EXPECT_EQ(message(mep::SMEPOptions().spectral_mode(static_cast<mep::SpectralMode>(2))),
            "mep: invalid option spectral_mode = 2 (expected one of scale, clip)");
  EXPECT_EQ(message(mep::MuonOptions().ns_coefficients(static_cast<mep::NSCoefficients>(5))),
            "mep: invalid option ns_coefficients = 5 (expected one of cubic, quintic, polar_express)");
  EXPECT_EQ(message(mep::SMEPOptions().error_rule(mep::ErrorRule::Reference)), "");
}

TEST(ErrorFeedback, DefaultRuleIsProjectedAndReferenceKeepsTheReferenceRule) {
  EXPECT_EQ(mep::ErrorFeedback().rule, mep::ErrorRule::Projected);
  EXPECT_FALSE(mep::ErrorFeedback().enabled);
  EXPECT_EQ(mep::SMEPOptions().error_rule(), mep::ErrorRule::Projected);
  EXPECT_FALSE(mep::SMEPOptions().error_feedback());
  EXPECT_EQ(mep::SDMEPOptions().error_rule(), mep::ErrorRule::Projected);
  EXPECT_EQ(mep::reference::SMEPOptions().error_rule(), mep::ErrorRule::Projected);

  // By name, as mep_bench records and sets it.
  auto o = mep::SMEPOptions().error_feedback(true);
  const auto texts = o.texts();
  EXPECT_NE(std::find(texts.begin(), texts.end(), std::make_pair(std::string("error_rule"), std::string("projected"))),
            texts.end());
  EXPECT_TRUE(o.set("error_rule", "reference"));
  EXPECT_EQ(o.error_rule(), mep::ErrorRule::Reference);
  try {
    o.set("error_rule", "doubled");
    ADD_FAILURE() << "no error for error_rule = doubled";
  } catch (const mep::OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("one of projected, reference"), std::string::npos) << e.what();
  }

  // The policies built from the options follow each rule's recurrence, from a buffer e₀.
  const auto g = torch::tensor({0.3, -0.2, 0.1}, torch::kFloat64);
  const auto u = torch::tensor({1.0, 0.0, -5.0}, torch::kFloat64);
  const auto e0 = torch::tensor({0.4, -0.1, 0.2}, torch::kFloat64);
  auto follow = [&](const mep::ErrorFeedback& ef) {
    mep::ParamState st;
    st.set("error_feedback", e0.clone());
    auto g_aug = ef.accumulate(g, st);
    EXPECT_TRUE(torch::allclose(g_aug, g + 0.9 * e0));
    ef.remember(g_aug, u, st);
    return std::make_pair(g_aug, st.get("error_feedback").clone());
  };
  const auto [ga, projected] = follow(mep::ErrorFeedback(mep::SMEPOptions().error_feedback(true)));
  EXPECT_TRUE(torch::allclose(projected, ga - ((ga * u).sum() / (u * u).sum()) * u));
  const auto [gr, reference] =
      follow(mep::ErrorFeedback(mep::SMEPOptions().error_feedback(true).error_rule(mep::ErrorRule::Reference)));
  EXPECT_TRUE(torch::allclose(reference, (0.9 * e0 + gr - u).clamp(-20.0, 20.0)));  // β_ef·e counted twice

  // Whole optimizers: the default is the projected rule, bit for bit; the reference rule differs.
  auto train = [](const mep::SMEPOptions& options) {
    torch::manual_seed(3);
    auto model = small_mlp();
    mep::SMEP opt(model, options);
    auto x = torch::randn({8, 20});
    auto y = torch::randint(0, 10, {8}, torch::kLong);
    for (int step = 0; step < 3; ++step) opt.step(x, y);
    return model->parameters();
  };
  const auto by_default = train(mep::SMEPOptions().error_feedback(true));
  const auto projected_params = train(mep::SMEPOptions().error_feedback(true).error_rule(mep::ErrorRule::Projected));
  const auto reference_params = train(mep::SMEPOptions().error_feedback(true).error_rule(mep::ErrorRule::Reference));
  EXPECT_EQ(max_abs_diff(by_default, projected_params), 0.0);
  EXPECT_GT(max_abs_diff(by_default, reference_params), 0.0);
}

struct NSOnly : mep::NewtonSchulz::Options<NSOnly> {};
struct FisherOnly : mep::FisherNewtonSchulz::Options<FisherOnly> {};
struct MuonOnly : mep::MuonUpdate::Options<MuonOnly> {};
struct DionOnly : mep::Dion::Options<DionOnly> {};

TEST(NewtonSchulz, OneOutputScaleForEveryPolicy) {
  torch::manual_seed(12);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::None, 60, 20), 1.0);
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::Muon, 60, 20), std::sqrt(3.0));
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::Muon, 20, 60), 1.0);
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::AdamW, 20, 60), 0.2 * std::sqrt(60.0));
  for (auto scale : {mep::NSScale::None, mep::NSScale::Muon, mep::NSScale::AdamW}) {
    for (auto shape : {std::vector<int64_t>{30, 20}, std::vector<int64_t>{20, 30}}) {
      const auto g = torch::randn(shape, f64);
      const double s = mep::ns_output_scale(scale, shape[0], shape[1]);
      mep::ParamState a, b;
      // Newton-Schulz: s·NS(g).
      const auto plain = mep::newton_schulz(g, 5, mep::NSCoefficients::Cubic);
      const auto u = mep::NewtonSchulz(NSOnly().ns_scale(scale)).direction(g, a);
      EXPECT_TRUE(torch::equal(u, s == 1.0 ? plain : plain * s)) << scale;
      // Fisher: s times its unscaled direction.
      const auto unscaled = mep::FisherNewtonSchulz(FisherOnly()).direction(g, a);
      const auto scaled = mep::FisherNewtonSchulz(FisherOnly().ns_scale(scale)).direction(g, b);
      EXPECT_TRUE(torch::equal(scaled, s == 1.0 ? unscaled : unscaled * s)) << scale;
      // Muon: s is its learning-rate factor.
      EXPECT_EQ(mep::MuonUpdate(MuonOnly().ns_scale(scale)).lr_scale(g), s) << scale;
    }
  }

  // Dion's own update is scaled by Muon's rule whatever ns_scale: ‖u‖_F = s·√r (P orthonormal,
  // Q's columns of norm 1 − O(1e-8)).
  const mep::Dion dion(DionOnly().dion_thresh(0));
  EXPECT_EQ(mep::Dion::own_scale, mep::NSScale::Muon);
  for (auto shape : {std::vector<int64_t>{60, 20}, std::vector<int64_t>{20, 60}}) {
    mep::ParamState st;
    const auto u = dion.direction(torch::randn(shape, f64), st);
    const double r = static_cast<double>(dion.rank_for(shape[0], shape[1]));
    EXPECT_NEAR(u.norm().item<double>() / std::sqrt(r), mep::ns_output_scale(mep::NSScale::Muon, shape[0], shape[1]),
                1e-6);
  }
  // ...so a Dion update refuses any ns_scale but none, naming it.
  EXPECT_NO_THROW(DionOnly().validate());
  for (auto scale : {mep::NSScale::Muon, mep::NSScale::AdamW}) {
    try {
      mep::SDMEP opt(small_mlp(), mep::SDMEPOptions().ns_scale(scale));
      ADD_FAILURE() << "no error for SDMEP with ns_scale " << scale;
    } catch (const mep::OptionError& e) {
      std::ostringstream shown;
      shown << "ns_scale = " << scale << " (expected none with Dion";
      EXPECT_NE(std::string(e.what()).find(shown.str()), std::string::npos) << e.what();
    }
  }
}

}  // namespace
