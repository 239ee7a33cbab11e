// mep_ops: how many ATen operators one training step runs, per optimizer and model, and how
// many of them read a value on the host (bench/op_count.hpp says what is counted). On a GPU
// a step costs about (leaf ops) × (launch overhead) plus one pipeline drain per sync.
//
//   build/bench/mep_ops                      the table (steady state: after 3 steps, batch 128)
//   build/bench/mep_ops --check              also checks the budgets, exit 1 if one fails:
//     - every default optimizer: at most 1 sync per step;
//     - mep::SGD's and mep::Adam's update: at most torch::optim's with the same options;
//     - an EqProp step: at most 3 × (backprop forward+backward + torch::optim::SGD's update).
#include "op_count.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <mep/mep.hpp>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

torch::nn::Sequential fresh(const std::string& model) {
  torch::manual_seed(0);
  auto m = mep::models::by_name(model);
  m->train();
  return m;
}

struct Batch {
  torch::Tensor x, y;
};

// A fixed batch of digit-shaped input: the counts do not depend on the values.
Batch make_batch(int64_t batch) {
  torch::manual_seed(1);
  return {torch::rand({batch, 1, 28, 28}), torch::randint(0, 10, {batch}, torch::kLong)};
}

constexpr int kWarmup = 3;

// zero_grad, forward, cross-entropy, backward: the backprop part of a step.
void forward_backward(torch::nn::Sequential& m, const Batch& b) {
  for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
  torch::nn::functional::cross_entropy(m->forward(b.x), b.y).backward();
}

// The update alone: forward and backward outside the count.
template <class Opt, class Options>
mep_bench::OpCount update_ops(const std::string& model, const Batch& b, const Options& options) {
  auto m = fresh(model);
  Opt opt(m->parameters(), options);
  for (int i = 0; i < kWarmup; ++i) forward_backward(m, b), opt.step();
  forward_backward(m, b);
  return mep_bench::count_ops([&] { opt.step(); });
}

template <class Opt>
mep_bench::OpCount model_step_ops(const std::string& model, const Batch& b, const typename Opt::Options& options) {
  Opt opt(fresh(model), options);
  for (int i = 0; i < kWarmup; ++i) opt.step(b.x, b.y);
  return mep_bench::count_ops([&] { opt.step(b.x, b.y); });
}

struct Row {
  std::string name;
  std::function<mep_bench::OpCount(const std::string&, const Batch&)> count;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"mep_ops: ATen operators (leaf ops) and host reads (syncs) of one training step"};
  bool check = false, verbose = false;
  int64_t batch = 128;
  std::vector<std::string> models{"mlp_small", "mlp", "cnn"};
  app.add_flag("--check", check, "check the budgets; exit 1 if one fails");
  app.add_flag("--verbose", verbose, "list the operators of each count");
  app.add_option("--batch", batch)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--models", models)->check(CLI::IsMember({"mlp_small", "mlp", "cnn"}))->delimiter(',');
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(1);
  const Batch b = make_batch(batch);

  const auto sgd_options = [] { return mep::SGDOptions(0.1).momentum(0.9).weight_decay(5e-4); };
  const auto torch_sgd_options = [] { return torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(5e-4); };
  const std::vector<Row> rows = {
      {"torch::optim::SGD update (momentum 0.9, wd 5e-4)",
       [&](auto& m, auto& b) { return update_ops<torch::optim::SGD>(m, b, torch_sgd_options()); }},
      {"mep::SGD update (same options)", [&](auto& m, auto& b) { return update_ops<mep::SGD>(m, b, sgd_options()); }},
      {"torch::optim::Adam update (lr 1e-3)",
       [&](auto& m, auto& b) { return update_ops<torch::optim::Adam>(m, b, torch::optim::AdamOptions(1e-3)); }},
      {"mep::Adam update (lr 1e-3)", [&](auto& m, auto& b) { return update_ops<mep::Adam>(m, b, mep::AdamOptions(1e-3)); }},
      {"mep::reference::Muon update",
       [&](auto& m, auto& b) { return update_ops<mep::reference::Muon>(m, b, mep::reference::MuonOptions()); }},
      {"mep::EqProp step", [&](auto& m, auto& b) { return model_step_ops<mep::EqProp>(m, b, mep::EqPropOptions()); }},
      {"mep::SMEP step", [&](auto& m, auto& b) { return model_step_ops<mep::SMEP>(m, b, mep::SMEPOptions()); }},
      {"mep::SDMEP step", [&](auto& m, auto& b) { return model_step_ops<mep::SDMEP>(m, b, mep::SDMEPOptions()); }},
      {"mep::LocalEPMuon step",
       [&](auto& m, auto& b) { return model_step_ops<mep::LocalEPMuon>(m, b, mep::LocalEPMuonOptions()); }},
      {"mep::NaturalEPMuon step",
       [&](auto& m, auto& b) { return model_step_ops<mep::NaturalEPMuon>(m, b, mep::NaturalEPMuonOptions()); }},
  };

  std::vector<std::string> failures;
  std::string header = "| per step (leaf ops · syncs) |", rule = "|---|";
  for (const auto& m : models) header += fmt::format(" {} |", m), rule += "---|";
  std::vector<std::string> lines(rows.size() + 1);
  lines[0] = "| backprop forward+backward |";
  for (size_t i = 0; i < rows.size(); ++i) lines[i + 1] = "| " + rows[i].name + " |";
  for (const auto& model : models) {
    auto m = fresh(model);
    forward_backward(m, b);
    const auto bp = mep_bench::count_ops([&] { forward_backward(m, b); });
    lines[0] += fmt::format(" {} · {} |", bp.leaf, bp.syncs);
    std::vector<mep_bench::OpCount> counts;
    for (size_t i = 0; i < rows.size(); ++i) {
      counts.push_back(rows[i].count(model, b));
      lines[i + 1] += fmt::format(" {} · {} |", counts.back().leaf, counts.back().syncs);
      if (verbose) {
        std::cerr << model << " / " << rows[i].name << ":";
        for (const auto& [name, n] : counts.back().by_name) std::cerr << " " << name << "×" << n;
        std::cerr << "\n";
      }
      if (rows[i].name.rfind("mep::", 0) == 0 && counts.back().syncs > 1)
        failures.push_back(fmt::format("{} on {}: {} syncs per step (budget 1)", rows[i].name, model, counts.back().syncs));
    }
    const auto budget = [&](size_t mine, int64_t limit, const char* what) {
      if (counts[mine].leaf > limit)
        failures.push_back(fmt::format("{} on {}: {} leaf ops (budget {}: {})", rows[mine].name, model,
                                       counts[mine].leaf, limit, what));
    };
    budget(1, counts[0].leaf, "torch::optim::SGD's");
    budget(3, counts[2].leaf, "torch::optim::Adam's");
    budget(5, 3 * (bp.leaf + counts[0].leaf), "3 × (forward+backward + torch::optim::SGD)");
  }
  std::cout << header << "\n" << rule << "\n";
  for (const auto& l : lines) std::cout << l << "\n";
  if (check) {
    for (const auto& f : failures) std::cerr << "mep_ops: over budget: " << f << "\n";
    if (!failures.empty()) return 1;
    std::cout << "mep_ops: every budget holds\n";
  }
  return 0;
}
