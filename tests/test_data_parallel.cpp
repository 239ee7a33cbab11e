// Data parallelism over c10d (data_parallel.hpp, process_group.hpp): ranks are threads of
// this process, joined by a TCPStore and Gloo on 127.0.0.1, with short timeouts.
#include <gtest/gtest.h>
#include <mep/mep.hpp>
#include <mep/process_group.hpp>

#include "support.hpp"

#include <chrono>
#include <cstdlib>
#include <exception>
#include <functional>
#include <future>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;

// Runs fn(rank, group) on `size` threads, one Gloo rank each; rethrows the first failure
// of a rank that was not expected to fail (fn returns normally or throws).
void run_ranks(int size, std::chrono::milliseconds timeout,
               const std::function<void(int, mep::ProcessGroupPtr)>& fn) {
  c10d::TCPStoreOptions server_options;
  server_options.port = 0;  // any free port
  server_options.isServer = true;
  server_options.waitWorkers = false;
  server_options.timeout = timeout;
  auto server = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", server_options);
  std::vector<std::exception_ptr> errors(size);
  std::vector<std::thread> ranks;
  for (int r = 0; r < size; ++r)
    ranks.emplace_back([&, r] {
      try {
        c10::intrusive_ptr<c10d::Store> store = server;
        if (r > 0) {
          c10d::TCPStoreOptions o;
          o.port = server->getPort();
          o.timeout = timeout;
          store = c10::make_intrusive<c10d::TCPStore>("127.0.0.1", o);
        }
        fn(r, mep::make_gloo_group(store, r, size, timeout));
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : ranks) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

torch::nn::Sequential mlp() {
  return torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::Tanh(), torch::nn::Linear(32, 24),
                               torch::nn::ReLU(), torch::nn::Linear(24, 10));
}

struct Batches {
  std::vector<torch::Tensor> x, y;
};

Batches batches(int steps, int64_t batch) {
  torch::manual_seed(7);
  Batches b;
  for (int s = 0; s < steps; ++s) {
    b.x.push_back(torch::randn({batch, 20}, torch::kFloat64));
    b.y.push_back(torch::randint(0, 10, {batch}));
  }
  return b;
}

// One step of `opt` on (x, y): step(x, y) for a model-owning optimizer, else backward + step().
template <class Opt>
void train_step(Opt& opt, torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& y) {
  if constexpr (std::is_same_v<typename Opt::GradientPolicy, mep::BackpropGradient>) {
    opt.zero_grad();
    torch::nn::functional::cross_entropy(model->forward(x), y).backward();
    opt.step();
  } else {
    opt.step(x, y);
  }
}

template <class Opt>
Opt make(torch::nn::Sequential& model, const typename Opt::Options& options) {
  if constexpr (std::is_same_v<typename Opt::GradientPolicy, mep::BackpropGradient>) return Opt(model->parameters(), options);
  else return Opt(model, options);
}

// 5 steps of one rank on whole batches of 16 against 2 ranks on halves (float64): the ranks
// end bit-identical, and within 1e-6 of the single rank.
// The bytes one rank hands to collectives: the broadcast of the parameters, then per step
// the averaged gradients (and the loss, through step(x, y)), with `factors` (m, n, r) for the
// matrices whose Dion factors are averaged instead (then one more number: the sum of their
// gradients' sums).
int64_t expected_bytes(const torch::nn::Sequential& model, int steps, bool loss, bool factors) {
  int64_t numbers = 0, broadcast = 0;
  for (const auto& p : model->parameters()) {
    broadcast += p.numel();
    if (factors && p.dim() == 2) {
      const int64_t m = p.size(0), n = p.size(1);
      numbers += (m + n) * mep::Dion().rank_for(m, n);
    } else {
      numbers += p.numel();
    }
  }
  numbers += (loss ? 1 : 0) + (factors ? 1 : 0);
  return 8 * (broadcast + steps * numbers);
}

template <class Opt>
void expect_two_halves_match_one_whole(typename Opt::Options options) {
  constexpr int kSteps = 5;
  const auto data = batches(kSteps, 16);
  torch::manual_seed(0);
  auto reference = mlp();
  reference->to(torch::kFloat64);
  const auto initial = mep_test::parameter_values(reference);
  {
    auto model = reference;
    auto opt = make<Opt>(model, options);
    for (int s = 0; s < kSteps; ++s) train_step(opt, model, data.x[s], data.y[s]);
  }
  std::vector<std::vector<torch::Tensor>> ranks(2);
  std::vector<int64_t> bytes(2);
  run_ranks(2, 20s, [&](int rank, mep::ProcessGroupPtr group) {
    torch::manual_seed(100 + rank);  // different initial weights: the optimizer broadcasts rank 0's
    auto model = mlp();
    model->to(torch::kFloat64);
    if (rank == 0) mep_test::set_parameters(model, initial);
    auto opt = make<Opt>(model, typename Opt::Options(options).process_group(group));
    for (int s = 0; s < kSteps; ++s)
      train_step(opt, model, data.x[s].narrow(0, 8 * rank, 8), data.y[s].narrow(0, 8 * rank, 8));
    for (const auto& p : model->parameters()) ranks[rank].push_back(p.detach().clone());
    bytes[rank] = opt.data_parallel().bytes();
  });
  const auto expected = reference->parameters();
  ASSERT_EQ(ranks[0].size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_TRUE(torch::equal(ranks[0][i], ranks[1][i])) << "parameter " << i;
  EXPECT_LE(mep_test::max_abs_diff(ranks[0], expected), 1e-6);
  EXPECT_GT(mep_test::max_abs_diff(ranks[0], initial), 1e-3);  // the 5 steps moved the weights
  EXPECT_EQ(bytes[0], bytes[1]);
  EXPECT_EQ(bytes[0], expected_bytes(reference, kSteps, !std::is_same_v<typename Opt::GradientPolicy, mep::BackpropGradient>,
                                     std::is_same_v<typename Opt::UpdatePolicy, mep::Dion>));
}

}  // namespace

TEST(DataParallel, SGDOnTwoRanksMatchesOneRank) {
  expect_two_halves_match_one_whole<mep::SGD>(mep::SGDOptions(0.1));
}
TEST(DataParallel, MuonOnTwoRanksMatchesOneRank) {
  expect_two_halves_match_one_whole<mep::reference::Muon>(mep::reference::MuonOptions(0.02));
}
TEST(DataParallel, SMEPOnTwoRanksMatchesOneRank) {
  expect_two_halves_match_one_whole<mep::SMEP>(mep::SMEPOptions(0.02));
}
TEST(DataParallel, SDMEPOnTwoRanksMatchesOneRank) {
  // dion_thresh 0: every weight takes Dion's low-rank path (the benchmark models' large ones do).
  expect_two_halves_match_one_whole<mep::SDMEP>(mep::SDMEPOptions(0.02).dion_thresh(0));
}
TEST(DataParallel, NaturalEPMuonOnTwoRanksMatchesOneRank) {
  expect_two_halves_match_one_whole<mep::NaturalEPMuon>(mep::NaturalEPMuonOptions(0.02));
}

// Dion's distributed form at every weight shape of the benchmark models (as out × in·kernel
// matrices): two ranks with their own gradients, averaging only B·Q and Bᵀ·P, reach the
// direction of one process with the averaged gradient, over three steps (momentum carried
// per rank), and hand (m + n)·r numbers per step to the all-reduces instead of m·n.
TEST(DataParallel, DionAveragesItsFactorsInsteadOfTheGradient) {
  const std::pair<int64_t, int64_t> shapes[] = {{256, 784}, {10, 256}, {512, 784}, {256, 512},
                                                {32, 9},    {64, 288}, {128, 3136}, {10, 128}};
  mep::Dion dion;
  dion.thresh = 0;
  for (auto [m, n] : shapes) {
    torch::manual_seed(3);
    std::vector<std::vector<torch::Tensor>> grads(3);
    for (auto& step : grads)
      for (int r = 0; r < 2; ++r) step.push_back(torch::randn({m, n}, torch::kFloat64));
    mep::ParamState single_state;
    std::vector<torch::Tensor> expected;
    for (const auto& step : grads) expected.push_back(dion.direction((step[0] + step[1]) / 2, single_state));
    std::vector<std::vector<torch::Tensor>> got(2);
    std::vector<int64_t> bytes(2);
    run_ranks(2, 20s, [&](int rank, mep::ProcessGroupPtr group) {
      mep::DataParallel parallel(group);
      mep::ParamState st;
      for (const auto& step : grads) got[rank].push_back(dion.direction(step[rank], st, &parallel));
      bytes[rank] = parallel.bytes();
    });
    const int64_t r = dion.rank_for(m, n), per_step = (m + n) * r * 8;
    std::cout << "[ Dion     ] " << m << "x" << n << " rank " << r << ": " << bytes[0] / 3 << " bytes/step (gradient "
              << m * n * 8 << ")" << std::endl;
    EXPECT_EQ(bytes[0], 3 * per_step) << m << "x" << n;
    for (size_t k = 0; k < grads.size(); ++k) {
      EXPECT_TRUE(torch::equal(got[0][k], got[1][k])) << m << "x" << n << " step " << k;
      EXPECT_LE((got[0][k] - expected[k]).abs().max().item<double>(), 1e-9) << m << "x" << n << " step " << k;
    }
  }
}

// A rank that throws in its step never joins the all-reduce: the other one fails with an
// error naming it, its parameters untouched — at once when the failed rank's process group
// goes away with it, and after the group's timeout (2 s here) when it stays alive.
void expect_failing_rank_fails_the_other(bool failed_rank_keeps_group) {
  const auto started = std::chrono::steady_clock::now();
  std::string message;
  bool unchanged = false;
  std::promise<void> done;
  auto finished = done.get_future().share();
  run_ranks(2, 2s, [&](int rank, mep::ProcessGroupPtr group) {
    torch::manual_seed(0);
    auto model = mlp();
    mep::SMEP opt(model, mep::SMEPOptions().process_group(group));
    if (rank == 1) {
      EXPECT_THROW(opt.step(torch::randn({8, 7}), torch::randint(0, 10, {8})), std::invalid_argument);
      if (failed_rank_keeps_group) finished.wait_for(60s);
      return;
    }
    const auto before = mep_test::parameter_values(model);
    try {
      opt.step(torch::randn({8, 20}), torch::randint(0, 10, {8}));
    } catch (const std::runtime_error& e) {
      message = e.what();
    }
    unchanged = mep_test::max_abs_diff(model->parameters(), before) == 0;
    done.set_value();
  });
  const auto took = std::chrono::steady_clock::now() - started;
  std::cout << "[ message  ] " << message << std::endl;
  EXPECT_NE(message.find("rank 0 of 2"), std::string::npos) << message;
  EXPECT_NE(message.find("all-reduce of the gradients failed"), std::string::npos) << message;
  EXPECT_TRUE(unchanged);
  if (failed_rank_keeps_group) EXPECT_GE(took, 2s) << "failed before the timeout: " << message;
  EXPECT_LT(took, 30s);
}

TEST(DataParallel, AFailingRankMakesTheOtherFailInsteadOfHanging) { expect_failing_rank_fails_the_other(false); }
TEST(DataParallel, AStuckRankMakesTheOtherFailAfterTheTimeout) { expect_failing_rank_fails_the_other(true); }

// BatchNorm's running statistics (the ranks' shards differ) are averaged with the
// gradients, so the ranks' models stay identical, buffers included.
TEST(DataParallel, BatchNormStatisticsStayIdenticalAcrossRanks) {
  std::vector<std::vector<torch::Tensor>> buffers(2);
  run_ranks(2, 20s, [&](int rank, mep::ProcessGroupPtr group) {
    torch::manual_seed(rank);
    auto model = torch::nn::Sequential(torch::nn::Linear(20, 32), torch::nn::BatchNorm1d(32), torch::nn::ReLU(),
                                       torch::nn::Linear(32, 10));
    mep::SDMEP opt(model, mep::SDMEPOptions().process_group(group));
    for (int s = 0; s < 3; ++s) opt.step(torch::randn({8, 20}), torch::randint(0, 10, {8}));
    for (const auto& b : model->buffers()) buffers[rank].push_back(b.clone());
    for (const auto& p : model->parameters()) buffers[rank].push_back(p.detach().clone());
  });
  ASSERT_EQ(buffers[0].size(), buffers[1].size());
  for (size_t i = 0; i < buffers[0].size(); ++i) EXPECT_TRUE(torch::equal(buffers[0][i], buffers[1][i])) << i;
}

TEST(DataParallel, RejectsAnotherGroupInAParameterGroupAndBadConfigurations) {
  run_ranks(1, 10s, [&](int, mep::ProcessGroupPtr group) {
    auto model = mlp();
    auto params = model->parameters();
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<torch::Tensor>{params[0]},
                        std::make_unique<mep::SGDOptions>(mep::SGDOptions(0.1).process_group(group)));
    EXPECT_THROW(mep::SGD(groups, mep::SGDOptions(0.1)), mep::OptionError);
    // A group of one rank changes nothing.
    mep::SGD single(params, mep::SGDOptions(0.1).process_group(group));
    EXPECT_FALSE(single.data_parallel().active());
  });
  mep::ProcessGroupConfig c;
  c.rank = 2, c.world_size = 2;
  EXPECT_THROW(c.validate(), std::invalid_argument);
  c.rank = 0, c.master_port = 70000;
  EXPECT_THROW(c.validate(), std::invalid_argument);
  c.master_port = 29500, c.backend = "mpi";
  EXPECT_THROW(c.validate(), std::invalid_argument);
  setenv("WORLD_SIZE", "two", 1);
  try {
    mep::ProcessGroupConfig::from_environment();
    ADD_FAILURE() << "WORLD_SIZE=two accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("WORLD_SIZE"), std::string::npos) << e.what();
  }
  unsetenv("WORLD_SIZE");
}
