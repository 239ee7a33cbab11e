// Google Benchmark: one training step of every mep optimizer on each benchmark model at batch
// 128, next to torch::optim's SGD and Adam with the same options on the same models.
//   backprop family (mep and torch::optim): zero_grad, forward, cross-entropy, backward, step()
//   EP family: step(x, y) (settling, EP gradient, update, constraint)
// The optimizers use mep_bench's options (bench/trainers.hpp); the models start from seed 0
// and train on one fixed batch of digits (data/mnist, or MEP_DATA) in train mode, as in
// mep_bench.
// At every weight shape of the benchmark models (as matrices: out × in·kernel), the Muon
// family's directions, each next to the bare matrix products it performs (its floor):
//   ns/SHAPE/{cubic,quintic,polar_express}   5 Newton–Schulz iterations (mep::newton_schulz)
//   floor/SHAPE/ns       5 × (X·Xᵀ, A·A, B·X) on the small-by-large X: the quintic products
//   dion/SHAPE           one Dion direction at rank_frac 0.3 (QR of B·Q included)
//   floor/SHAPE/dion     B·Q, Bᵀ·P and P·Qᵀ at that rank
//   spectral/SHAPE/{scale,clip}  the spectral constraint's two rules on a matrix with σ > γ
// And each step's floor, the bare matrix products the step must perform on the model's layers
// (Linear: matrix products into preallocated buffers; Conv2d: ATen's convolution kernels):
//   floor/MODEL/OPTIMIZER  gradient:  backprop   forward, input and weight gradients
//                                     EP         feedforward, then per settling sweep the
//                                                forward of every layer but the first and one
//                                                VJP per layer but the first, then the weight
//                                                gradients (one-sided, free phase skipped)
//                          direction: NS         its products per iteration on every weight
//                                     Dion       B·Q, Bᵀ·P, P·Qᵀ (NS below dion_thresh)
//                                     Fisher     gᵀ·g, Cholesky, the solve, then NS
//                          constraint:           2·power_iter + 1 matrix–vector products
//
// Run: build/bench/mep_speed (MEP_THREADS for another intra-op thread count than 2), or
// python3 scripts/maintainer/speed_table.py for the table of medians and ratios.
#include <benchmark/benchmark.h>
#include <mep/mep.hpp>

#include <cstdlib>
#include <algorithm>
#include <array>
#include <functional>
#include <memory>
#include <string>

namespace {

constexpr int64_t kBatch = 128;
const char* const kModels[] = {"mlp_small", "mlp", "cnn"};

int threads() {
  const char* t = std::getenv("MEP_THREADS");
  return t ? std::atoi(t) : 2;
}

struct Batch {
  torch::Tensor x, y;
};

const Batch& batch() {
  static const Batch b = [] {
    const char* dir = std::getenv("MEP_DATA");
    auto data = mep::data::load_split(dir ? dir : "data/mnist", true, kBatch);
    return Batch{data.images, data.labels};
  }();
  return b;
}

torch::nn::Sequential fresh(const char* model) {
  torch::manual_seed(0);
  auto m = mep::models::by_name(model);
  m->train();
  return m;
}

// Steps taken before the timed ones, in every step benchmark: the first steps allocate
// (optimizer state, the EP workspace of a batch shape, the allocator's pages) and a step of
// cnn's EP family lasts longer than Google Benchmark's minimum time, so without them its one
// timed iteration would be the cold first step (about 5x a warm one).
constexpr int kWarmupSteps = 3;

// zero_grad, forward, cross-entropy, backward, step() with an optimizer over the parameters.
template <class Opt, class Options>
void backprop_step(benchmark::State& state, const char* model, const Options& options) {
  torch::set_num_threads(threads());
  auto m = fresh(model);
  Opt opt(m->parameters(), options);
  const auto& b = batch();
  auto train_step = [&] {
    opt.zero_grad();
    auto loss = torch::nn::functional::cross_entropy(m->forward(b.x), b.y);
    loss.backward();
    opt.step();
    return loss;
  };
  for (int i = 0; i < kWarmupSteps; ++i) train_step();
  for (auto _ : state) benchmark::DoNotOptimize(train_step());
}

// step(x, y) of a model-owning (EP family) optimizer.
template <class Opt>
void model_step(benchmark::State& state, const char* model, const typename Opt::Options& options) {
  torch::set_num_threads(threads());
  Opt opt(fresh(model), options);
  const auto& b = batch();
  for (int i = 0; i < kWarmupSteps; ++i) opt.step(b.x, b.y);
  for (auto _ : state) benchmark::DoNotOptimize(opt.step(b.x, b.y));
}

// The weight matrices of mlp_small, mlp and cnn.
const std::pair<int64_t, int64_t> kShapes[] = {{256, 784}, {10, 256}, {512, 784}, {256, 512},
                                               {32, 9},    {64, 288}, {128, 3136}, {10, 128}};

std::string shape_name(std::pair<int64_t, int64_t> s) { return std::to_string(s.first) + "x" + std::to_string(s.second); }

torch::Tensor random_matrix(std::pair<int64_t, int64_t> s) {
  torch::manual_seed(1);
  return torch::randn({s.first, s.second});
}

void register_directions() {
  const std::pair<const char*, mep::NSCoefficients> schedules[] = {{"cubic", mep::NSCoefficients::Cubic},
                                                                   {"quintic", mep::NSCoefficients::Quintic},
                                                                   {"polar_express", mep::NSCoefficients::PolarExpress}};
  for (auto shape : kShapes) {
    const std::string name = shape_name(shape);
    for (const auto& [schedule, coefficients] : schedules)
      benchmark::RegisterBenchmark(("ns/" + name + "/" + schedule).c_str(), [shape, c = coefficients](benchmark::State& st) {
        torch::set_num_threads(threads());
        const auto g = random_matrix(shape);
        for (auto _ : st) benchmark::DoNotOptimize(mep::newton_schulz(g, 5, c));
      })->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("floor/" + name + "/ns").c_str(), [shape](benchmark::State& st) {
      torch::set_num_threads(threads());
      const int64_t small = std::min(shape.first, shape.second), large = std::max(shape.first, shape.second);
      auto x = torch::randn({small, large}), a = torch::empty({small, small}), b = torch::empty({small, small});
      auto y = torch::empty({small, large});
      for (auto _ : st)
        for (int k = 0; k < 5; ++k) {
          at::mm_out(a, x, x.t());
          at::mm_out(b, a, a);
          at::mm_out(y, b, x);
        }
    })->Unit(benchmark::kMillisecond);
    benchmark::RegisterBenchmark(("dion/" + name).c_str(), [shape](benchmark::State& st) {
      torch::set_num_threads(threads());
      mep::Dion dion;
      dion.thresh = 0;
      mep::ParamState state;
      const auto g = random_matrix(shape);
      for (auto _ : st) benchmark::DoNotOptimize(dion.direction(g, state));
    })->Unit(benchmark::kMillisecond);
    for (const auto& [mode, rule] : mep::enum_names(mep::SpectralMode{})) {
      benchmark::RegisterBenchmark(("spectral/" + name + "/" + rule).c_str(), [shape, mode = mode](benchmark::State& st) {
        torch::set_num_threads(threads());
        mep::SpectralConstraint c;
        c.mode = mode;
        mep::ParamState state;
        const auto w0 = random_matrix(shape);  // σ ≈ √m + √n, far above γ
        auto w = w0.clone();
        for (auto _ : st) {
          st.PauseTiming();
          w.copy_(w0);
          st.ResumeTiming();
          c.enforce(w, state);
        }
      })->Unit(benchmark::kMillisecond);
    }
    benchmark::RegisterBenchmark(("floor/" + name + "/dion").c_str(), [shape](benchmark::State& st) {
      torch::set_num_threads(threads());
      const int64_t m = shape.first, n = shape.second, r = mep::Dion().rank_for(m, n);
      auto b = torch::randn({m, n}), q = torch::randn({n, r}), bq = torch::empty({m, r}), btp = torch::empty({n, r});
      auto u = torch::empty({m, n});
      for (auto _ : st) {
        at::mm_out(bq, b, q);
        at::mm_out(btp, b.t(), bq);
        at::mm_out(u, bq, btp.t());
      }
    })->Unit(benchmark::kMillisecond);
  }
}

// The matrix products of one training step on a model, as closures over preallocated
// buffers; the layers and their inputs come from an EP feedforward of the batch.
class Floor {
 public:
  explicit Floor(const char* model) : model_(fresh(model)), chain_(mep::Chain::from(model_)) {
    mep::EPGradient ep;
    ep.compute(model_, batch().x, batch().y);
    for (size_t l = 0; l < chain_.size(); ++l) {
      const auto& t = ep.workspace().tape[l];
      layers_.push_back({&chain_.segments[l], t.in.clone(), torch::randn_like(t.pred)});
    }
  }

  void forward(size_t from = 0) {
    for (size_t l = from; l < layers_.size(); ++l) {
      const auto& [seg, in, out_grad] = layers_[l];
      if (is_linear(l)) add([w = seg->weight, in = in, out = torch::empty_like(out_grad)]() mutable { at::mm_out(out, in, w.t()); });
      else add([seg = seg, in = in] { benchmark::DoNotOptimize(at::convolution(in, seg->weight, {}, seg->stride, seg->padding, seg->dilation, false, {0, 0}, seg->groups)); });
    }
  }
  void backward_input() {  // J_lᵀ·ε_l for every layer but the first
    for (size_t l = 1; l < layers_.size(); ++l) {
      const auto& [seg, in, out_grad] = layers_[l];
      if (is_linear(l)) add([w = seg->weight, e = out_grad, g = torch::empty_like(in)]() mutable { at::mm_out(g, e, w); });
      else add([seg = seg, in = in, e = out_grad] { benchmark::DoNotOptimize(conv_backward(*seg, e, in, {true, false, false})); });
    }
  }
  void backward_weight() {
    for (size_t l = 0; l < layers_.size(); ++l) {
      const auto& [seg, in, out_grad] = layers_[l];
      if (is_linear(l)) add([e = out_grad, in = in, g = torch::empty_like(seg->weight)]() mutable { at::mm_out(g, e.t(), in); });
      else add([seg = seg, in = in, e = out_grad] { benchmark::DoNotOptimize(conv_backward(*seg, e, in, {false, true, false})); });
    }
  }
  void backprop() { forward(), backward_input(), backward_weight(); }
  void ep(int64_t sweeps) {
    forward();
    for (int64_t k = 0; k < sweeps; ++k) forward(1), backward_input();
    backward_weight();
  }

  // Newton–Schulz: X·Xᵀ and B·X per iteration (cubic), or X·Xᵀ, A·A and B·X (quintic).
  void newton_schulz(int64_t steps, bool cubic) {
    for (auto [m, n] : shapes()) newton_schulz(m, n, steps, cubic);
  }
  void dion(int64_t steps, bool cubic) {
    const mep::Dion d;
    for (auto [m, n] : shapes()) {
      if (m * n <= d.thresh) {
        newton_schulz(m, n, steps, cubic);
        continue;
      }
      const int64_t r = d.rank_for(m, n);
      add([b = torch::randn({m, n}), q = torch::randn({n, r}), bq = torch::empty({m, r}), btp = torch::empty({n, r}),
           u = torch::empty({m, n})]() mutable {
        at::mm_out(bq, b, q);
        at::mm_out(btp, b.t(), bq);
        at::mm_out(u, bq, btp.t());
      });
    }
  }
  void fisher() {
    for (auto [m, n] : shapes())
      add([g = torch::randn({m, n}), f = torch::empty({n, n}), m = m]() mutable {
        at::mm_out(f, g.t(), g);
        f.diagonal().add_(static_cast<double>(m));  // positive definite, as F + λI
        benchmark::DoNotOptimize(torch::cholesky_solve(g.t(), torch::linalg_cholesky(f)));
      });
  }
  void spectral(int64_t power_iter) {
    for (auto [m, n] : shapes())
      add([w = torch::randn({m, n}), u = torch::randn({m}), v = torch::randn({n}), power_iter]() mutable {
        for (int64_t k = 0; k < power_iter; ++k) at::mv_out(v, w.t(), u), at::mv_out(u, w, v);
        at::mv_out(u, w, v);
      });
  }

  void run() const {
    for (const auto& op : ops_) op();
  }

 private:
  struct Layer {
    const mep::Segment* seg;
    torch::Tensor in, out_grad;
  };
  bool is_linear(size_t l) const { return layers_[l].seg->kind == mep::LayerKind::Linear; }
  static std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> conv_backward(const mep::Segment& seg, const torch::Tensor& e, const torch::Tensor& in,
                            std::array<bool, 3> mask) {
    return at::convolution_backward(e, in, seg.weight, c10::nullopt, seg.stride, seg.padding, seg.dilation, false,
                                    std::vector<int64_t>(seg.stride.size(), 0), seg.groups, mask);
  }
  std::vector<std::pair<int64_t, int64_t>> shapes() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (const auto& l : layers_) out.push_back({l.seg->weight.size(0), l.seg->weight.numel() / l.seg->weight.size(0)});
    return out;
  }
  void newton_schulz(int64_t m, int64_t n, int64_t steps, bool cubic) {
    const int64_t small = std::min(m, n), large = std::max(m, n);
    add([x = torch::randn({small, large}), a = torch::empty({small, small}), b = torch::empty({small, small}),
         y = torch::empty({small, large}), steps, cubic]() mutable {
      for (int64_t k = 0; k < steps; ++k) {
        at::mm_out(a, x, x.t());
        if (!cubic) at::mm_out(b, a, a);
        at::mm_out(y, cubic ? a : b, x);
      }
    });
  }
  void add(std::function<void()> op) { ops_.push_back(std::move(op)); }

  torch::nn::Sequential model_;
  mep::Chain chain_;
  std::vector<Layer> layers_;
  std::vector<std::function<void()>> ops_;
};

// The floor of each optimizer's step with the options of register_all.
void register_floors() {
  const auto sweeps = mep::LayerSweepDefaults::steps;
  // Newton–Schulz with o's iterations and polynomial, then the spectral constraint.
  const auto ns_and_constraint = [](Floor& f, const auto& o) {
    f.newton_schulz(o.ns_steps(), o.ns_coefficients() == mep::NSCoefficients::Cubic), f.spectral(o.power_iter());
  };
  using Build = std::function<void(Floor&)>;
  const std::pair<const char*, Build> floors[] = {
      {"sgd", [](Floor& f) { f.backprop(); }},
      {"adam", [](Floor& f) { f.backprop(); }},
      {"muon", [&](Floor& f) { f.backprop(), ns_and_constraint(f, mep::reference::MuonOptions(0.02)); }},
      {"eqprop", [&](Floor& f) { f.ep(sweeps); }},
      {"smep", [&](Floor& f) { f.ep(sweeps), ns_and_constraint(f, mep::SMEPOptions(0.01)); }},
      {"sdmep",
       [&](Floor& f) {
         const mep::SDMEPOptions o(0.01);
         f.ep(sweeps), f.dion(o.ns_steps(), o.ns_coefficients() == mep::NSCoefficients::Cubic), f.spectral(o.power_iter());
       }},
      {"local_ep", [&](Floor& f) { f.ep(sweeps), ns_and_constraint(f, mep::LocalEPMuonOptions(0.01)); }},
      {"natural_ep", [&](Floor& f) { f.ep(sweeps), f.fisher(), ns_and_constraint(f, mep::NaturalEPMuonOptions(0.01)); }},
  };
  for (const char* model : kModels)
    for (const auto& [name, build] : floors)
      benchmark::RegisterBenchmark((std::string("floor/") + model + "/" + name).c_str(),
                                   [build = build, model](benchmark::State& s) {
                                     torch::set_num_threads(threads());
                                     torch::NoGradGuard no_grad;
                                     Floor f(model);
                                     build(f);
                                     for (auto _ : s) f.run();
                                   })
          ->Unit(benchmark::kMillisecond);
}

void register_all() {
  using Fn = std::function<void(benchmark::State&, const char*)>;
  const std::pair<const char*, Fn> steps[] = {
      {"sgd", [](auto& s, auto m) { backprop_step<mep::reference::SGD>(s, m, mep::reference::SGDOptions(0.1)); }},
      {"torch_sgd",
       [](auto& s, auto m) {
         backprop_step<torch::optim::SGD>(s, m, torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(5e-4));
       }},
      {"adam", [](auto& s, auto m) { backprop_step<mep::reference::Adam>(s, m, mep::reference::AdamOptions(1e-3)); }},
      {"torch_adam",
       [](auto& s, auto m) { backprop_step<torch::optim::Adam>(s, m, torch::optim::AdamOptions(1e-3).weight_decay(5e-4)); }},
      {"muon", [](auto& s, auto m) { backprop_step<mep::reference::Muon>(s, m, mep::reference::MuonOptions(0.02)); }},
      {"eqprop", [](auto& s, auto m) { model_step<mep::EqProp>(s, m, mep::EqPropOptions(0.05)); }},
      {"smep", [](auto& s, auto m) { model_step<mep::SMEP>(s, m, mep::SMEPOptions(0.01)); }},
      {"sdmep", [](auto& s, auto m) { model_step<mep::SDMEP>(s, m, mep::SDMEPOptions(0.01)); }},
      {"local_ep", [](auto& s, auto m) { model_step<mep::LocalEPMuon>(s, m, mep::LocalEPMuonOptions(0.01)); }},
      {"natural_ep", [](auto& s, auto m) { model_step<mep::NaturalEPMuon>(s, m, mep::NaturalEPMuonOptions(0.01)); }},
  };
  for (const char* model : kModels)
    for (const auto& [name, fn] : steps)
      benchmark::RegisterBenchmark((std::string("step/") + model + "/" + name).c_str(),
                                   [fn = fn, model](benchmark::State& s) { fn(s, model); })
          ->Unit(benchmark::kMillisecond);
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  register_floors();
  register_directions();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
