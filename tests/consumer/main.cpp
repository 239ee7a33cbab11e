// Consumer check: an outside project includes <mep/mep.hpp> from the installed package
// and trains a tiny classifier with mep::SGD and mep::Muon. Exit 1 unless both reduce
// the loss.
#include <mep/mep.hpp>

#include <cstdio>
#include <exception>

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

// Trains a fresh model for `steps` full-batch steps; false unless the loss decreased.
template <class Opt>
bool loss_decreases(const char* name, int steps) {
  torch::manual_seed(0);
  const Task task = make_task();
  torch::nn::Sequential model(torch::nn::Linear(16, 32), torch::nn::Tanh(), torch::nn::Linear(32, 2));
  Opt opt(model->parameters());
  const double before = eval_loss(model, task);
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    loss_of(model, task).backward();
    opt.step();
  }
  const double after = eval_loss(model, task);
  std::printf("%-5s loss %.4f -> %.4f\n", name, before, after);
  return after < before;
}

}  // namespace

int main() {
  try {
    const bool sgd = loss_decreases<mep::SGD>("SGD", 20);
    const bool muon = loss_decreases<mep::Muon>("Muon", 20);
    if (!sgd || !muon) {
      std::fprintf(stderr, "mep_consumer: the loss did not decrease\n");
      return 1;
    }
    std::printf("mep_consumer: ok\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mep_consumer: %s\n", e.what());
    return 1;
  }
}
