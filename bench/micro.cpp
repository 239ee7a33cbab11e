// Google Benchmark micro-benchmarks of the EP engine (issue [2], SPEC §10):
//  - one settling step (energy + ∂E/∂s), analytic versus autograd VJPs;
//  - the full EP gradient (10 settling steps, free phase skipped) versus one backprop
//    forward + backward of the same model and batch.
// Run: build/bench/mep_micro --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <mep/mep.hpp>

namespace {

struct Setup {
  torch::nn::Sequential model{nullptr};
  torch::Tensor x, y;
  explicit Setup(const std::string& name) {
    torch::manual_seed(0);
    model = mep::models::by_name(name);
    x = torch::randn({128, 1, 28, 28});
    y = torch::randint(0, 10, {128}, torch::kLong);
  }
};

const char* model_name(int64_t i) { return i == 0 ? "mlp_small" : "mlp"; }

void BM_SettleStep(benchmark::State& state) {
  torch::set_num_threads(1);
  Setup s(model_name(state.range(0)));
  const bool analytic = state.range(1) != 0;
  auto chain = mep::Chain::from(s.model);
  mep::Settler settler(chain, mep::Nudging{}, s.x, s.y);
  auto states = chain.feedforward(s.x);
  for (auto& t : states) t = t + 0.01 * torch::randn_like(t);
  std::vector<torch::Tensor> grads(states.size());
  mep::Phase ph;
  torch::NoGradGuard no_grad;
  for (auto _ : state) benchmark::DoNotOptimize(settler.evaluate(states, 0.5, grads, analytic, ph));
  state.SetLabel(std::string(model_name(state.range(0))) + (analytic ? " analytic" : " autograd"));
}
BENCHMARK(BM_SettleStep)->ArgsProduct({{0, 1}, {1, 0}})->Unit(benchmark::kMicrosecond);

void BM_EPGradient(benchmark::State& state) {
  torch::set_num_threads(1);
  Setup s(model_name(state.range(0)));
  mep::EPGradient ep(mep::EPGradientOptions().settle_steps(10).tol(0).adaptive(false));
  for (auto _ : state) benchmark::DoNotOptimize(ep.compute(s.model, s.x, s.y));
  state.SetLabel(std::string(model_name(state.range(0))) + " EP, 10 settling steps");
}
BENCHMARK(BM_EPGradient)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

void BM_Backprop(benchmark::State& state) {
  torch::set_num_threads(1);
  Setup s(model_name(state.range(0)));
  s.model->eval();  // dropout off, as in EP
  for (auto _ : state) {
    for (auto& p : s.model->parameters())  // zero_grad() as a training loop does it
      if (p.grad().defined()) p.mutable_grad().zero_();
    auto loss = torch::nn::functional::cross_entropy(s.model->forward(s.x), s.y);
    loss.backward();
    benchmark::DoNotOptimize(loss);
  }
  state.SetLabel(std::string(model_name(state.range(0))) + " backprop forward+backward");
}
BENCHMARK(BM_Backprop)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
