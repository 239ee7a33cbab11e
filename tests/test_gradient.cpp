// EP gradients against autograd backprop, and the settling engine's invariants.
// Registered with the prefix "gradient." so that `ctest -R gradient` selects the suite.
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <mep/mep.hpp>
#include <torch/version.h>

#include <atomic>

namespace {

namespace nn = torch::nn;

struct Case {
  std::string name;
  std::function<nn::Sequential()> model;
  std::vector<int64_t> input;
  bool class_targets;
};

nn::Sequential scaled(nn::Sequential m, double factor = 0.6) {
  m->to(torch::kFloat64);
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.mul_(factor);
  return m;
}

std::vector<Case> cases() {
  return {
      {"tanh_mlp_float_targets",
       [] { return scaled(nn::Sequential(nn::Linear(6, 8), nn::Tanh(), nn::Linear(8, 7), nn::Tanh(), nn::Linear(7, 4))); },
       {5, 6},
       false},
      {"sigmoid_mlp_class_targets",
       [] { return scaled(nn::Sequential(nn::Linear(6, 10), nn::Sigmoid(), nn::Linear(10, 3))); }, {5, 6}, true},
      {"softplus_mlp_4_layers",
       [] {
         return scaled(nn::Sequential(nn::Linear(6, 9), nn::Softplus(), nn::Linear(9, 8), nn::Softplus(),
                                      nn::Linear(8, 7), nn::Softplus(), nn::Linear(7, 3)));
       },
       {5, 6},
       true},
      {"batchnorm_layernorm_eval_mode",
       [] {
         auto m = scaled(nn::Sequential(nn::Linear(6, 9), nn::BatchNorm1d(9), nn::Tanh(), nn::Linear(9, 8),
                                        nn::LayerNorm(nn::LayerNormOptions({8})), nn::Tanh(), nn::Linear(8, 3)));
         torch::NoGradGuard no_grad;  // non-trivial running statistics, then inference mode
         for (auto& b : m->buffers())
           if (b.dim() == 1 && b.is_floating_point()) b.uniform_(0.5, 1.5);
         m->eval();
         return m;
       },
       {5, 6},
       true},
      {"conv_avgpool_linear",
       [] {
         return scaled(nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 3, 3).padding(1)), nn::Tanh(), nn::AvgPool2d(2),
                                      nn::Flatten(), nn::Linear(3 * 4 * 4, 5)));
       },
       {4, 2, 8, 8},
       true},
  };
}

torch::Tensor make_target(const Case& c, nn::Sequential& m, const torch::Tensor& x) {
  auto out_dim = m->forward(x).size(1);
  if (c.class_targets) return torch::randint(0, out_dim, {x.size(0)}, torch::kLong);
  return torch::randn({x.size(0), out_dim}, torch::kFloat64) * 0.5;
}

std::vector<torch::Tensor> backprop(nn::Sequential& m, const torch::Tensor& x, const torch::Tensor& y, mep::Loss loss,
                                    double smoothing = 0.0) {
  auto value = mep::loss_value(loss, m->forward(x), y, smoothing);
  return torch::autograd::grad({value}, m->parameters());
}

std::vector<torch::Tensor> ep_grads(nn::Sequential& m, const torch::Tensor& x, const torch::Tensor& y, double beta,
                                    bool symmetric, mep::Loss loss = mep::Loss::MSE) {
  mep::EPGradient ep(mep::EPGradientOptions()
                         .beta(beta)
                         .symmetric(symmetric)
                         .settle_steps(1000)
                         .settle_lr(0.2)
                         .tol(0)
                         .adaptive(false)
                         .loss(loss));
  ep.compute(m, x, y);
  std::vector<torch::Tensor> g;
  for (auto& p : m->parameters()) g.push_back(p.grad().clone());
  return g;
}

double relative_error(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]).pow(2).sum().item<double>();
    den += b[i].pow(2).sum().item<double>();
  }
  return std::sqrt(num / den);
}

class Equivalence : public ::testing::TestWithParam<size_t> {};

TEST_P(Equivalence, SymmetricEPMatchesBackpropAndErrorsShrinkAsTheorySays) {
  const Case c = cases()[GetParam()];
  torch::manual_seed(10 + GetParam());
  auto m = c.model();
  auto x = torch::randn(c.input, torch::kFloat64);
  auto y = make_target(c, m, x);
  auto bp = backprop(m, x, y, mep::Loss::MSE);
  const double sym3 = relative_error(ep_grads(m, x, y, 1e-3, true), bp);
  const double sym2 = relative_error(ep_grads(m, x, y, 1e-2, true), bp);
  const double one3 = relative_error(ep_grads(m, x, y, 1e-3, false), bp);
  const double one2 = relative_error(ep_grads(m, x, y, 1e-2, false), bp);
  std::cout << "[ measured ] " << c.name << ": symmetric " << sym2 << " (β=1e-2) " << sym3 << " (β=1e-3); one-sided "
            << one2 << " (β=1e-2) " << one3 << " (β=1e-3)\n";
  EXPECT_LE(sym3, 5e-5);
  EXPECT_LE(one3, 1e-2);
  EXPECT_NEAR(std::log10(sym2 / sym3), 2.0, 0.3);  // O(β²) bias: ~100× per 10× smaller β
  EXPECT_NEAR(std::log10(one2 / one3), 1.0, 0.3);  // O(β) bias: ~10×
}

INSTANTIATE_TEST_SUITE_P(Gradient, Equivalence, ::testing::Range<size_t>(0, 5),
                         [](const auto& info) { return cases()[info.param].name; });

TEST(Gradient, CrossEntropyNudgingMatchesLabelSmoothedCrossEntropy) {
  torch::manual_seed(20);
  auto m = scaled(nn::Sequential(nn::Linear(6, 8), nn::Tanh(), nn::Linear(8, 4)));
  auto x = torch::randn({5, 6}, torch::kFloat64);
  auto y = torch::randint(0, 4, {5}, torch::kLong);
  auto bp = backprop(m, x, y, mep::Loss::CrossEntropy, 0.1);
  const double err = relative_error(ep_grads(m, x, y, 1e-3, true, mep::Loss::CrossEntropy), bp);
  std::cout << "[ measured ] cross-entropy symmetric β=1e-3: " << err << "\n";
  EXPECT_LE(err, 1e-4);
}

// ∂E/∂s from the analytic path equals the autograd VJP path on every supported pair.
TEST(Gradient, AnalyticAndAutogradSettlingGradientsAgree) {
  using Make = std::function<nn::AnyModule()>;
  std::vector<std::pair<std::string, Make>> acts = {
      {"ReLU", [] { return nn::AnyModule(nn::ReLU()); }},
      {"LeakyReLU", [] { return nn::AnyModule(nn::LeakyReLU(nn::LeakyReLUOptions().negative_slope(0.1))); }},
      {"Sigmoid", [] { return nn::AnyModule(nn::Sigmoid()); }},
      {"Tanh", [] { return nn::AnyModule(nn::Tanh()); }},
      {"GELU", [] { return nn::AnyModule(nn::GELU()); }},
      {"GELU-tanh", [] { return nn::AnyModule(nn::GELU(nn::GELUOptions().approximate("tanh"))); }},
      {"SiLU", [] { return nn::AnyModule(nn::SiLU()); }},
      {"ELU", [] { return nn::AnyModule(nn::ELU(nn::ELUOptions().alpha(0.7))); }},
      {"Softplus", [] { return nn::AnyModule(nn::Softplus(nn::SoftplusOptions().beta(2).threshold(3))); }},
  };
  for (const auto& [name, act] : acts) {
    for (int conv = 0; conv < 3; ++conv) {
      torch::manual_seed(30 + conv);
      nn::Sequential m;
      torch::Tensor x;
      if (conv == 0) {
        m = nn::Sequential(nn::Linear(5, 6));
        m->push_back(act());
        m->push_back(nn::Linear(6, 3));
        x = torch::randn({4, 5});
      } else if (conv == 1) {
        m = nn::Sequential(nn::Conv2d(nn::Conv2dOptions(2, 3, 3).padding(1).stride(2)));
        m->push_back(act());
        m->push_back(nn::Conv2d(nn::Conv2dOptions(3, 2, 3).padding(1)));
        m->push_back(act());
        m->push_back(nn::Flatten());
        m->push_back(nn::Linear(2 * 4 * 4, 3));
        x = torch::randn({4, 2, 7, 7});
      } else {
        m = nn::Sequential(nn::Conv1d(nn::Conv1dOptions(2, 3, 3).padding(1)));
        m->push_back(act());
        m->push_back(nn::Flatten());
        m->push_back(nn::Linear(3 * 6, 3));
        x = torch::randn({4, 2, 6});
      }
      m->to(torch::kFloat64);
      x = x.to(torch::kFloat64);
      auto chain = mep::Chain::from(m);
      auto y = torch::randint(0, 3, {4}, torch::kLong);
      mep::Settler settler(chain, mep::Nudging{}, x, y);
      auto states = chain.feedforward(x);
      for (auto& s : states) s = s + 0.3 * torch::randn_like(s);  // away from equilibrium
      std::vector<torch::Tensor> ga(states.size()), gb(states.size());
      mep::Phase pa, pb;
      const double ea = settler.evaluate(states, 0.7, ga, true, pa);
      const double eb = settler.evaluate(states, 0.7, gb, false, pb);
      EXPECT_NEAR(ea, eb, 1e-12) << name;
      for (size_t l = 0; l < ga.size(); ++l)
        EXPECT_LE((ga[l] - gb[l]).abs().max().item<double>(), 1e-10) << name << " conv=" << conv << " state " << l;
    }
  }
}

// The allocation-free path for MLPs computes exactly what the general path computes.
TEST(Gradient, FastPathEqualsGeneralPath) {
  for (int variant = 0; variant < 3; ++variant) {
    torch::manual_seed(50 + variant);
    nn::Sequential m;
    if (variant == 0) m = nn::Sequential(nn::Flatten(), nn::Linear(12, 9), nn::ReLU(), nn::Dropout(0.2), nn::Linear(9, 4));
    if (variant == 1) m = nn::Sequential(nn::Linear(12, 9), nn::Tanh(), nn::Linear(9, 7), nn::Sigmoid(), nn::Linear(7, 4));
    if (variant == 2) m = nn::Sequential(nn::Linear(12, 9), nn::Linear(nn::LinearOptions(9, 4).bias(false)));
    m->to(torch::kFloat64);
    auto x = torch::randn({6, 12}, torch::kFloat64);
    auto y = torch::randint(0, 4, {6}, torch::kLong);
    auto chain = mep::Chain::from(m);
    mep::Settler settler(chain, mep::Nudging{}, x, y);
    ASSERT_TRUE(settler.fast_path()) << variant;
    auto states = chain.feedforward(x);
    for (auto& s : states) s = s + 0.3 * torch::randn_like(s);
    std::vector<torch::Tensor> ga, gb;
    mep::Phase pa, pb;
    const double ea = settler.evaluate_fast(states, 0.4, ga, pa);
    gb.resize(states.size());
    const double eb = settler.evaluate_general(states, 0.4, gb, true, pb);
    EXPECT_NEAR(ea, eb, 1e-12);
    for (size_t l = 0; l < ga.size(); ++l) {
      EXPECT_LE((ga[l] - gb[l]).abs().max().item<double>(), 1e-12) << variant << " state " << l;
      EXPECT_LE((pa.eps[l] - pb.eps[l]).abs().max().item<double>(), 1e-12);
    }
  }
}

// Counts CPU allocations while installed (LibTorch's default allocator underneath).
class CountingAllocator : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) const override {
    ++count;
    return base_->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#endif
  mutable std::atomic<int64_t> count{0};

 private:
  c10::Allocator* base_;
};

TEST(Gradient, SettlingStepsAllocateNothingOnTheFastPath) {
  torch::manual_seed(55);
  auto m = mep::models::mlp();
  auto x = torch::randn({32, 1, 28, 28});
  auto y = torch::randint(0, 10, {32}, torch::kLong);
  auto chain = mep::Chain::from(m);
  mep::Settler settler(chain, mep::Nudging{}, x, y);
  ASSERT_TRUE(settler.fast_path());
  auto init = chain.feedforward(x);
  mep::SettleConfig cfg;
  cfg.tol = 0;
  cfg.adaptive = true;
  auto* base = c10::GetCPUAllocator();
  CountingAllocator counting(base);
  auto allocations = [&](int64_t steps) {
    cfg.steps = steps;
    settler.settle(init, 0.5, cfg);  // warm-up: the workspace exists afterwards
    c10::SetCPUAllocator(&counting, /*priority=*/255);
    counting.count = 0;
    auto ph = settler.settle(init, 0.5, cfg);
    c10::SetCPUAllocator(base, /*priority=*/255);
    EXPECT_EQ(ph.steps, steps);
    return counting.count.load();
  };
  const auto few = allocations(5), many = allocations(50);
  std::cout << "[ measured ] allocations per settle call: " << few << " (5 steps), " << many << " (50 steps)\n";
  EXPECT_EQ(few, many);  // per-call setup only, nothing per step
}

TEST(Gradient, SkippingTheFreePhaseGivesTheSameGradients) {
  torch::manual_seed(40);
  auto m = scaled(nn::Sequential(nn::Linear(6, 8), nn::Tanh(), nn::Linear(8, 4)));
  auto x = torch::randn({5, 6}, torch::kFloat64);
  auto y = torch::randint(0, 4, {5}, torch::kLong);
  auto run = [&](bool free_phase) {
    mep::EPGradient ep(mep::EPGradientOptions().beta(0.1).settle_steps(30).free_phase(free_phase));
    ep.compute(m, x, y);
    std::vector<torch::Tensor> g;
    for (auto& p : m->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  auto skipped = run(false), explicit_free = run(true);
  for (size_t i = 0; i < skipped.size(); ++i) EXPECT_LE((skipped[i] - explicit_free[i]).abs().max().item<double>(), 1e-12);
}

TEST(Gradient, ASampleSettlesTheSameAloneAndInABatch) {
  torch::manual_seed(41);
  auto m = scaled(nn::Sequential(nn::Linear(6, 8), nn::ReLU(), nn::Linear(8, 8), nn::Tanh(), nn::Linear(8, 4)), 1.0);
  auto x = torch::randn({64, 6}, torch::kFloat64);
  auto y = torch::randint(0, 4, {64}, torch::kLong);
  auto chain = mep::Chain::from(m);
  mep::SettleConfig cfg;
  cfg.steps = 20, cfg.lr = 0.1;
  mep::Settler batch(chain, mep::Nudging{}, x, y);
  auto all = batch.settle(chain.feedforward(x), 0.5, cfg);
  auto x0 = x.slice(0, 3, 4), y0 = y.slice(0, 3, 4);
  mep::Settler alone(chain, mep::Nudging{}, x0, y0);
  auto one = alone.settle(chain.feedforward(x0), 0.5, cfg);
  for (size_t l = 0; l < one.states.size(); ++l)
    EXPECT_LE((one.states[l] - all.states[l].slice(0, 3, 4)).abs().max().item<double>(), 1e-12);
}

TEST(Gradient, LocalEPEqualsGlobalEPUnderIdenticalSettling) {
  torch::manual_seed(42);
  for (auto loss : {mep::Loss::MSE, mep::Loss::CrossEntropy}) {
    for (bool symmetric : {false, true}) {
      auto m = scaled(nn::Sequential(nn::Linear(6, 8), nn::Tanh(), nn::LayerNorm(nn::LayerNormOptions({8})),
                                     nn::Linear(8, 7), nn::ReLU(), nn::Linear(7, 4)));
      auto x = torch::randn({5, 6}, torch::kFloat64);
      auto y = torch::randint(0, 4, {5}, torch::kLong);
      auto opts = mep::EPGradientOptions().beta(0.2).settle_steps(15).symmetric(symmetric).loss(loss);
      mep::EPGradient global(opts);
      global.compute(m, x, y);
      std::vector<torch::Tensor> g;
      for (auto& p : m->parameters()) g.push_back(p.grad().clone());
      auto lopts = mep::LocalEPGradientOptions().beta(0.2).settle_steps(15).symmetric(symmetric).loss(loss);
      lopts.tol(1e-5).patience(3).adaptive(true);
      mep::LocalEPGradient local(lopts);
      local.compute(m, x, y);
      auto params = m->parameters();
      for (size_t i = 0; i < g.size(); ++i)
        EXPECT_LE((params[i].grad() - g[i]).abs().max().item<double>(), 1e-10) << "param " << i;
    }
  }
}

TEST(Gradient, DropoutIsIgnoredInTrainAndEvalMode) {
  torch::manual_seed(43);
  auto m = scaled(nn::Sequential(nn::Linear(6, 8), nn::ReLU(), nn::Dropout(0.5), nn::Linear(8, 4)), 1.0);
  auto x = torch::randn({16, 6}, torch::kFloat64);
  auto y = torch::randint(0, 4, {16}, torch::kLong);
  mep::EPGradient ep{mep::EPGradientOptions()};
  m->train();
  ep.compute(m, x, y);
  std::vector<torch::Tensor> g;
  for (auto& p : m->parameters()) g.push_back(p.grad().clone());
  m->eval();
  ep.compute(m, x, y);
  auto params = m->parameters();
  for (size_t i = 0; i < g.size(); ++i) EXPECT_TRUE(torch::equal(params[i].grad(), g[i]));
}

TEST(Gradient, DivergenceThrowsAndLeavesEverythingUntouched) {
  torch::manual_seed(44);
  auto m = nn::Sequential(nn::Linear(6, 8), nn::Tanh(), nn::Linear(8, 4));
  auto params = m->parameters();
  for (auto& p : params) p.mutable_grad() = torch::full_like(p, 7.0);
  std::vector<torch::Tensor> before;
  for (auto& p : params) before.push_back(p.detach().clone());
  mep::EPGradient ep(mep::EPGradientOptions().settle_lr(1e30).adaptive(false).settle_steps(50));
  try {
    ep.compute(m, torch::randn({4, 6}), torch::randint(0, 4, {4}, torch::kLong));
    FAIL() << "expected SettleError";
  } catch (const mep::SettleError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("step"), std::string::npos) << msg;
    EXPECT_NE(msg.find("settle_lr"), std::string::npos) << msg;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::equal(params[i], before[i]));
    EXPECT_TRUE(torch::equal(params[i].grad(), torch::full_like(params[i], 7.0)));
  }
}

// In train mode BatchNorm normalises with the batch's statistics, frozen during settling;
// the running statistics advance once per step, as a forward pass would, and not at all
// when the step fails.
TEST(Gradient, BatchNormRunningStatisticsAdvanceOncePerStep) {
  torch::manual_seed(45);
  auto bn = nn::BatchNorm1d(8);
  auto m = nn::Sequential(nn::Linear(6, 8), bn, nn::ReLU(), nn::Linear(8, 4));
  auto x = torch::randn({16, 6}) * 3 + 1;
  auto y = torch::randint(0, 4, {16}, torch::kLong);
  auto reference = nn::BatchNorm1d(8);
  {
    torch::NoGradGuard no_grad;
    reference->train();
    reference->forward(m[0]->as<nn::Linear>()->forward(x));  // one ordinary forward pass
  }
  mep::EPGradient ep{mep::EPGradientOptions()};
  ep.compute(m, x, y);
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
  EXPECT_TRUE(torch::allclose(bn->running_mean, reference->running_mean, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(bn->running_var, reference->running_var, 1e-5, 1e-6));
  EXPECT_THROW(ep.compute(m, x, torch::full({16}, 9, torch::kLong)), mep::TargetError);
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
}

TEST(Gradient, UnsupportedModuleIsNamed) {
  auto m = nn::Sequential(nn::Linear(6, 8), nn::Conv3d(nn::Conv3dOptions(1, 1, 1)), nn::Linear(8, 4));
  try {
    mep::Chain::from(m);
    FAIL() << "expected ChainError";
  } catch (const mep::ChainError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("Conv3d"), std::string::npos) << msg;
    EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
  }
}

TEST(Gradient, BadTargetsAndInputsAreRejectedBeforeAnyWork) {
  auto m = nn::Sequential(nn::Linear(6, 8), nn::Tanh(), nn::Linear(8, 4));
  mep::EPGradient ep{mep::EPGradientOptions()};
  auto x = torch::randn({4, 6});
  EXPECT_THROW(ep.compute(m, x, torch::zeros({3}, torch::kLong)), mep::TargetError);
  EXPECT_THROW(ep.compute(m, x, torch::full({4}, 4, torch::kLong)), mep::TargetError);
  EXPECT_THROW(ep.compute(m, x, torch::full({4, 4}, NAN)), mep::TargetError);
  EXPECT_THROW(ep.compute(m, x, torch::zeros({4, 5})), mep::TargetError);
  EXPECT_THROW(ep.compute(m, x.to(torch::kFloat64), torch::zeros({4}, torch::kLong)), std::invalid_argument);
  EXPECT_THROW(ep.compute(m, torch::full({4, 6}, NAN), torch::zeros({4}, torch::kLong)), std::invalid_argument);
  EXPECT_THROW(mep::EPGradient(mep::EPGradientOptions().beta(0)), mep::OptionError);
  EXPECT_THROW(mep::EPGradient(mep::EPGradientOptions().settle_steps(0)), mep::OptionError);
  EXPECT_THROW(mep::EPGradient(mep::EPGradientOptions().settle_lr(-1)), mep::OptionError);
}

}  // namespace
