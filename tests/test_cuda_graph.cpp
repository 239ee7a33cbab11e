// mep::CudaGraphStep (include/mep/cuda_graph.hpp): the whole EP step as a CUDA graph; and
// every optimizer's step on CUDA: no host synchronisation (LibTorch's sync-debug mode), and
// the CPU's results.
// Built only against a CUDA LibTorch (tests/CMakeLists.txt); the tests that need a GPU skip
// without one. Written without a GPU to run them on: scripts/maintainer/cuda_check.sh runs them.
//
// The equality contract: from the same initial parameters and batches, graphed steps leave
// the parameters within 1e-5 relative (max |Δ| / max |W| per tensor) of eager steps.

#include <mep/mep.hpp>

#include <c10/cuda/CUDAFunctions.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <iostream>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr double kRelTol = 1e-5;

#define REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

// max |a − b| / max(max |a|, 1e-12), over one pair of tensors.
double relative_difference(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = std::max(a.abs().max().item<double>(), 1e-12);
  return (a - b).abs().max().item<double>() / scale;
}

// The worst relative difference between the parameters of two models.
double worst_parameter_difference(const torch::nn::Sequential& a, const torch::nn::Sequential& b) {
  auto pa = a->parameters(), pb = b->parameters();
  double worst = 0;
  for (size_t i = 0; i < pa.size(); ++i) worst = std::max(worst, relative_difference(pa[i], pb[i]));
  return worst;
}

// Two copies of mlp_small with the same parameters, on CUDA, in float32.
std::pair<torch::nn::Sequential, torch::nn::Sequential> twin_models(uint64_t seed) {
  torch::manual_seed(seed);
  auto a = mep::models::mlp_small();
  auto b = mep::models::mlp_small();
  {
    torch::NoGradGuard no_grad;
    auto pa = a->parameters(), pb = b->parameters();
    for (size_t i = 0; i < pa.size(); ++i) pb[i].copy_(pa[i]);
  }
  a->to(torch::kCUDA), b->to(torch::kCUDA);
  return {a, b};
}

struct Batch {
  torch::Tensor x, y;
};
// `n` MNIST-shaped batches of `size` (x in [B, 1, 28, 28], class labels), on CUDA.
std::vector<Batch> batches(int64_t n, int64_t size, uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<Batch> out;
  for (int64_t i = 0; i < n; ++i)
    out.push_back({torch::randn({size, 1, 28, 28}).cuda(), torch::randint(0, 10, {size}, torch::kLong).cuda()});
  return out;
}

// 10 graphed steps against 10 eager steps of the same optimizer type from the same start.
template <class Opt>
void expect_graphed_equals_eager(const typename Opt::Options& options) {
  auto [eager_model, graphed_model] = twin_models(7);
  Opt eager(eager_model, options), graphed_opt(graphed_model, options);
  mep::CudaGraphStep<Opt> graphed(graphed_opt);
  const auto data = batches(10, 128, 11);
  for (size_t i = 0; i < data.size(); ++i) {
    const auto le = eager.step(data[i].x, data[i].y).clone();
    const auto lg = graphed.step(data[i].x, data[i].y).clone();
    EXPECT_LE(relative_difference(le, lg), kRelTol) << "loss of step " << i;
  }
  EXPECT_LE(worst_parameter_difference(eager_model, graphed_model), kRelTol);
  EXPECT_EQ(graphed.eager_steps(), 3);  // warmup_steps
  EXPECT_EQ(graphed.captures(), 1);
  EXPECT_EQ(graphed.replays(), 7);
  // The step counts saved with the optimizer advance as the eager run's.
  auto pe = eager_model->parameters(), pg = graphed_model->parameters();
  for (size_t i = 0; i < pe.size(); ++i)
    if (eager.has_state(pe[i])) {
      EXPECT_EQ(graphed_opt.state_of(pg[i]).step, eager.state_of(pe[i]).step) << i;
    }
}

TEST(CudaGraph, EqPropGraphedStepsEqualEagerSteps) {
  REQUIRE_CUDA();
  expect_graphed_equals_eager<mep::EqProp>(mep::EqPropOptions());
}

TEST(CudaGraph, SMEPGraphedStepsEqualEagerSteps) {
  REQUIRE_CUDA();
  expect_graphed_equals_eager<mep::SMEP>(mep::SMEPOptions());
}

// A new batch shape captures again (after one eager step), and the way back too; the
// parameters still follow the eager run's.
TEST(CudaGraph, BatchShapeChangeCapturesAgain) {
  REQUIRE_CUDA();
  auto [eager_model, graphed_model] = twin_models(3);
  mep::EqProp eager(eager_model, mep::EqPropOptions()), opt(graphed_model, mep::EqPropOptions());
  mep::CudaGraphStep<mep::EqProp> graphed(opt);
  const auto big = batches(8, 128, 5), small = batches(3, 64, 6);
  auto both = [&](const Batch& b) {
    eager.step(b.x, b.y);
    graphed.step(b.x, b.y);
  };
  for (int i = 0; i < 5; ++i) both(big[i]);  // 3 warm-up, capture, replay
  EXPECT_EQ(graphed.captures(), 1);
  both(small[0]);  // new shape: one eager step
  EXPECT_EQ(graphed.captures(), 1);
  EXPECT_EQ(graphed.eager_steps(), 4);
  both(small[1]);  // captured for 64
  EXPECT_EQ(graphed.captures(), 2);
  both(small[2]);  // replayed
  EXPECT_EQ(graphed.captures(), 2);
  both(big[5]), both(big[6]), both(big[7]);  // back to 128: eager, capture, replay
  EXPECT_EQ(graphed.captures(), 3);
  EXPECT_EQ(graphed.eager_steps(), 5);
  EXPECT_LE(worst_parameter_difference(eager_model, graphed_model), kRelTol);
}

// A learning rate changed between steps (a schedule) captures again: the lr is a host scalar
// baked into the graph.
TEST(CudaGraph, LearningRateChangeCapturesAgain) {
  REQUIRE_CUDA();
  auto [eager_model, graphed_model] = twin_models(4);
  mep::SMEP eager(eager_model, mep::SMEPOptions()), opt(graphed_model, mep::SMEPOptions());
  mep::CudaGraphStep<mep::SMEP> graphed(opt);
  const auto data = batches(10, 128, 8);
  for (size_t i = 0; i < data.size(); ++i) {
    if (i == 6)
      for (auto* o : {static_cast<torch::optim::Optimizer*>(&eager), static_cast<torch::optim::Optimizer*>(&opt)})
        for (auto& group : o->param_groups()) group.options().set_lr(0.005);
    eager.step(data[i].x, data[i].y);
    graphed.step(data[i].x, data[i].y);
    if (i == 5 || i == 6) {
      EXPECT_EQ(graphed.captures(), 1) << "step " << i << " (the changed lr runs one eager step first)";
    }
  }
  EXPECT_EQ(graphed.captures(), 2);
  EXPECT_LE(worst_parameter_difference(eager_model, graphed_model), kRelTol);
}

// What cannot be captured is refused when the graph is requested, naming the reason. These
// need no GPU: the options are checked before the device.
template <class Opt>
std::string refusal(const typename Opt::Options& options) {
  auto model = mep::models::mlp_small();
  Opt opt(model, options);
  try {
    mep::CudaGraphStep<Opt> graphed(opt);
  } catch (const mep::OptionError& e) {
    return e.what();
  } catch (const std::invalid_argument& e) {
    return std::string("not refused for its options: ") + e.what();  // the CPU model, after the checks
  }
  return "not refused";
}

TEST(CudaGraph, RefusesAdaptiveSettling) {
  using HB = mep::with_settling_t<mep::EqProp, mep::HeavyBall>;
  const auto what = refusal<HB>(HB::Options(0.01).tol(0).adaptive(true));
  EXPECT_NE(what.find("adaptive"), std::string::npos) << what;
}

TEST(CudaGraph, RefusesEarlyStopping) {
  const auto what = refusal<mep::EqProp>(mep::EqPropOptions().tol(1e-4));
  EXPECT_NE(what.find("tol"), std::string::npos) << what;
  // The reference presets: HeavyBall, adaptive, tol 1e-5: both reasons in one message.
  const auto ref = refusal<mep::reference::SMEP>(mep::reference::SMEPOptions());
  EXPECT_NE(ref.find("adaptive"), std::string::npos) << ref;
  EXPECT_NE(ref.find("tol"), std::string::npos) << ref;
}

TEST(CudaGraph, RefusesBackpropMode) {
  const auto what = refusal<mep::SMEP>(mep::SMEPOptions().mode(mep::Mode::Backprop));
  EXPECT_NE(what.find("backprop"), std::string::npos) << what;
}

// HeavyBall without its host-side decisions is accepted (refused only for the CPU model).
TEST(CudaGraph, AcceptsHeavyBallWithoutHostDecisions) {
  using HB = mep::with_settling_t<mep::EqProp, mep::HeavyBall>;
  const auto what = refusal<HB>(HB::Options(0.01).tol(0).adaptive(false));
  EXPECT_EQ(what.rfind("not refused for its options", 0), 0u) << what;
}


// ---- The step on CUDA: no host synchronisation, and the CPU's results ------------------

// Runs `fn` with LibTorch's CUDA sync-debug mode at "error": an operation that blocks the
// host on the device (.item(), a blocking copy, a stream synchronisation) throws.
template <class Fn>
void without_syncs(Fn&& fn) {
  auto& state = c10::cuda::warning_state();
  const auto before = state.get_sync_debug_mode();
  state.set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  try {
    fn();
  } catch (...) {
    state.set_sync_debug_mode(before);
    throw;
  }
  state.set_sync_debug_mode(before);
}

// The backprop family: forward and backward outside the window, `step()` inside.
template <class Opt>
void expect_update_without_syncs(const typename Opt::Options& options, bool matrices_only, const char* name) {
  torch::manual_seed(3);
  auto m = mep::models::mlp_small();
  m->to(torch::kCUDA);
  std::vector<torch::Tensor> params;
  for (const auto& p : m->parameters())
    if (!matrices_only || p.dim() == 2) params.push_back(p);
  Opt opt(params, options);
  const auto data = batches(4, 128, 5);
  const auto backward = [&](const Batch& b) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m->forward(b.x), b.y).backward();
  };
  for (int i = 0; i < 2; ++i) backward(data[i]), opt.step();
  for (int i = 2; i < 4; ++i) {
    backward(data[i]);
    EXPECT_NO_THROW(without_syncs([&] { opt.step(); })) << name << " step " << i;
  }
}

// The EP family: the whole `step(x, y)` inside the window.
template <class Opt>
void expect_step_without_syncs(const typename Opt::Options& options, const char* name) {
  torch::manual_seed(3);
  auto m = mep::models::mlp_small();
  m->to(torch::kCUDA);
  Opt opt(m, options);
  const auto data = batches(4, 128, 5);
  for (int i = 0; i < 2; ++i) opt.step(data[i].x, data[i].y);
  for (int i = 2; i < 4; ++i)
    EXPECT_NO_THROW(without_syncs([&] { opt.step(data[i].x, data[i].y); })) << name << " step " << i;
}

TEST(CudaStep, NoDefaultOptimizerSynchronisesWithTheHost) {
  REQUIRE_CUDA();
  expect_update_without_syncs<mep::SGD>(mep::SGDOptions(0.1).momentum(0.9).weight_decay(5e-4), false, "SGD");
  expect_update_without_syncs<mep::Adam>(mep::AdamOptions(1e-3), false, "Adam");
  expect_update_without_syncs<mep::Muon>(mep::MuonOptions(0.02), true, "Muon");
  expect_step_without_syncs<mep::EqProp>(mep::EqPropOptions(), "EqProp");
  expect_step_without_syncs<mep::SMEP>(mep::SMEPOptions(), "SMEP");
  expect_step_without_syncs<mep::SDMEP>(mep::SDMEPOptions(), "SDMEP");
  expect_step_without_syncs<mep::LocalEPMuon>(mep::LocalEPMuonOptions(), "LocalEPMuon");
  expect_step_without_syncs<mep::NaturalEPMuon>(mep::NaturalEPMuonOptions(), "NaturalEPMuon");
}

// A deferred failure on CUDA: a NaN batch changes nothing and the next call throws.
TEST(CudaStep, DeferredFailureIsUndoneOnTheDevice) {
  REQUIRE_CUDA();
  torch::manual_seed(4);
  auto m = mep::models::mlp_small();
  m->to(torch::kCUDA);
  mep::EqProp opt(m, mep::EqPropOptions());
  const auto data = batches(2, 128, 6);
  opt.step(data[0].x, data[0].y);
  std::vector<torch::Tensor> before;
  for (const auto& p : m->parameters()) before.push_back(p.detach().clone());
  auto bad = data[1].x.clone();
  bad.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NO_THROW(without_syncs([&] { opt.step(bad, data[1].y); }));
  auto params = m->parameters();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i], before[i])) << i;
  torch::cuda::synchronize();
  EXPECT_THROW(opt.check_failures(), std::runtime_error);
}

// 10 steps on CUDA against 10 on the CPU from the same start, for every default optimizer:
// float64 within 1e-10, float32 within 1e-4 relative (max |Δ| / max |W| per tensor). Muon
// runs Newton–Schulz in the parameter's dtype (bfloat16 rounds differently across devices).
template <class Opt>
std::vector<torch::Tensor> ten_steps(const typename Opt::Options& options, torch::Device device, torch::Dtype dtype,
                                     bool model_owning, bool matrices_only) {
  torch::manual_seed(9);
  auto m = mep::models::mlp_small();
  m->to(device, dtype);
  torch::manual_seed(10);
  std::vector<Batch> data;
  for (int i = 0; i < 10; ++i)
    data.push_back({torch::randn({64, 1, 28, 28}).to(device, dtype), torch::randint(0, 10, {64}, torch::kLong).to(device)});
  if constexpr (std::is_constructible_v<Opt, torch::nn::Sequential, typename Opt::Options>) {
    if (model_owning) {
      Opt opt(m, options);
      for (const auto& b : data) opt.step(b.x, b.y);
      std::vector<torch::Tensor> out;
      for (const auto& p : m->parameters()) out.push_back(p.detach().to(torch::kCPU));
      return out;
    }
  }
  std::vector<torch::Tensor> params;
  for (const auto& p : m->parameters())
    if (!matrices_only || p.dim() == 2) params.push_back(p);
  Opt opt(params, options);
  for (const auto& b : data) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(m->forward(b.x), b.y).backward();
    opt.step();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : m->parameters()) out.push_back(p.detach().to(torch::kCPU));
  return out;
}

template <class Opt>
void expect_cuda_equals_cpu(const typename Opt::Options& options, bool model_owning, bool matrices_only,
                            const char* name) {
  for (auto [dtype, tol] : {std::pair<torch::Dtype, double>{torch::kFloat64, 1e-10}, {torch::kFloat32, 1e-4}}) {
    const auto cpu = ten_steps<Opt>(options, torch::kCPU, dtype, model_owning, matrices_only);
    const auto cuda = ten_steps<Opt>(options, torch::kCUDA, dtype, model_owning, matrices_only);
    double worst = 0;
    for (size_t i = 0; i < cpu.size(); ++i) worst = std::max(worst, relative_difference(cpu[i], cuda[i]));
    EXPECT_LE(worst, tol) << name << " " << dtype;
    std::cout << "[ measured ] " << name << " " << dtype << ": CUDA against CPU after 10 steps, " << worst
              << " relative\n";
  }
}

TEST(CudaStep, EveryOptimizerMatchesTheCpu) {
  REQUIRE_CUDA();
  expect_cuda_equals_cpu<mep::SGD>(mep::SGDOptions(0.1).momentum(0.9).weight_decay(5e-4), false, false, "SGD");
  expect_cuda_equals_cpu<mep::Adam>(mep::AdamOptions(1e-3), false, false, "Adam");
  expect_cuda_equals_cpu<mep::Muon>(mep::MuonOptions(0.02).ns_bfloat16(false), false, true, "Muon");
  expect_cuda_equals_cpu<mep::EqProp>(mep::EqPropOptions(), true, false, "EqProp");
  expect_cuda_equals_cpu<mep::SMEP>(mep::SMEPOptions(), true, false, "SMEP");
  expect_cuda_equals_cpu<mep::SDMEP>(mep::SDMEPOptions(), true, false, "SDMEP");
  expect_cuda_equals_cpu<mep::LocalEPMuon>(mep::LocalEPMuonOptions(), true, false, "LocalEPMuon");
  expect_cuda_equals_cpu<mep::NaturalEPMuon>(mep::NaturalEPMuonOptions(), true, false, "NaturalEPMuon");
}

}  // namespace
