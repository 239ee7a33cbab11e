// Consumer check: an outside project includes <mep/mep.hpp> from the installed package
// and trains a tiny classifier with mep::SGD and with mep::Muon (+ mep::AdamW for the biases).
// Exit 1 unless both reduce
// the loss.
#include <mep/mep.hpp>

#include <cstdio>
#include <exception>
#include <memory>
#include <vector>

namespace {

struct Task {
  torch::Tensor x, y;
};

// A learnable binary classification problem on random inputs.
Task make_task() {
  auto x = torch::randn({64, 16});
  return {x, (x.narrow(1, 0, 4).sum(1) > 0).to(torch::kLong)};
}

torch::Tensor loss_of(torch::nn::Sequential& model, const Task& t) {
  return torch::nn::functional::cross_entropy(model->forward(t.x), t.y);
}

double eval_loss(torch::nn::Sequential& model, const Task& t) {
  torch::NoGradGuard no_grad;
  return loss_of(model, t).item<double>();
}

// Trains a fresh model for `steps` full-batch steps with the optimizers `make(model)`
// returns; false unless the loss decreased.
template <class Make>
bool loss_decreases(const char* name, int steps, Make make) {
  torch::manual_seed(0);
  const Task task = make_task();
  torch::nn::Sequential model(torch::nn::Linear(16, 32), torch::nn::Tanh(), torch::nn::Linear(32, 2));
  auto optimizers = make(model);
  const double before = eval_loss(model, task);
  for (int s = 0; s < steps; ++s) {
    for (auto& opt : optimizers) opt->zero_grad();
    loss_of(model, task).backward();
    for (auto& opt : optimizers) opt->step();
  }
  const double after = eval_loss(model, task);
  std::printf("%-10s loss %.4f -> %.4f\n", name, before, after);
  return after < before;
}

using Optimizers = std::vector<std::unique_ptr<torch::optim::Optimizer>>;

}  // namespace

int main() {
  try {
    const bool sgd = loss_decreases("SGD", 20, [](torch::nn::Sequential& model) {
      Optimizers o;
      o.push_back(std::make_unique<mep::SGD>(model->parameters(), mep::SGDOptions(0.1)));
      return o;
    });
    // Muon takes the weight matrices; the biases go to AdamW.
    const bool muon = loss_decreases("Muon+AdamW", 20, [](torch::nn::Sequential& model) {
      const auto split = mep::split_for_muon(model->parameters());
      Optimizers o;
      o.push_back(std::make_unique<mep::Muon>(split.matrices, mep::MuonOptions(0.02)));
      o.push_back(std::make_unique<mep::AdamW>(split.others, mep::AdamWOptions(3e-3)));
      return o;
    });
    if (!sgd || !muon) {
      std::fprintf(stderr, "mep_consumer: the loss did not decrease\n");
      return 1;
    }
    std::printf("mep_consumer: ok (mep %s)\n", MEP_VERSION);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mep_consumer: %s\n", e.what());
    return 1;
  }
}
