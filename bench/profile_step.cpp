// mep_profile: where one optimizer's training step spends its time, by LibTorch operator.
// Runs --warmup steps, then --steps steps under LibTorch's autograd profiler (which records
// every ATen operator, with or without autograd) on a fixed batch, and writes the Chrome
// trace; scripts/maintainer/profile_table.py turns it into a table of self times per operator.
//
//   build/bench/mep_profile --model cnn --optimizer eqprop --trace results/eqprop_cnn.trace.json
//   python3 scripts/maintainer/profile_table.py results/eqprop_cnn.trace.json
#include "trainers.hpp"

#include <CLI/CLI.hpp>
#include <torch/csrc/autograd/profiler_legacy.h>

#include <iostream>

int main(int argc, char** argv) {
  CLI::App app{"mep_profile: one optimizer's training step under LibTorch's profiler (Chrome trace)"};
  std::string model_name = "cnn", optimizer = "eqprop", data = "data/mnist", trace;
  int threads = 2, steps = 10, warmup = 3;
  int64_t batch = 128;
  app.add_option("--model", model_name)->check(CLI::IsMember({"mlp", "mlp_small", "cnn"}))->capture_default_str();
  app.add_option("--optimizer", optimizer, "one of mep_bench's optimizers")->capture_default_str();
  app.add_option("--data", data, "directory with the IDX files")->capture_default_str();
  app.add_option("--threads", threads)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--steps", steps, "profiled steps")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--warmup", warmup, "steps before profiling")->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--batch", batch)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--trace", trace, "Chrome trace to write")->required();
  CLI11_PARSE(app, argc, argv);
  try {
    const auto* entry = mep_bench::find_entry(optimizer);
    if (!entry) throw std::invalid_argument("--optimizer " + optimizer + ": unknown");
    torch::set_num_threads(threads);
    const auto split = mep::data::load_split(data, true, batch);
    torch::manual_seed(0);
    auto model = mep::models::by_name(model_name);
    model->train();
    mep_bench::TrainerConfig config;
    config.lr = entry->lr;
    auto trainer = entry->make(model, config);
    for (int i = 0; i < warmup; ++i) trainer->step(split.images, split.labels);
    {
      torch::autograd::profiler::RecordProfile profile(trace);
      for (int i = 0; i < steps; ++i) trainer->step(split.images, split.labels);
    }
    std::cout << "mep_profile: " << steps << " steps of " << optimizer << " on " << model_name << ", batch " << batch
              << ", " << threads << " threads: " << trace << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "mep_profile: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
