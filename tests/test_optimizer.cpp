// The optimizers as a whole: composition of the policies, options (validation, by name),
// presets and their defaults, torch::optim compatibility (same steps, drop-in renaming,
// parameter groups, schedulers, checkpoints), save/load, and transactional steps.
#include <gtest/gtest.h>
#include <mep/mep.hpp>

#include "../bench/op_count.hpp"
#include "mnist_net.hpp"
#include "support.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>

// ---- Backprop optimizers against torch::optim, options, robustness, save/load ----------

namespace {

using mep_test::copy_parameters;
using mep_test::small_mlp;
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

// An update that overflows (values near the float limit) or divides 0 by 0 (Adam with ε = 0,
// where m = v = 0) is rolled back whole: parameters, state, step counts.
TEST(Optim, UpdatesThatOverflowOrDivideZeroByZeroRollBack) {
  torch::manual_seed(3);
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  auto model = small_mlp();
  mep::SGD sgd(model->parameters(), mep::SGDOptions(1.0).momentum(0.9));
  for (int i = 0; i < 3; ++i) {
    sgd.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    sgd.step();
  }

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
  EXPECT_EQ(max_abs_diff(before, params), 0.0);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_EQ(sgd.state_of(params[i]).step, 3);
    EXPECT_TRUE(sgd.state_of(params[i]).get("momentum").equal(momentum[i])) << i;
  }

  // The range of a state buffer changed in place since the last step is read again: here a
  // momentum near the float limit, which with lr = 2 takes W − lr·μ·m past it.
  auto other = small_mlp();
  mep::SGD sgd2(other->parameters(), mep::SGDOptions(1.0).momentum(0.9));
  auto op = other->parameters();
  for (auto& p : op) p.mutable_grad() = torch::full_like(p, 1e-3);
  sgd2.step();
  {
    torch::NoGradGuard no_grad;
    sgd2.state_of(op[0]).get("momentum").fill_(3.3e38f);
  }
  sgd2.param_groups()[0].options().set_lr(2.0);
  auto other_before = op;
  for (auto& p : other_before) p = p.detach().clone();
  EXPECT_THROW(sgd2.step(), std::runtime_error);
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
  mep::Adam adam(fresh->parameters(), mep::AdamOptions(1e-3).eps(0).weight_decay(0));
  auto fp = fresh->parameters();
  for (auto& p : fp) p.mutable_grad() = torch::zeros_like(p);
  auto fresh_before = fp;
  for (auto& p : fresh_before) p = p.detach().clone();
  EXPECT_THROW(adam.step(), std::runtime_error);
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

// Bit-identical resume of every optimizer: EPOptim.SaveLoadResumesBitIdenticallyForAllEight.

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

}  // namespace

// ---- Drop-in for torch::optim: renamed programs, defaults, checkpoints, parameter groups ----

namespace {

using ExampleNet = mep_test::NetImpl;  // pytorch/examples, cpp/mnist (mnist_net.hpp)

// One LibTorch training program, written once with `optim_ns` standing for torch::optim or mep:
// 50 steps of the example's loop with optimizer number `which`. Returns the parameters.
#define MEP_TEST_PROGRAM(NAME, optim_ns)                                                                              \
  std::vector<torch::Tensor> NAME(int which) {                                                                     \
    torch::manual_seed(0);                                                                                         \
    auto model = std::make_shared<ExampleNet>();                                                                   \
    std::unique_ptr<torch::optim::Optimizer> optimizer;                                                            \
    switch (which) {                                                                                               \
      case 0: optimizer = std::make_unique<optim_ns::SGD>(model->parameters(), optim_ns::SGDOptions(0.01)); break;      \
      case 1:                                                                                                      \
        optimizer = std::make_unique<optim_ns::SGD>(                                                                  \
            model->parameters(), optim_ns::SGDOptions(0.01).momentum(0.5).nesterov(true).weight_decay(1e-3));         \
        break;                                                                                                     \
      case 2: optimizer = std::make_unique<optim_ns::Adam>(model->parameters(), 1e-3); break;                         \
      case 3:                                                                                                      \
        optimizer = std::make_unique<optim_ns::Adam>(                                                                 \
            model->parameters(), optim_ns::AdamOptions(2e-4).betas(std::make_tuple(0.5, 0.5)).amsgrad(true));        \
        break;                                                                                                     \
      case 4: optimizer = std::make_unique<optim_ns::AdamW>(model->parameters(), optim_ns::AdamWOptions(1e-3)); break;   \
      default:                                                                                                     \
        optimizer = std::make_unique<optim_ns::AdamW>(model->parameters(),                                            \
                                                   optim_ns::AdamWOptions(1e-3).weight_decay(0.1).eps(1e-6));         \
    }                                                                                                              \
    model->train();                                                                                                \
    for (int step = 0; step < 50; ++step) {                                                                        \
      auto data = torch::randn({8, 1, 28, 28});                                                                    \
      auto target = torch::randint(0, 10, {8}, torch::kLong);                                                      \
      optimizer->zero_grad();                                                                                      \
      auto output = model->forward(data);                                                                          \
      auto loss = torch::nll_loss(output, target);                                                                 \
      loss.backward();                                                                                             \
      optimizer->step();                                                                                           \
    }                                                                                                              \
    std::vector<torch::Tensor> out;                                                                                \
    for (const auto& p : model->parameters()) out.push_back(p.detach().clone());                                   \
    return out;                                                                                                    \
  }
MEP_TEST_PROGRAM(with_torch_optim, torch::optim)
MEP_TEST_PROGRAM(with_mep, mep)
#undef MEP_TEST_PROGRAM

TEST(TorchOptim, RenamedProgramTakesTheSameSteps) {
  const char* names[] = {"SGD(0.01)", "SGD nesterov", "Adam(1e-3)", "Adam betas amsgrad", "AdamW(1e-3)", "AdamW wd"};
  for (int which = 0; which < 6; ++which) {
    const auto theirs = with_torch_optim(which), ours = with_mep(which);
    ASSERT_EQ(theirs.size(), ours.size());
    double moved = 0, worst = 0;
    torch::manual_seed(0);
    const auto initial = ExampleNet().parameters();
    for (size_t i = 0; i < ours.size(); ++i) {
      ASSERT_EQ(ours[i].scalar_type(), torch::kFloat);
      worst = std::max(worst, ((ours[i] - theirs[i]).abs().max() / theirs[i].abs().max()).item<double>());
      moved = std::max(moved, (theirs[i] - initial[i]).abs().max().item<double>());
    }
    std::cout << "[ measured ] " << names[which] << ": mep " << worst << " relative from torch::optim after 50 steps\n";
    EXPECT_LE(worst, 1e-6) << names[which];
    EXPECT_GT(moved, 1e-3) << names[which] << ": the program did not train";
  }
}

TEST(TorchOptim, DefaultsAreTorchOptimsDefaults) {
  static_assert(!std::is_default_constructible_v<mep::SGDOptions>, "SGDOptions needs a learning rate, as torch's");
  const torch::optim::SGDOptions ts(0.01);
  const mep::SGDOptions ms(0.01);
  EXPECT_EQ(ms.lr(), ts.lr());
  EXPECT_EQ(ms.momentum(), ts.momentum());
  EXPECT_EQ(ms.dampening(), ts.dampening());
  EXPECT_EQ(ms.weight_decay(), ts.weight_decay());
  EXPECT_EQ(ms.nesterov(), ts.nesterov());
  const torch::optim::AdamOptions ta;
  const mep::AdamOptions ma;
  EXPECT_EQ(ma.lr(), ta.lr());
  EXPECT_EQ(ma.betas(), ta.betas());
  EXPECT_EQ(ma.eps(), ta.eps());
  EXPECT_EQ(ma.weight_decay(), ta.weight_decay());
  EXPECT_EQ(ma.amsgrad(), ta.amsgrad());
  const torch::optim::AdamWOptions tw;
  const mep::AdamWOptions mw;
  EXPECT_EQ(mw.lr(), tw.lr());
  EXPECT_EQ(mw.betas(), tw.betas());
  EXPECT_EQ(mw.eps(), tw.eps());
  EXPECT_EQ(mw.weight_decay(), tw.weight_decay());
  EXPECT_EQ(mw.amsgrad(), tw.amsgrad());
  // torch.optim.Muon's defaults.
  const mep::MuonOptions mu;
  EXPECT_EQ(mu.lr(), 1e-3);
  EXPECT_EQ(mu.weight_decay(), 0.1);
  EXPECT_EQ(mu.momentum(), 0.95);
  EXPECT_TRUE(mu.nesterov());
  EXPECT_EQ(mu.ns_steps(), 5);
  EXPECT_EQ(mu.ns_coefficients(), mep::NSCoefficients::Quintic);
  EXPECT_EQ(mu.ns_scale(), mep::NSScale::Muon);
  // An option a preset ignores is not offered: Adam, AdamW and Muon carry their own moments.
  static_assert(mep::SGDOptions::has_momentum && !mep::AdamOptions::has_momentum &&
                !mep::AdamWOptions::has_momentum && !mep::reference::AdamOptions::has_momentum);
  for (const auto& [name, text] : mep::AdamOptions().texts())
    EXPECT_TRUE(name != "dampening" && name != "momentum" && name != "nesterov") << name;
  for (const auto& [name, text] : mep::MuonOptions().texts()) EXPECT_NE(name, "dampening");
}

TEST(TorchOptim, ATorchOptimCheckpointIsRefusedSayingSo) {
  torch::manual_seed(3);
  auto model = torch::nn::Sequential(torch::nn::Linear(4, 3));
  torch::optim::SGD theirs(model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (auto& p : model->parameters()) p.mutable_grad() = torch::ones_like(p);
  theirs.step();
  const auto path = (std::filesystem::temp_directory_path() / "mep_test_torch_optim.pt").string();
  torch::save(theirs, path);
  mep::SGD ours(model->parameters(), mep::SGDOptions(0.1).momentum(0.9));
  try {
    torch::load(ours, path);
    ADD_FAILURE() << "a torch::optim checkpoint was loaded";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("torch::optim"), std::string::npos) << what;
    EXPECT_NE(what.find("mep::SGD"), std::string::npos) << what;
  }
  std::remove(path.c_str());
  EXPECT_EQ(ours.state().size(), 0u);
}

// `what` names every piece in `pieces`.
void expect_names(const std::string& what, std::initializer_list<const char*> pieces) {
  for (const char* piece : pieces) EXPECT_NE(what.find(piece), std::string::npos) << "'" << piece << "' in: " << what;
}

template <class F>
std::string option_error_of(F&& f) {
  try {
    f();
  } catch (const mep::OptionError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no OptionError";
  return "";
}

TEST(TorchOptim, AddParamGroupChecksAsTheConstructorDoes) {
  auto model = torch::nn::Sequential(torch::nn::Linear(4, 3), torch::nn::Linear(3, 2));
  auto params = model->parameters();  // W₁, b₁, W₂, b₂
  mep::SGD opt(std::vector<torch::Tensor>{params[0], params[1]}, mep::SGDOptions(0.1));
  auto group = [&](std::unique_ptr<torch::optim::OptimizerOptions> options) {
    return torch::optim::OptimizerParamGroup(std::vector<torch::Tensor>{params[2], params[3]}, std::move(options));
  };
  expect_names(option_error_of([&] { opt.add_param_group(group(std::make_unique<torch::optim::SGDOptions>(0.1))); }),
               {"parameter group 1", "torch::optim::SGDOptions", "mep::SGD"});
  expect_names(option_error_of([&] {
                 opt.add_param_group(group(std::make_unique<mep::SGDOptions>(mep::SGDOptions(0.1).momentum(1.5))));
               }),
               {"parameter group 1", "momentum = 1.5"});
  EXPECT_EQ(opt.param_groups().size(), 1u);  // unchanged
  opt.add_param_group(group(std::make_unique<mep::SGDOptions>(mep::SGDOptions(0.5).momentum(0.5))));
  EXPECT_EQ(opt.param_groups().size(), 2u);

  // Policy options apply to every group.
  const auto base = mep::SMEPOptions().mode(mep::Mode::Backprop);
  mep::SMEP smep(std::vector<torch::Tensor>{params[0], params[1]}, base);
  expect_names(option_error_of([&] {
                 smep.add_param_group(group(std::make_unique<mep::SMEPOptions>(mep::SMEPOptions(base).ns_steps(2))));
               }),
               {"parameter group 1", "ns_steps"});
  EXPECT_EQ(smep.param_groups().size(), 1u);

  // Muon takes matrices: a group with a bias is refused, naming its shape.
  mep::Muon muon(std::vector<torch::Tensor>{params[0]});
  expect_names(option_error_of([&] { muon.add_param_group(torch::optim::OptimizerParamGroup({params[2], params[3]})); }),
               {"parameter 2", "[2]", "AdamW"});
  EXPECT_EQ(muon.param_groups().size(), 1u);
}

TEST(TorchOptim, StepRefusesAGroupOfAnotherOptionsType) {
  auto model = torch::nn::Sequential(torch::nn::Linear(4, 3));
  auto params = model->parameters();
  for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
  const auto before = mep_test::parameter_values(model);
  auto check = [&](mep::SGD& opt) {
    expect_names(option_error_of([&] { opt.step(); }), {"parameter group", "torch::optim::SGDOptions"});
    EXPECT_EQ(mep_test::max_abs_diff(model->parameters(), before), 0.0);
  };
  // A group added through the base class's add_param_group, which checks nothing.
  mep::SGD added(std::vector<torch::Tensor>{params[0]}, mep::SGDOptions(0.1));
  static_cast<torch::optim::Optimizer&>(added).add_param_group(torch::optim::OptimizerParamGroup(
      std::vector<torch::Tensor>{params[1]}, std::make_unique<torch::optim::SGDOptions>(0.1)));
  check(added);
  // A group whose options were replaced.
  mep::SGD replaced(params, mep::SGDOptions(0.1));
  replaced.param_groups()[0].set_options(std::make_unique<torch::optim::SGDOptions>(0.1));
  check(replaced);
}

TEST(TorchOptim, EPPresetsNeedTheModel) {
  auto model = torch::nn::Sequential(torch::nn::Linear(4, 3), torch::nn::Tanh(), torch::nn::Linear(3, 2));
  expect_names(option_error_of([&] { mep::SMEP opt(model->parameters(), mep::SMEPOptions()); }),
               {"mep::SMEP", "model", "mep::Mode::Backprop"});
  expect_names(option_error_of([&] { mep::EqProp opt(model->parameters(), mep::EqPropOptions()); }), {"mep::EqProp"});
  expect_names(option_error_of([&] { mep::reference::SDMEP opt(model->parameters()); }), {"mep::reference::SDMEP"});
  expect_names(option_error_of([&] { mep::LocalEPMuon opt(model->parameters()); }), {"mep::LocalEPMuon"});
  EXPECT_NO_THROW(mep::SMEP(model->parameters(), mep::SMEPOptions().mode(mep::Mode::Backprop)));
  EXPECT_NO_THROW(mep::SMEP(model, mep::SMEPOptions()));
}

}  // namespace

// ---- Every preset: learning, resume, options, groups, schedulers, transactional steps ----

namespace {

std::string mnist_dir() {
  const char* root = std::getenv("MEP_SOURCE_DIR");
  return root ? std::string(root) + "/data/mnist" : std::string();
}

template <class Opt>
double learn_mnist(typename Opt::Options options) {
  const auto dir = mnist_dir();
  if (dir.empty() || !std::filesystem::exists(dir + "/train-images-idx3-ubyte")) return -1;
  auto train = mep::data::load_split(dir, true, 1000);
  auto test = mep::data::load_split(dir, false, 500);
  torch::manual_seed(0);
  auto model = mep::models::mlp_small();
  Opt opt(model, options);
  for (int epoch = 0; epoch < 3; ++epoch) {
    auto perm = torch::randperm(1000, torch::kLong);
    for (int64_t i = 0; i < 1000; i += 64) {
      auto idx = perm.slice(0, i, std::min<int64_t>(i + 64, 1000));
      opt.step(train.images.index_select(0, idx), train.labels.index_select(0, idx));
    }
  }
  torch::NoGradGuard no_grad;
  model->eval();
  return model->forward(test.images).argmax(1).eq(test.labels).to(torch::kFloat64).mean().item<double>();
}

#define EXPECT_LEARNS(Opt, options)                                      \
  do {                                                                   \
    const double acc = learn_mnist<Opt>(options);                        \
    if (acc < 0) GTEST_SKIP() << "data/mnist missing (data/make_datasets.sh)"; \
    std::cout << "[ measured ] " #Opt " test accuracy " << acc << "\n"; \
    EXPECT_GE(acc, 0.80);                                                \
  } while (0)

TEST(EPOptim, EqPropLearns) { EXPECT_LEARNS(mep::EqProp, mep::EqPropOptions()); }
TEST(EPOptim, SMEPLearns) { EXPECT_LEARNS(mep::SMEP, mep::SMEPOptions()); }
TEST(EPOptim, SMEPWithCrossEntropyLearns) { EXPECT_LEARNS(mep::SMEP, mep::SMEPOptions().loss(mep::Loss::CrossEntropy)); }
TEST(EPOptim, SDMEPLearns) { EXPECT_LEARNS(mep::SDMEP, mep::SDMEPOptions()); }
TEST(EPOptim, LocalEPMuonLearns) { EXPECT_LEARNS(mep::LocalEPMuon, mep::LocalEPMuonOptions()); }
TEST(EPOptim, NaturalEPMuonLearns) { EXPECT_LEARNS(mep::NaturalEPMuon, mep::NaturalEPMuonOptions()); }

using mep_test::tiny;

using mep_test::copy_parameters;
using mep_test::some_options;

torch::nn::Sequential tiny_with_batchnorm() {
  return torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::BatchNorm1d(32), torch::nn::ReLU(),
                               torch::nn::Dropout(0.1), torch::nn::Linear(32, 10));
}

// Four steps, torch::save of model and optimizer, torch::load into a fresh model and an
// optimizer built with another learning rate, four more steps: parameters and BatchNorm's
// running statistics equal those of eight straight steps, bit for bit.
template <class Opt>
void expect_bit_identical_resume(typename Opt::Options options, const char* name) {
  torch::manual_seed(9);
  auto x = torch::randn({32, 20});
  auto y = torch::randint(0, 10, {32}, torch::kLong);
  auto a = tiny_with_batchnorm(), b = tiny_with_batchnorm();
  copy_parameters(a, b);
  Opt straight(a, options), first(b, options);
  // Same dropout masks for both runs (the backprop presets apply dropout in train mode).
  auto paired_step = [&](Opt& one, Opt& other, int s) {
    torch::manual_seed(100 + s);
    one.step(x, y);
    torch::manual_seed(100 + s);
    other.step(x, y);
  };
  for (int s = 0; s < 4; ++s) paired_step(straight, first, s);
  const auto dir = std::filesystem::temp_directory_path();
  const auto model_path = (dir / "mep_test_resume_model.pt").string();
  const auto opt_path = (dir / "mep_test_resume_optimizer.pt").string();
  torch::save(b, model_path);
  torch::save(first, opt_path);
  torch::manual_seed(1234);
  auto c = tiny_with_batchnorm();  // other initial weights and fresh statistics
  torch::load(c, model_path);
  auto other = options;
  other.lr(options.lr() * 3);  // restored from the checkpoint
  Opt resumed(c, other);
  torch::load(resumed, opt_path);
  std::remove(model_path.c_str());
  std::remove(opt_path.c_str());
  EXPECT_DOUBLE_EQ(static_cast<const typename Opt::Options&>(resumed.param_groups()[0].options()).lr(), options.lr())
      << name;
  for (int s = 4; s < 8; ++s) paired_step(straight, resumed, s);
  auto pa = a->parameters(), pc = c->parameters();
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pc[i])) << name << " parameter " << i;
  auto ba = a->buffers(), bc = c->buffers();
  ASSERT_EQ(ba.size(), 3u);  // running mean, running variance, batches tracked
  for (size_t i = 0; i < ba.size(); ++i) EXPECT_TRUE(torch::equal(ba[i], bc[i])) << name << " buffer " << i;
}

TEST(EPOptim, SaveLoadResumesBitIdenticallyForAllEight) {
  expect_bit_identical_resume<mep::reference::SGD>(mep::reference::SGDOptions(), "SGD");
  expect_bit_identical_resume<mep::Adam>(mep::AdamOptions(), "Adam");
  expect_bit_identical_resume<mep::AdamW>(mep::AdamWOptions(), "AdamW");
  expect_bit_identical_resume<mep::reference::Muon>(mep::reference::MuonOptions(), "reference::Muon");
  expect_bit_identical_resume<mep::EqProp>(mep::EqPropOptions(), "EqProp");
  expect_bit_identical_resume<mep::SMEP>(mep::SMEPOptions().error_feedback(true), "SMEP");
  expect_bit_identical_resume<mep::SDMEP>(mep::SDMEPOptions().dion_thresh(100).error_feedback(true), "SDMEP");
  expect_bit_identical_resume<mep::LocalEPMuon>(mep::LocalEPMuonOptions(), "LocalEPMuon");
  expect_bit_identical_resume<mep::NaturalEPMuon>(mep::NaturalEPMuonOptions(), "NaturalEPMuon");
}

TEST(EPOptim, BackpropModeOfSMEPUsesAutogradGradients) {
  torch::manual_seed(12);
  auto model = tiny();
  mep::SMEP opt(model, mep::SMEPOptions().mode(mep::Mode::Backprop));
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  auto first = opt.step(x, y).item<double>();
  for (int s = 0; s < 30; ++s) opt.step(x, y);
  EXPECT_LT(opt.step(x, y).item<double>(), first);
}

TEST(EPOptim, InvalidOptionsThrowNamingTheOption) {
  auto model = tiny();
  auto expect_named = [](auto&& make, const std::string& name) {
    try {
      make();
      ADD_FAILURE() << "no exception for " << name;
    } catch (const mep::OptionError& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
  };
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().beta(0)); }, "beta");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().beta(1.5)); }, "beta");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().settle_steps(0)); }, "settle_steps");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().settle_lr(0)); }, "settle_lr");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().gamma(0)); }, "gamma");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().error_beta(1.0)); }, "error_beta");
  expect_named([&] { mep::SDMEP(model, mep::SDMEPOptions().rank_frac(0)); }, "rank_frac");
  expect_named([&] { mep::NaturalEPMuon(model, mep::NaturalEPMuonOptions().fisher_damping(0)); }, "fisher_damping");
  expect_named([&] { mep::EqProp(model, mep::EqPropOptions(-1)); }, "lr");
  expect_named([&] { mep::LocalEPMuon(model, mep::LocalEPMuonOptions().patience(0)); }, "patience");
  expect_named([&] { mep::reference::SMEP(model, mep::reference::SMEP::Options().check_every(-1)); }, "check_every");
  expect_named([&] { mep::EqProp(model, mep::EqPropOptions().tol(-1)); }, "tol");
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().beta(nan)); }, "beta");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().settle_lr(inf)); }, "settle_lr");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().temperature(inf)); }, "temperature");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().max_grad_norm(inf)); }, "max_grad_norm");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().momentum(nan)); }, "momentum");
  expect_named([&] { mep::SMEP(model, mep::SMEPOptions().weight_decay(inf)); }, "weight_decay");
  expect_named([&] { mep::SDMEP(model, mep::SDMEPOptions().dion_mu(nan)); }, "dion_mu");
  expect_named([&] { mep::NaturalEPMuon(model, mep::NaturalEPMuonOptions().fisher_ema(nan)); }, "fisher_ema");
  expect_named([&] { mep::Adam(model->parameters(), mep::AdamOptions().eps(inf)); }, "eps");
  expect_named([&] { mep::Adam(model->parameters(), mep::AdamOptions().betas({0.9, nan})); }, "betas");
}

// OPTION_SETTER(name): set_name(o, v, 0) sets option `name` of options `o` to v (converted to
// its type) and returns true, or returns false where that options type has no such option.
#define OPTION_SETTER(name)                                                     \
  template <class O>                                                            \
  auto set_##name(O& o, double v, int)->decltype(o.name(), bool()) {            \
    using T = std::decay_t<decltype(o.name())>;                                 \
    if constexpr (std::is_enum_v<T>) o.name(static_cast<T>(static_cast<int>(v))); \
    else o.name(static_cast<T>(v));                                             \
    return true;                                                                \
  }                                                                             \
  template <class O>                                                            \
  bool set_##name(O&, double, long) {                                           \
    return false;                                                               \
  }
#define MEP_NUMERIC_OPTIONS(X)                                                                                        \
  X(lr) X(momentum) X(dampening) X(weight_decay) X(gamma) X(power_iter) X(error_beta) X(max_grad_norm) X(eps)      \
  X(rank_frac) X(dion_thresh) X(dion_mu) X(fisher_damping) X(fisher_ema) X(ns_steps)                \
  X(ns_coefficients) X(ns_scale) X(loss) X(beta) X(label_smoothing) X(temperature) X(mode) X(settle_steps)         \
  X(settle_lr) X(tol) X(patience) X(check_every) X(spectral_mode) X(error_rule)
MEP_NUMERIC_OPTIONS(OPTION_SETTER)

// Adam's betas, one half at a time ("betas" sets β₁, "betas.second" β₂; the other stays).
template <class O>
auto set_betas(O& o, double v, bool second, int) -> decltype(o.betas(), bool()) {
  o.betas(second ? mep::Pair(0.9, v) : mep::Pair(v, 0.999));
  return true;
}
template <class O>
bool set_betas(O&, double, bool, long) {
  return false;
}

template <class O>
bool set_option(O& o, const std::string& name, double v) {
  if (name == "betas") return set_betas(o, v, false, 0);
  if (name == "betas.second") return set_betas(o, v, true, 0);
#define SET_IF_NAMED(n) \
  if (name == #n) return set_##n(o, v, 0);
  MEP_NUMERIC_OPTIONS(SET_IF_NAMED)
#undef SET_IF_NAMED
  return false;
}

// Every option of `Opt`, common and policy: each non-boolean one is set to each value its
// rule excludes, in the optimizer's options and in a parameter group's. Both are refused
// with an OptionError that names the option and the value. An option missing from the
// table below fails the test, so that a new option cannot go unvalidated.
template <class Opt>
void expect_every_option_validated(const char* optimizer, bool matrices_only = false) {
  using O = typename Opt::Options;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  const std::map<std::string, std::vector<double>> invalid = {
      {"lr", {0, -1, nan, inf}},          {"momentum", {-0.1, 1, nan}},      {"dampening", {-0.1, 1.5, nan}},
      {"weight_decay", {-1, nan, inf}},   {"gamma", {0, 1.5, nan}},          {"power_iter", {0, -2}},
      {"error_beta", {-0.1, 1, nan}},     {"max_grad_norm", {0, inf, nan}},  {"betas", {-0.1, 1, nan}},
      {"betas.second", {-0.1, 1, nan}},          {"eps", {-1, inf, nan}},           {"rank_frac", {0, 1.5, nan}},
      {"dion_thresh", {-1}},              {"dion_mu", {-0.1, 1, nan}},       {"fisher_damping", {0, inf, nan}},
      {"fisher_ema", {-0.1, 1, nan}},     {"ns_steps", {-1}},                {"ns_coefficients", {-1, 7}},
      {"ns_scale", {-1, 7}},              {"loss", {-1, 7}},                 {"beta", {0, 1.5, nan}},
      {"label_smoothing", {-0.1, 1, nan}}, {"temperature", {0, inf, nan}},   {"mode", {-1, 7}},
      {"settle_steps", {0, -1}},          {"settle_lr", {0, inf, nan}},      {"tol", {-1, inf, nan}},
      {"patience", {0}},                  {"check_every", {-1}},             {"spectral_mode", {-1, 7}},
      {"error_rule", {-1, 7}}};
  const std::set<std::string> booleans = {"nesterov",       "symmetric",         "free_phase", "analytic",
                                          "adaptive",       "error_feedback",
                                          "amsgrad",        "fisher_diagonal",   "skip_nonfinite",
                                          "bound_input_layer", "ns_bfloat16",      "conv_as_matrix"};
  std::vector<std::string> names;
  for (const auto& [name, value] : some_options<O>().texts()) names.push_back(name);
  if (std::count(names.begin(), names.end(), "betas")) names.push_back("betas.second");
  auto model = tiny();
  auto params = model->parameters();  // W₁, b₁, W₂, b₂
  const std::vector<torch::Tensor> first = matrices_only ? std::vector<torch::Tensor>{params[0]}
                                                         : std::vector<torch::Tensor>{params[0], params[1]};
  const std::vector<torch::Tensor> second = matrices_only ? std::vector<torch::Tensor>{params[2]}
                                                          : std::vector<torch::Tensor>{params[2], params[3]};
  if (matrices_only) params = {params[0], params[2]};
  auto shown = [](double v) {
    std::ostringstream os;
    if (std::isfinite(v) && v == std::floor(v)) os << static_cast<int64_t>(v);
    else os << v;
    return os.str();
  };
  auto expect_refused = [&](auto&& make, const std::string& name, double v, const char* where) {
    try {
      make();
      ADD_FAILURE() << optimizer << ": no error for " << name << " = " << v << " " << where;
    } catch (const mep::OptionError& e) {
      const std::string what = e.what();
      const std::string shown_name = name == "betas.second" ? "betas = 0.9," : name + " = ";
      EXPECT_NE(what.find(shown_name + shown(v)), std::string::npos) << optimizer << " " << where << ": " << what;
    }
  };
  for (const auto& name : names) {
    if (booleans.count(name)) continue;
    auto it = invalid.find(name);
    if (it == invalid.end()) {
      ADD_FAILURE() << optimizer << ": option " << name << " has no invalid values in this test";
      continue;
    }
    for (double v : it->second) {
      O bad = some_options<O>();
      ASSERT_TRUE(set_option(bad, name, v)) << optimizer << " has no setter for " << name;
      expect_refused([&] { Opt opt(params, bad); }, name, v, "in the options");
      expect_refused(
          [&] {
            std::vector<torch::optim::OptimizerParamGroup> groups;
            groups.emplace_back(first);
            groups.emplace_back(second, std::make_unique<O>(bad));
            Opt opt(std::move(groups), some_options<O>());
          },
          name, v, "in parameter group 1");
    }
  }
}

// Options by name, as the command line sets them: every option's text reads back to the same
// value; enums by name; an unknown name is false; a malformed value names option and text.
template <class O>
void expect_options_round_trip_by_name(O changed, const char* optimizer) {
  O fresh = some_options<O>();
  for (const auto& [name, text] : changed.texts()) EXPECT_TRUE(fresh.set(name, text)) << optimizer << " " << name;
  EXPECT_EQ(fresh.texts(), changed.texts()) << optimizer;
  EXPECT_FALSE(fresh.set("no_such_option", "1")) << optimizer;
}

TEST(EPOptim, OptionsAreSetAndReadByName) {
  expect_options_round_trip_by_name(mep::SGDOptions(0.3).momentum(0.25).nesterov(true), "SGD");
  expect_options_round_trip_by_name(mep::AdamOptions().eps(1e-12).amsgrad(true), "Adam");
  expect_options_round_trip_by_name(mep::AdamOptions().betas({0.5, 0.25}), "Adam");
  expect_options_round_trip_by_name(mep::AdamWOptions().weight_decay(0.5), "AdamW");
  expect_options_round_trip_by_name(mep::MuonOptions().ns_scale(mep::NSScale::AdamW).nesterov(false), "Muon");
  expect_options_round_trip_by_name(mep::reference::MuonOptions().ns_coefficients(mep::NSCoefficients::Quintic),
                                    "reference::Muon");
  expect_options_round_trip_by_name(mep::EqPropOptions().beta(0.1).symmetric(true).loss(mep::Loss::CrossEntropy), "EqProp");
  expect_options_round_trip_by_name(mep::SMEPOptions().settle_steps(7).settle_lr(0.3).gamma(0.5), "SMEP");
  expect_options_round_trip_by_name(
      mep::SMEPOptions().spectral_mode(mep::SpectralMode::Clip).bound_input_layer(false), "SMEP");
  expect_options_round_trip_by_name(mep::SDMEPOptions().rank_frac(1.0 / 3).dion_thresh(123), "SDMEP");
  expect_options_round_trip_by_name(mep::LocalEPMuonOptions().mode(mep::Mode::Backprop), "LocalEPMuon");
  expect_options_round_trip_by_name(mep::NaturalEPMuonOptions().fisher_diagonal(true).fisher_ema(0.9), "NaturalEPMuon");

  mep::SMEPOptions o;
  EXPECT_TRUE(o.set("ns_coefficients", "polar_express"));
  EXPECT_EQ(o.ns_coefficients(), mep::NSCoefficients::PolarExpress);
  EXPECT_TRUE(o.set("symmetric", "on"));
  EXPECT_TRUE(o.symmetric());
  EXPECT_TRUE(o.set("settle_steps", "12"));
  EXPECT_EQ(o.settle_steps(), 12);
  EXPECT_TRUE(o.set("lr", "2.5e-3"));
  EXPECT_DOUBLE_EQ(o.lr(), 2.5e-3);
  EXPECT_FALSE(mep::SGDOptions(0.1).set("beta", "0.5"));  // SGD has no β
  EXPECT_FALSE(mep::AdamOptions().set("momentum", "0.5"));  // nor Adam a heavy-ball momentum
  mep::AdamOptions adam;
  EXPECT_TRUE(adam.set("betas", "0.5,0.75"));
  EXPECT_EQ(adam.betas(), mep::Pair(0.5, 0.75));
  for (const auto& [name, text] : std::vector<std::pair<std::string, std::string>>{
           {"settle_steps", "1.5"}, {"beta", "half"}, {"symmetric", "maybe"}, {"ns_coefficients", "septic"}, {"lr", ""}}) {
    try {
      o.set(name, text);
      ADD_FAILURE() << "no error for " << name << " = " << text;
    } catch (const mep::OptionError& e) {
      EXPECT_NE(std::string(e.what()).find(name + " = '" + text + "'"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(o.settle_steps(), 12);  // a refused text changes nothing
  for (const std::string text : {"0.5", "0.5,x", "0.5,0.6,0.7", ""}) {
    try {
      adam.set("betas", text);
      ADD_FAILURE() << "no error for betas = " << text;
    } catch (const mep::OptionError& e) {
      EXPECT_NE(std::string(e.what()).find("betas = '" + text + "'"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(adam.betas(), mep::Pair(0.5, 0.75));
}

TEST(EPOptim, EveryOptionOfEveryOptimizerIsValidated) {
  expect_every_option_validated<mep::SGD>("SGD");
  expect_every_option_validated<mep::Adam>("Adam");
  expect_every_option_validated<mep::AdamW>("AdamW");
  expect_every_option_validated<mep::Muon>("Muon", /*matrices_only=*/true);
  expect_every_option_validated<mep::reference::SGD>("reference::SGD");
  expect_every_option_validated<mep::reference::Muon>("reference::Muon");
  expect_every_option_validated<mep::EqProp>("EqProp");
  expect_every_option_validated<mep::SMEP>("SMEP");
  expect_every_option_validated<mep::SDMEP>("SDMEP");
  expect_every_option_validated<mep::LocalEPMuon>("LocalEPMuon");
  expect_every_option_validated<mep::NaturalEPMuon>("NaturalEPMuon");
  expect_every_option_validated<mep::reference::SMEP>("reference::SMEP");
}

// Parameters on CUDA mean CUDA settling and updates, with the CPU's results.
TEST(EPOptim, CudaStepsMatchCpuSteps) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(13);
  auto x = torch::randn({32, 20});
  auto y = torch::randint(0, 10, {32}, torch::kLong);
  auto cpu = tiny(), gpu = tiny();
  copy_parameters(cpu, gpu);
  gpu->to(torch::kCUDA);
  mep::SMEP a(cpu, mep::SMEPOptions()), b(gpu, mep::SMEPOptions());
  mep::SDMEP c(cpu, mep::SDMEPOptions().dion_thresh(100)), d(gpu, mep::SDMEPOptions().dion_thresh(100));
  for (int s = 0; s < 3; ++s) {
    a.step(x, y), b.step(x.cuda(), y.cuda());
    c.step(x, y), d.step(x.cuda(), y.cuda());
  }
  auto pc = cpu->parameters(), pg = gpu->parameters();
  for (size_t i = 0; i < pc.size(); ++i) EXPECT_LE((pc[i] - pg[i].cpu()).abs().max().item<double>(), 1e-3);
}

}  // namespace

namespace {

// Policy options cannot differ between parameter groups (the policies are built once): a
// group that sets one is an error naming it; the common options may differ.
TEST(EPOptim, GroupsMaySetCommonOptionsButNoPolicyOption) {
  auto model = tiny();
  auto params = model->parameters();
  // From parameter groups, SMEP needs the backprop mode.
  const auto base = mep::SMEPOptions().mode(mep::Mode::Backprop);
  auto groups = [&](mep::SMEPOptions second) {
    std::vector<torch::optim::OptimizerParamGroup> g;
    g.emplace_back(std::vector<torch::Tensor>{params[0], params[1]});
    g.emplace_back(std::vector<torch::Tensor>{params[2], params[3]}, std::make_unique<mep::SMEPOptions>(second));
    return g;
  };
  EXPECT_NO_THROW(mep::SMEP(groups(mep::SMEPOptions(base).lr(0.05).momentum(0.5).weight_decay(0)), base));
  for (auto [name, second] : std::vector<std::pair<std::string, mep::SMEPOptions>>{
           {"ns_steps", mep::SMEPOptions(base).ns_steps(3)},
           {"beta", mep::SMEPOptions(base).beta(0.2)},
           {"settle_steps", mep::SMEPOptions(base).settle_steps(7)},
           {"gamma", mep::SMEPOptions(base).gamma(0.5)}}) {
    try {
      mep::SMEP opt(groups(second), base);
      ADD_FAILURE() << "no error for a group's " << name;
    } catch (const mep::OptionError& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("group 1"), std::string::npos) << e.what();
    }
  }
}

// A checkpoint holds every option: loading restores the common ones and refuses an optimizer
// whose policy options differ, naming the option; nothing is changed by a refused load.
TEST(EPOptim, CheckpointsHoldEveryOption) {
  torch::manual_seed(14);
  auto model = tiny();
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  mep::SDMEP saved(model, mep::SDMEPOptions(0.02).beta(0.3).ns_steps(3).rank_frac(0.5).dion_thresh(100).settle_steps(3));
  saved.step(x, y);
  const auto path = (std::filesystem::temp_directory_path() / "mep_test_options.pt").string();
  torch::save(saved, path);
  auto expect_refused = [&](mep::SDMEPOptions options, const std::string& name) {
    mep::SDMEP other(model, options);
    try {
      torch::load(other, path);
      ADD_FAILURE() << "loaded despite a different " << name;
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << e.what();
    }
    EXPECT_DOUBLE_EQ(other.param_groups()[0].options().get_lr(), options.lr());
  };
  const auto same = mep::SDMEPOptions(0.5).beta(0.3).ns_steps(3).rank_frac(0.5).dion_thresh(100).settle_steps(3);
  expect_refused(mep::SDMEPOptions(same).beta(0.5), "beta");
  expect_refused(mep::SDMEPOptions(same).rank_frac(0.3), "rank_frac");
  expect_refused(mep::SDMEPOptions(same).settle_steps(2), "settle_steps");
  expect_refused(mep::SDMEPOptions(same).loss(mep::Loss::CrossEntropy), "loss");
  mep::SDMEP restored(model, same);
  torch::load(restored, path);
  std::remove(path.c_str());
  EXPECT_DOUBLE_EQ(restored.param_groups()[0].options().get_lr(), 0.02);  // the common options come back
}

// LibTorch's schedulers drive every optimizer's learning rate, and the rate reaches the update.
template <class Opt>
void expect_scheduled(typename Opt::Options options, const char* name, bool constrained = false) {
  torch::manual_seed(15);
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  auto a = tiny(), b = tiny();
  copy_parameters(a, b);
  a->eval(), b->eval();  // no dropout: both runs see the same function
  Opt plain(a, options), scheduled(b, options);
  torch::optim::StepLR step_lr(scheduled, /*step_size=*/1, /*gamma=*/0.1);
  plain.step(x, y), scheduled.step(x, y);
  step_lr.step(), step_lr.step();  // LibTorch's StepLR changes the rate from its second call on
  EXPECT_NEAR(scheduled.param_groups()[0].options().get_lr(), 0.1 * options.lr(), 1e-15) << name;
  auto before = b->parameters()[0].detach().clone();
  auto before_plain = a->parameters()[0].detach().clone();
  plain.step(x, y), scheduled.step(x, y);
  const double moved_plain = (a->parameters()[0] - before_plain).norm().item<double>();
  const double moved = (b->parameters()[0] - before).norm().item<double>();
  EXPECT_GT((a->parameters()[0] - b->parameters()[0]).abs().max().item<double>(), 1e-6) << name;
  // Without the spectral constraint (whose rescaling dominates these first steps), the step shrinks.
  if (!constrained) EXPECT_LT(moved, 0.5 * moved_plain) << name << ": the scheduled rate did not shrink the update";
}

TEST(EPOptim, StepLRDrivesEveryOptimizer) {
  expect_scheduled<mep::SGD>(mep::SGDOptions(0.1), "SGD");
  expect_scheduled<mep::Adam>(mep::AdamOptions(), "Adam");
  expect_scheduled<mep::AdamW>(mep::AdamWOptions(), "AdamW");
  expect_scheduled<mep::reference::Muon>(mep::reference::MuonOptions().momentum(0), "reference::Muon", true);
  expect_scheduled<mep::EqProp>(mep::EqPropOptions().momentum(0), "EqProp");
  expect_scheduled<mep::SMEP>(mep::SMEPOptions().momentum(0), "SMEP", true);
  expect_scheduled<mep::SDMEP>(mep::SDMEPOptions().momentum(0).dion_thresh(100), "SDMEP", true);
  expect_scheduled<mep::LocalEPMuon>(mep::LocalEPMuonOptions().momentum(0), "LocalEPMuon", true);
  expect_scheduled<mep::NaturalEPMuon>(mep::NaturalEPMuonOptions().momentum(0), "NaturalEPMuon", true);
}

}  // namespace

namespace {

// Non-finite gradients in the backprop family: refused with nothing changed, or, with
// skip_nonfinite(true), skipped and counted; the count survives a checkpoint.
TEST(EPOptim, NonFiniteBackpropGradientsAreRefusedOrSkippedAndCounted) {
  torch::manual_seed(16);
  auto model = tiny();
  auto params = model->parameters();
  auto poison = [&] {
    for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
    params[2].mutable_grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
  };
  std::vector<torch::Tensor> before;
  for (auto& p : params) before.push_back(p.detach().clone());
  auto unchanged = [&] {
    for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i], before[i])) << i;
  };
  mep::SGD strict(params, mep::SGDOptions(0.1));
  poison();
  try {
    strict.step();
    ADD_FAILURE() << "no error for a NaN gradient";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("non-finite gradient"), std::string::npos) << e.what();
  }
  unchanged();
  EXPECT_FALSE(strict.has_state(params[0]));

  mep::Adam lenient(params, mep::AdamOptions().skip_nonfinite(true));
  poison();
  EXPECT_NO_THROW(lenient.step());
  unchanged();
  EXPECT_EQ(lenient.skipped_steps(), 1);
  for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
  lenient.step();
  EXPECT_EQ(lenient.skipped_steps(), 1);
  EXPECT_FALSE(torch::equal(params[0], before[0]));
  const auto path = (std::filesystem::temp_directory_path() / "mep_test_skipped.pt").string();
  torch::save(lenient, path);
  mep::Adam resumed(params, mep::AdamOptions().skip_nonfinite(true));
  torch::load(resumed, path);
  std::remove(path.c_str());
  EXPECT_EQ(resumed.skipped_steps(), 1);
}

}  // namespace

namespace {

// The per-parameter state is where LibTorch users look for it: Optimizer::state().
TEST(EPOptim, StateIsInLibTorchsStateMap) {
  torch::manual_seed(17);
  auto model = tiny();
  mep::SMEP opt(model, mep::SMEPOptions());
  EXPECT_TRUE(opt.state().empty());
  opt.step(torch::randn({8, 20}), torch::randint(0, 10, {8}, torch::kLong));
  EXPECT_EQ(opt.state().size(), model->parameters().size());
  size_t with_momentum = 0;
  for (const auto& kv : opt.state()) {
    const auto* st = dynamic_cast<const mep::ParamState*>(kv.second.get());
    ASSERT_NE(st, nullptr);
    EXPECT_EQ(st->step, 1);
    with_momentum += st->has("momentum") ? 1 : 0;
  }
  EXPECT_EQ(with_momentum, model->parameters().size());
  auto w = model->parameters()[0];
  EXPECT_TRUE(opt.has_state(w));
  EXPECT_TRUE(opt.state_of(w).has("spectral_u"));
}

}  // namespace

namespace {

// Equal, NaN included.
bool same(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  return a.sizes() == b.sizes() && ((a == b) | (torch::isnan(a) & torch::isnan(b))).all().item<bool>();
}

struct Snapshot {
  std::vector<torch::Tensor> params, grads, buffers;
  std::vector<std::map<std::string, torch::Tensor>> states;
};

template <class Opt>
Snapshot snapshot(torch::nn::Sequential& m, Opt& opt) {
  Snapshot s;
  for (auto& p : m->parameters()) {
    s.params.push_back(p.detach().clone());
    s.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    std::map<std::string, torch::Tensor> st;
    if (opt.has_state(p))
      for (const auto& k : opt.state_of(p).buffer_names()) st[k] = opt.state_of(p).get(k).clone();
    s.states.push_back(st);
  }
  for (auto& b : m->buffers()) s.buffers.push_back(b.clone());
  return s;
}

template <class Opt>
void expect_as_before(torch::nn::Sequential& m, Opt& opt, const Snapshot& s, const char* name) {
  auto params = m->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(same(params[i], s.params[i])) << name << " parameter " << i;
    EXPECT_TRUE(same(params[i].grad(), s.grads[i])) << name << " grad " << i;
    std::map<std::string, torch::Tensor> st;
    if (opt.has_state(params[i]))
      for (const auto& k : opt.state_of(params[i]).buffer_names()) st[k] = opt.state_of(params[i]).get(k);
    EXPECT_EQ(st.size(), s.states[i].size()) << name << " state " << i;
    for (const auto& [k, v] : s.states[i]) EXPECT_TRUE(st.count(k) && same(st[k], v)) << name << " state " << i << " " << k;
  }
  auto buffers = m->buffers();
  for (size_t i = 0; i < buffers.size(); ++i) EXPECT_TRUE(same(buffers[i], s.buffers[i])) << name << " buffer " << i;
}

// A step that fails inside the update (a fault injected into the last parameter's state, so
// that the parameters before it have already been updated) leaves every parameter, gradient,
// optimizer state and BatchNorm statistic exactly as before the call.
template <class Opt>
void expect_failed_update_changes_nothing(typename Opt::Options options, const char* name) {
  torch::manual_seed(18);
  auto m = torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::BatchNorm1d(32), torch::nn::ReLU(),
                                 torch::nn::Linear(32, 10));
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  Opt opt(m, options);
  auto backprop_grads = [&] {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m->forward(x), y).backward();
  };
  auto step = [&](bool fresh_grads = true) {
    if constexpr (std::is_same_v<typename Opt::GradientPolicy, mep::BackpropGradient>) {
      if (fresh_grads) backprop_grads();
      opt.step();
    } else {
      opt.step(x, y);
    }
  };
  step(), step();
  auto last = m->parameters().back();
  opt.state_of(last).for_each_buffer([](const char*, torch::Tensor& v) { v.fill_(std::numeric_limits<float>::quiet_NaN()); });
  if constexpr (std::is_same_v<typename Opt::GradientPolicy, mep::BackpropGradient>) backprop_grads();
  const auto before = snapshot(m, opt);
  EXPECT_THROW(step(/*fresh_grads=*/false), std::runtime_error) << name;
  expect_as_before(m, opt, before, name);
}

TEST(EPOptim, AFailedUpdateChangesNothingInAnyOptimizer) {
  expect_failed_update_changes_nothing<mep::reference::SGD>(mep::reference::SGDOptions(), "SGD");
  expect_failed_update_changes_nothing<mep::Adam>(mep::AdamOptions(), "Adam");
  expect_failed_update_changes_nothing<mep::reference::Muon>(mep::reference::MuonOptions(), "reference::Muon");
  expect_failed_update_changes_nothing<mep::EqProp>(mep::EqPropOptions(), "EqProp");
  expect_failed_update_changes_nothing<mep::SMEP>(mep::SMEPOptions().error_feedback(true), "SMEP");
  expect_failed_update_changes_nothing<mep::SDMEP>(mep::SDMEPOptions().dion_thresh(100), "SDMEP");
  expect_failed_update_changes_nothing<mep::LocalEPMuon>(mep::LocalEPMuonOptions(), "LocalEPMuon");
  expect_failed_update_changes_nothing<mep::NaturalEPMuon>(mep::NaturalEPMuonOptions(), "NaturalEPMuon");
}

// After a rolled-back step the optimizer goes on exactly as one that never took it (momentum,
// Adam's moments and the step count restored). The failure: the last group's lr overflows
// its parameter, after the first group has been updated.
template <class Opt>
void expect_rollback_then_same_steps(typename Opt::Options options, const char* name) {
  torch::manual_seed(20);
  auto make = [] {
    return torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::ReLU(), torch::nn::Linear(32, 10));
  };
  auto a = make(), b = make();
  copy_parameters(a, b);
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  auto groups = [&](torch::nn::Sequential& m) {
    auto p = m->parameters();
    std::vector<torch::optim::OptimizerParamGroup> g;
    g.emplace_back(std::vector<torch::Tensor>{p[0], p[1]});
    g.emplace_back(std::vector<torch::Tensor>{p[2], p[3]}, std::make_unique<typename Opt::Options>(options));
    return g;
  };
  Opt opt_a(groups(a), options), opt_b(groups(b), options);
  auto step = [&](torch::nn::Sequential& m, Opt& opt) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m->forward(x), y).backward();
    opt.step();
  };
  for (int i = 0; i < 3; ++i) step(a, opt_a), step(b, opt_b);
  const double lr = opt_a.param_groups()[1].options().get_lr();
  opt_a.param_groups()[1].options().set_lr(1e39);  // inf in float32
  EXPECT_THROW(step(a, opt_a), std::runtime_error) << name;
  opt_a.param_groups()[1].options().set_lr(lr);
  for (int i = 0; i < 3; ++i) step(a, opt_a), step(b, opt_b);
  auto pa = a->parameters(), pb = b->parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i], pb[i])) << name << " parameter " << i;
    EXPECT_EQ(opt_a.state_of(pa[i]).buffer_names(), opt_b.state_of(pb[i]).buffer_names()) << name << " state " << i;
    for (const auto& k : opt_b.state_of(pb[i]).buffer_names())
      EXPECT_TRUE(torch::equal(opt_a.state_of(pa[i]).get(k), opt_b.state_of(pb[i]).get(k))) << name << " state " << i << " " << k;
  }
}

TEST(EPOptim, AfterARollbackStepsAreThoseOfAnUninterruptedRun) {
  expect_rollback_then_same_steps<mep::reference::SGD>(mep::reference::SGDOptions().nesterov(true), "SGD");
  expect_rollback_then_same_steps<mep::Adam>(mep::AdamOptions(), "Adam");
  expect_rollback_then_same_steps<mep::Adam>(mep::AdamOptions().amsgrad(true), "Adam amsgrad");
  expect_rollback_then_same_steps<mep::reference::Muon>(mep::reference::MuonOptions(), "reference::Muon");
}

// A failed Cholesky factorisation (a corrupted Fisher state) is rolled back the same way.
TEST(EPOptim, AFailedCholeskyChangesNothing) {
  torch::manual_seed(19);
  auto m = tiny();
  m->eval();
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  mep::NaturalEPMuon opt(m, mep::NaturalEPMuonOptions());
  opt.step(x, y);
  auto w = m->parameters()[2];  // the second weight: the first is updated before it fails
  opt.state_of(w).fisher = -10 * torch::eye(w.size(1));
  const auto before = snapshot(m, opt);
  try {
    opt.step(x, y);
    ADD_FAILURE() << "no error for a corrupted Fisher state";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("fisher_damping"), std::string::npos) << e.what();
  }
  expect_as_before(m, opt, before, "NaturalEPMuon");
}

// ---- Enums: one table of names ---------------------------------------------------------

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



// ---- The step's one check (StepCheck) and the checkpoint format ------------------------

// Immediate (the CPU's default) reads one value per step, Deferred none.
TEST(StepCheck, ImmediateReadsOncePerStepAndDeferredNever) {
  for (auto check : {mep::StepCheck::Auto, mep::StepCheck::Immediate, mep::StepCheck::Deferred}) {
    torch::manual_seed(2);
    auto model = small_mlp();
    auto x = torch::randn({16, 20});
    auto y = torch::randint(0, 10, {16}, torch::kLong);
    mep::SGD opt(model->parameters(), mep::SGDOptions(0.1).momentum(0.9).step_check(check));
    auto backward = [&] {
      opt.zero_grad();
      torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    };
    backward(), opt.step(), backward();
    const auto count = mep_bench::count_ops([&] { opt.step(); });
    EXPECT_EQ(count.syncs, check == mep::StepCheck::Deferred ? 0 : 1) << mep::enum_name(check);
  }
  EXPECT_THROW(mep::SGDOptions(0.1).step_check(static_cast<mep::StepCheck>(7)), mep::OptionError);
}

// Deferred: a step with a non-finite gradient is undone on the device (parameters and state as
// before), the next call throws, and training then goes on as if the step had never been
// taken. With skip_nonfinite the step is counted instead.
template <class Opt>
void expect_deferred_failure_undone(typename Opt::Options options, const char* name) {
  torch::manual_seed(5);
  auto a = small_mlp(), b = small_mlp();
  copy_parameters(a, b);
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  Opt deferred(a->parameters(), typename Opt::Options(options).step_check(mep::StepCheck::Deferred));
  Opt immediate(b->parameters(), options);
  auto step = [&](torch::nn::Sequential& m, Opt& opt) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m->forward(x), y).backward();
    opt.step();
  };
  for (int i = 0; i < 2; ++i) step(a, deferred), step(b, immediate);
  auto params = a->parameters();
  const auto before = mep_test::parameter_values(a);
  std::vector<std::map<std::string, torch::Tensor>> state_before;
  for (const auto& p : params) {
    std::map<std::string, torch::Tensor> st;
    for (const auto& k : deferred.state_of(p).buffer_names()) st[k] = deferred.state_of(p).get(k).clone();
    state_before.push_back(st);
  }
  for (auto& p : params) p.mutable_grad() = torch::ones_like(p);
  params.back().mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NO_THROW(deferred.step()) << name;
  EXPECT_EQ(max_abs_diff(before, params), 0.0) << name;
  for (size_t i = 0; i < params.size(); ++i)
    for (const auto& [k, v] : state_before[i]) EXPECT_TRUE(torch::equal(deferred.state_of(params[i]).get(k), v)) << name << " " << k;
  const bool skips = options.skip_nonfinite();
  if (skips) {
    EXPECT_NO_THROW(deferred.check_failures()) << name;
    EXPECT_EQ(deferred.skipped_steps(), 1) << name;
  } else {
    try {
      deferred.check_failures();
      ADD_FAILURE() << name << ": no error for the failed step";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("undone on the device"), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(deferred.check_failures()) << name;  // reported once
  for (const auto& p : params) EXPECT_EQ(deferred.state_of(p).step, 2) << name;
  for (int i = 0; i < 2; ++i) step(a, deferred), step(b, immediate);
  EXPECT_EQ(max_abs_diff(mep_test::parameter_values(a), mep_test::parameter_values(b)), 0.0) << name;
}

TEST(StepCheck, DeferredUndoesAFailedStepOnTheDeviceAndTheNextCallThrows) {
  expect_deferred_failure_undone<mep::SGD>(mep::SGDOptions(0.1).momentum(0.9), "SGD");
  expect_deferred_failure_undone<mep::SGD>(mep::SGDOptions(0.1).momentum(0.9).skip_nonfinite(true), "SGD skip");
  expect_deferred_failure_undone<mep::Adam>(mep::AdamOptions(1e-3), "Adam");
}

// An EP step on a batch with a NaN leaves the parameters and BatchNorm's statistics as they
// were, with nothing read on the host; the next call throws.
TEST(StepCheck, DeferredEPStepOnABadBatchChangesNothing) {
  torch::manual_seed(6);
  auto m = torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::BatchNorm1d(32), torch::nn::ReLU(),
                                 torch::nn::Linear(32, 10));
  auto x = torch::randn({16, 20});
  auto y = torch::randint(0, 10, {16}, torch::kLong);
  mep::EqProp opt(m, mep::EqPropOptions().step_check(mep::StepCheck::Deferred));
  opt.step(x, y);
  for (const auto& bad : {std::make_pair(x.clone().index_put_({0, 0}, NAN), y),
                          std::make_pair(x, y.clone().index_put_({3}, 10))}) {
    const auto params = mep_test::parameter_values(m);
    std::vector<torch::Tensor> buffers;
    for (const auto& b : m->buffers()) buffers.push_back(b.clone());
    const auto count = mep_bench::count_ops([&] { opt.step(bad.first, bad.second); });
    EXPECT_EQ(count.syncs, 0);
    EXPECT_EQ(max_abs_diff(params, m->parameters()), 0.0);
    auto now = m->buffers();
    for (size_t i = 0; i < buffers.size(); ++i) EXPECT_TRUE(torch::equal(now[i], buffers[i])) << i;
    EXPECT_THROW(opt.check_failures(), std::runtime_error);
  }
}

// Checkpoints name their format: those of mep 0.3 (no "mep.format", format 1, the same
// layout) load; a format this version does not know is refused, naming it.
TEST(Checkpoint, Format1LoadsAndAnUnknownFormatIsRefusedNamingIt) {
  torch::manual_seed(7);
  auto model = small_mlp();
  mep::SGD opt(model->parameters(), mep::SGDOptions(0.1).momentum(0.9));
  for (auto& p : model->parameters()) p.mutable_grad() = torch::randn_like(p);
  opt.step();
  const auto write = [&](c10::optional<int64_t> format) {
    torch::serialize::OutputArchive a;
    if (format) a.write("mep.format", c10::IValue(*format));
    a.write("mep.groups", c10::IValue(int64_t{1}));
    a.write("mep.skipped_steps", c10::IValue(int64_t{0}));
    torch::serialize::OutputArchive ga;
    opt.param_groups()[0].options().serialize(ga);
    const auto& params = opt.param_groups()[0].params();
    ga.write("size", c10::IValue(static_cast<int64_t>(params.size())));
    for (size_t i = 0; i < params.size(); ++i) {
      torch::serialize::OutputArchive sa;
      opt.state_of(params[i]).serialize(sa);
      ga.write("state." + std::to_string(i), sa);
    }
    a.write("group.0", ga);
    std::stringstream bytes;
    a.save_to(bytes);
    return bytes.str();
  };
  const auto read = [&](const std::string& bytes, mep::SGD& into) {
    std::stringstream in(bytes);
    torch::serialize::InputArchive a;
    a.load_from(in);
    into.load(a);
  };
  auto other = small_mlp();
  mep::SGD loaded(other->parameters(), mep::SGDOptions(0.5));
  read(write(c10::nullopt), loaded);
  const auto& mine = opt.param_groups()[0].params();
  const auto& theirs = loaded.param_groups()[0].params();
  for (size_t i = 0; i < mine.size(); ++i) {
    EXPECT_EQ(loaded.state_of(theirs[i]).step, 1);
    EXPECT_TRUE(torch::equal(loaded.state_of(theirs[i]).momentum, opt.state_of(mine[i]).momentum)) << i;
  }
  EXPECT_EQ(loaded.param_groups()[0].options().get_lr(), 0.1);
  mep::SGD refused(small_mlp()->parameters(), mep::SGDOptions(0.5));
  try {
    read(write(99), refused);
    FAIL() << "format 99 was read";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("format 99"), std::string::npos) << e.what();
  }
  EXPECT_EQ(refused.param_groups()[0].options().get_lr(), 0.5);  // unchanged
}

}  // namespace
