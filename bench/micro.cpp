// Google Benchmark micro-benchmarks of the EP engine's settling: on each benchmark
// model, one EP gradient with each settling policy against one backprop forward + backward,
// with the fidelity of each settling as counters:
//   cos     cosine between its EP gradient and the converged one (the same β, HeavyBall settled
//           to a standstill: 2,000 adaptive steps, tol 0)
//   steps   settling steps (sweeps) it took, residual ‖∂E/∂s‖/‖s‖ at its final states
// The models are those of mep_bench after 30 training steps of the reference SMEP on the
// first digits of data/mnist (batch 128, float32).
//
// Run: build/bench/mep_micro --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
// (MEP_DATA=DIR for another data directory; MEP_THREADS for another intra-op thread count.)
#include <benchmark/benchmark.h>
#include <mep/mep.hpp>

#include <cstdlib>
#include <map>
#include <memory>

namespace {

constexpr int64_t kBatch = 128;

int threads() {
  const char* t = std::getenv("MEP_THREADS");
  return t ? std::atoi(t) : 2;
}

const char* model_name(int64_t i) { return i == 0 ? "mlp_small" : i == 1 ? "mlp" : "cnn"; }

/// A benchmark model trained for 30 reference-SMEP steps, and one batch of digits.
struct Fixture {
  torch::nn::Sequential model{nullptr};
  torch::Tensor x, y;
  std::vector<torch::Tensor> converged;  // the converged EP gradient at (model, x, y)
};

std::vector<torch::Tensor> grads_of(const torch::nn::Sequential& m) {
  std::vector<torch::Tensor> g;
  for (const auto& p : m->parameters()) g.push_back(p.grad().detach().clone());
  return g;
}

Fixture& fixture(int64_t which) {
  static std::map<int64_t, std::unique_ptr<Fixture>> cache;
  auto& slot = cache[which];
  if (slot) return *slot;
  slot = std::make_unique<Fixture>();
  Fixture& f = *slot;
  const char* dir = std::getenv("MEP_DATA");
  auto data = mep::data::load_split(dir ? dir : "data/mnist", true, 30 * kBatch + kBatch);
  torch::manual_seed(0);
  f.model = mep::models::by_name(model_name(which));
  f.model->train();
  mep::reference::SMEP trainer(f.model, mep::reference::SMEP::Options());
  for (int64_t i = 0; i < 30; ++i)
    trainer.step(data.images.narrow(0, i * kBatch, kBatch), data.labels.narrow(0, i * kBatch, kBatch));
  f.x = data.images.narrow(0, 30 * kBatch, kBatch);
  f.y = data.labels.narrow(0, 30 * kBatch, kBatch);
  using Converged = mep::BasicEPGradient<mep::HeavyBall>;
  Converged ep(mep::BasicEPGradientOptions<mep::HeavyBall>().settle_steps(2000).tol(0).adaptive(true));
  ep.compute(f.model, f.x, f.y);
  f.converged = grads_of(f.model);
  return f;
}

double cosine(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    dot += (a[i].to(torch::kDouble) * b[i].to(torch::kDouble)).sum().item<double>();
    na += a[i].to(torch::kDouble).pow(2).sum().item<double>();
    nb += b[i].to(torch::kDouble).pow(2).sum().item<double>();
  }
  return dot / std::sqrt(na * nb);
}

template <class Settling>
void run_ep(benchmark::State& state, const mep::BasicEPGradientOptions<Settling>& options, const std::string& label) {
  torch::set_num_threads(threads());
  Fixture& f = fixture(state.range(0));
  mep::BasicEPGradient<Settling> ep(options);
  ep.compute(f.model, f.x, f.y);
  state.counters["cos"] = cosine(grads_of(f.model), f.converged);
  state.counters["steps"] = static_cast<double>(ep.report().steps());
  state.counters["residual"] = ep.report().residual();
  for (auto _ : state) benchmark::DoNotOptimize(ep.compute(f.model, f.x, f.y));
  state.SetLabel(std::string(model_name(state.range(0))) + " " + label);
}

using HBOptions = mep::BasicEPGradientOptions<mep::HeavyBall>;
using SweepOptions = mep::BasicEPGradientOptions<mep::LayerSweep>;

// The library default (mep::EPGradient).
void BM_EP_Default(benchmark::State& state) { run_ep(state, mep::EPGradientOptions(), "default settling"); }
// The reference's: 10 heavy-ball steps of 0.05, adaptive, tol 1e-5, patience 3.
void BM_EP_HeavyBallReference(benchmark::State& state) { run_ep(state, HBOptions(), "heavy-ball 10 x 0.05 adaptive"); }
// Heavy ball at settle_lr 0.5, arg 1 steps, fixed step, no early stop.
void BM_EP_HeavyBall05(benchmark::State& state) {
  run_ep(state, HBOptions().settle_lr(0.5).settle_steps(state.range(1)).adaptive(false).tol(0),
         "heavy-ball " + std::to_string(state.range(1)) + " x 0.5");
}
// Layer sweeps, arg 1 sweeps of unit step.
void BM_EP_LayerSweep(benchmark::State& state) {
  run_ep(state, SweepOptions().settle_steps(state.range(1)).tol(0), std::to_string(state.range(1)) + " layer sweeps");
}

BENCHMARK(BM_EP_Default)->DenseRange(0, 2)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EP_HeavyBallReference)->DenseRange(0, 2)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EP_HeavyBall05)->ArgsProduct({{0, 1, 2}, {5, 10}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_EP_LayerSweep)->ArgsProduct({{0, 1, 2}, {1, 2, 3, 4, 6}})->Unit(benchmark::kMicrosecond);

void BM_Backprop(benchmark::State& state) {
  torch::set_num_threads(threads());
  Fixture& f = fixture(state.range(0));
  f.model->eval();  // dropout off, as in EP
  for (auto _ : state) {
    for (auto& p : f.model->parameters())  // zero_grad() as a training loop does it
      if (p.grad().defined()) p.mutable_grad().zero_();
    auto loss = torch::nn::functional::cross_entropy(f.model->forward(f.x), f.y);
    loss.backward();
    benchmark::DoNotOptimize(loss);
  }
  f.model->train();
  state.SetLabel(std::string(model_name(state.range(0))) + " backprop forward+backward");
}
BENCHMARK(BM_Backprop)->DenseRange(0, 2)->Unit(benchmark::kMicrosecond);

// The update alone: mep::SGD and mep::Adam (with their finiteness checks and rollback) against
// torch::optim's, on mlp's parameters with fixed gradients.
template <class Opt>
void run_update(benchmark::State& state, Opt& opt) {
  for (auto _ : state) opt.step();
}
std::vector<torch::Tensor> mlp_parameters_with_grads() {
  torch::manual_seed(0);
  auto m = mep::models::mlp();
  auto params = m->parameters();
  for (auto& p : params) p.mutable_grad() = 1e-3 * torch::randn_like(p);
  return params;
}
void BM_Update_MepSGD(benchmark::State& state) {
  torch::set_num_threads(threads());
  mep::SGD opt(mlp_parameters_with_grads(), mep::SGDOptions(0.01).momentum(0.9).weight_decay(5e-4));
  run_update(state, opt);
  state.SetLabel("mlp parameters, mep::SGD");
}
void BM_Update_TorchSGD(benchmark::State& state) {
  torch::set_num_threads(threads());
  torch::optim::SGD opt(mlp_parameters_with_grads(), torch::optim::SGDOptions(0.01).momentum(0.9).weight_decay(5e-4));
  run_update(state, opt);
  state.SetLabel("mlp parameters, torch::optim::SGD");
}
void BM_Update_MepAdam(benchmark::State& state) {
  torch::set_num_threads(threads());
  mep::Adam opt(mlp_parameters_with_grads(), mep::AdamOptions(1e-3).weight_decay(5e-4));
  run_update(state, opt);
  state.SetLabel("mlp parameters, mep::Adam");
}
void BM_Update_TorchAdam(benchmark::State& state) {
  torch::set_num_threads(threads());
  torch::optim::Adam opt(mlp_parameters_with_grads(), torch::optim::AdamOptions(1e-3).weight_decay(5e-4));
  run_update(state, opt);
  state.SetLabel("mlp parameters, torch::optim::Adam");
}
BENCHMARK(BM_Update_MepSGD)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Update_TorchSGD)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Update_MepAdam)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Update_TorchAdam)->Unit(benchmark::kMicrosecond);

// The cnn's second convolution (32 → 64 channels, 3×3, 14×14, batch 128) as the settling
// loop needs it: forward and input VJP by ATen's kernels (what the engine runs; they return
// new tensors), against im2col_out + bmm_out into buffers kept between calls (allocation-free).
struct Conv2 {
  torch::Tensor in = torch::randn({kBatch, 32, 14, 14}), w = torch::randn({64, 32, 3, 3}), e = torch::randn({kBatch, 64, 14, 14});
  torch::Tensor cols = torch::empty({kBatch, 288, 196}), out = torch::empty({kBatch, 64, 196});
  torch::Tensor cols_grad = torch::empty({kBatch, 288, 196}), in_grad = torch::empty({kBatch, 32, 14, 14});
};
void BM_Conv2_ATen(benchmark::State& state) {
  torch::set_num_threads(threads());
  torch::NoGradGuard no_grad;
  Conv2 c;
  for (auto _ : state) {
    if (state.range(0) == 0) benchmark::DoNotOptimize(at::conv2d(c.in, c.w, {}, 1, 1));
    else
      benchmark::DoNotOptimize(at::convolution_backward(c.e, c.in, c.w, c10::nullopt, {1, 1}, {1, 1}, {1, 1}, false,
                                                        {0, 0}, 1, {true, false, false}));
  }
  state.SetLabel(state.range(0) == 0 ? "cnn conv2 forward, ATen" : "cnn conv2 input VJP, ATen");
}
void BM_Conv2_Im2col(benchmark::State& state) {
  torch::set_num_threads(threads());
  torch::NoGradGuard no_grad;
  Conv2 c;
  auto w = c.w.reshape({64, 288}).expand({kBatch, 64, 288});
  auto wt = c.w.reshape({64, 288}).t().expand({kBatch, 288, 64});
  auto e = c.e.reshape({kBatch, 64, 196});
  for (auto _ : state) {
    if (state.range(0) == 0) {
      at::im2col_out(c.cols, c.in, {3, 3}, {1, 1}, {1, 1}, {1, 1});
      at::bmm_out(c.out, w, c.cols);
    } else {
      at::bmm_out(c.cols_grad, wt, e);
      at::col2im_out(c.in_grad, c.cols_grad, {14, 14}, {3, 3}, {1, 1}, {1, 1}, {1, 1});
    }
  }
  state.SetLabel(state.range(0) == 0 ? "cnn conv2 forward, im2col + bmm" : "cnn conv2 input VJP, bmm + col2im");
}
BENCHMARK(BM_Conv2_ATen)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Conv2_Im2col)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond);

// The cnn's first max pooling (2×2 on [128, 32, 28, 28]): ATen's functional kernels against
// the engine's op, which runs the same kernels into its workspace.
void BM_MaxPool1(benchmark::State& state) {
  torch::set_num_threads(threads());
  torch::NoGradGuard no_grad;
  auto chain = mep::Chain::from(mep::models::cnn());
  const mep::Op& pool = chain.segments[1].pre[1];
  auto in = torch::randn({kBatch, 32, 28, 28}), grad = torch::randn({kBatch, 32, 14, 14});
  mep::OpTape tape;
  pool.prepare(in, tape);
  pool.forward(in, tape);
  auto [out, indices] = at::max_pool2d_with_indices(in, {2, 2}, {2, 2});
  for (auto _ : state) {
    switch (state.range(0)) {
      case 0: benchmark::DoNotOptimize(at::max_pool2d_with_indices(in, {2, 2}, {2, 2})); break;
      case 1: benchmark::DoNotOptimize(pool.forward(in, tape)); break;
      case 2:
        benchmark::DoNotOptimize(
            at::max_pool2d_with_indices_backward(grad, in, {2, 2}, {2, 2}, {0, 0}, {1, 1}, false, indices));
        break;
      default: benchmark::DoNotOptimize(pool.vjp(grad, in, tape));
    }
  }
  const char* labels[] = {"cnn pool1 forward, ATen with indices", "cnn pool1 forward, mep::Op into the workspace",
                          "cnn pool1 VJP, ATen", "cnn pool1 VJP, mep::Op into the workspace"};
  state.SetLabel(labels[state.range(0)]);
}
BENCHMARK(BM_MaxPool1)->DenseRange(0, 3)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
