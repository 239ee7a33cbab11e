// mep as a drop-in for torch::optim: renaming torch::optim::SGD/Adam/AdamW and their options
// to mep:: compiles unchanged and computes the same steps; parameter groups are checked as
// the constructor checks them; EP presets need a model.
#include <gtest/gtest.h>
#include <mep/mep.hpp>

#include "mnist_net.hpp"
#include "support.hpp"

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <type_traits>

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
