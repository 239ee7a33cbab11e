// LibTorch's MNIST example (pytorch/examples, cpp/mnist) with mep: the same Net, the same
// torch::data pipeline and the same train/test loops, run four times:
//   1. torch::optim::SGD, as the example has it;
//   2. mep::SGD, the same line renamed (it takes the same steps: the program checks);
//   3. mep::Muon for the weight matrices and mep::AdamW for the rest;
//   4. mep::SMEP, Equilibrium Propagation, through a listing of the Net's layers.
//
//   mnist_net [data_dir] [epochs] [train_samples]    (defaults: data/mnist 1 2000)
//
// torch::data::datasets::MNIST insists on all 60,000 training images, so the dataset here is
// a small torch::data dataset over mep::data::load_split.
#include <mep/mep.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>

namespace {

struct Net : torch::nn::Module {
  Net()
      : conv1(torch::nn::Conv2dOptions(1, 10, /*kernel_size=*/5)),
        conv2(torch::nn::Conv2dOptions(10, 20, /*kernel_size=*/5)),
        fc1(320, 50),
        fc2(50, 10) {
    register_module("conv1", conv1);
    register_module("conv2", conv2);
    register_module("conv2_drop", conv2_drop);
    register_module("fc1", fc1);
    register_module("fc2", fc2);
  }

  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(torch::max_pool2d(conv1->forward(x), 2));
    x = torch::relu(torch::max_pool2d(conv2_drop->forward(conv2->forward(x)), 2));
    x = x.view({-1, 320});
    x = torch::relu(fc1->forward(x));
    x = torch::dropout(x, /*p=*/0.5, /*train=*/is_training());
    x = fc2->forward(x);
    return torch::log_softmax(x, /*dim=*/1);
  }

  torch::nn::Conv2d conv1;
  torch::nn::Conv2d conv2;
  torch::nn::Dropout2d conv2_drop;
  torch::nn::Linear fc1;
  torch::nn::Linear fc2;
};

// The first `limit` samples of an MNIST split (all with limit -1), as a torch::data dataset.
class MnistSplit : public torch::data::datasets::Dataset<MnistSplit> {
 public:
  MnistSplit(const std::string& dir, bool train, int64_t limit) : data_(mep::data::load_split(dir, train, limit)) {}
  torch::data::Example<> get(size_t index) override {
    return {data_.images[static_cast<int64_t>(index)], data_.labels[static_cast<int64_t>(index)]};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(data_.images.size(0)); }

 private:
  mep::data::IdxDataset data_;
};

constexpr int64_t kTrainBatchSize = 64;
constexpr int64_t kTestBatchSize = 1000;

// One epoch of the example's loop; `step(data, targets)` trains on a batch and returns the loss.
template <typename DataLoader, typename Step>
void train(size_t epoch, Net& model, torch::Device device, DataLoader& data_loader, Step&& step) {
  model.train();
  double total = 0;
  size_t count = 0;
  for (auto& batch : data_loader) {
    auto data = batch.data.to(device), targets = batch.target.to(device);
    total += step(data, targets).template item<double>() * static_cast<double>(data.size(0));
    count += static_cast<size_t>(data.size(0));
  }
  std::printf("  train epoch %zu: loss %.4f\n", epoch, total / static_cast<double>(count));
}

template <typename DataLoader>
double test(Net& model, torch::Device device, DataLoader& data_loader, size_t dataset_size) {
  torch::NoGradGuard no_grad;
  model.eval();
  double test_loss = 0;
  int64_t correct = 0;
  for (const auto& batch : data_loader) {
    auto data = batch.data.to(device), targets = batch.target.to(device);
    auto output = model.forward(data);
    test_loss += torch::nll_loss(output, targets, /*weight=*/{}, torch::Reduction::Sum).template item<double>();
    correct += output.argmax(1).eq(targets).sum().template item<int64_t>();
  }
  test_loss /= static_cast<double>(dataset_size);
  const double accuracy = static_cast<double>(correct) / static_cast<double>(dataset_size);
  std::printf("  test: average loss %.4f, accuracy %.1f %%\n", test_loss, 100 * accuracy);
  return accuracy;
}

// The backprop step of the example: zero_grad, nll_loss, backward, step, on any optimizers.
template <typename... Optimizers>
auto backprop_step(Net& model, Optimizers&... optimizers) {
  return [&model, &optimizers...](const torch::Tensor& data, const torch::Tensor& targets) {
    (optimizers.zero_grad(), ...);
    auto loss = torch::nll_loss(model.forward(data), targets);
    loss.backward();
    (optimizers.step(), ...);
    return loss.detach();
  };
}

// The largest parameter difference between two nets, relative to the largest parameter.
double relative_difference(Net& a, Net& b) {
  double diff = 0, scale = 0;
  auto pa = a.parameters(), pb = b.parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    diff = std::max(diff, (pa[i] - pb[i]).abs().max().item<double>());
    scale = std::max(scale, pb[i].abs().max().item<double>());
  }
  return diff / scale;
}

int64_t parse_positive(const std::string& s, const char* what) {
  size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || v < 1) throw std::invalid_argument(std::string(what) + " must be a positive integer, got '" + s + "'");
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc > 4 || (argc > 1 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help"))) {
      std::printf("usage: mnist_net [data_dir] [epochs] [train_samples]   (defaults: data/mnist 1 2000)\n");
      return argc > 4 ? 2 : 0;
    }
    const std::string dir = argc > 1 ? argv[1] : "data/mnist";
    const auto epochs = static_cast<size_t>(argc > 2 ? parse_positive(argv[2], "epochs") : 1);
    const int64_t train_samples = argc > 3 ? parse_positive(argv[3], "train_samples") : 2000;
    const torch::Device device = mep::default_device();

    auto train_dataset = MnistSplit(dir, /*train=*/true, train_samples).map(torch::data::transforms::Stack<>());
    auto test_dataset = MnistSplit(dir, /*train=*/false, -1).map(torch::data::transforms::Stack<>());
    const size_t test_size = test_dataset.size().value();
    auto train_loader = torch::data::make_data_loader<torch::data::samplers::RandomSampler>(
        std::move(train_dataset), kTrainBatchSize);
    auto test_loader = torch::data::make_data_loader(std::move(test_dataset), kTestBatchSize);

    // A fresh Net and the same random stream (initial weights, shuffles, dropout) per run.
    auto fresh = [&] {
      torch::manual_seed(1);
      auto model = std::make_shared<Net>();
      model->to(device);
      return model;
    };

    std::printf("1. torch::optim::SGD (the example's settings)\n");
    auto with_torch = fresh();
    torch::optim::SGD sgd(with_torch->parameters(), torch::optim::SGDOptions(0.01).momentum(0.5));
    for (size_t epoch = 1; epoch <= epochs; ++epoch) {
      train(epoch, *with_torch, device, *train_loader, backprop_step(*with_torch, sgd));
      test(*with_torch, device, *test_loader, test_size);
    }

    std::printf("2. mep::SGD, the same line renamed\n");
    auto with_mep = fresh();
    mep::SGD mep_sgd(with_mep->parameters(), mep::SGDOptions(0.01).momentum(0.5));
    for (size_t epoch = 1; epoch <= epochs; ++epoch) {
      train(epoch, *with_mep, device, *train_loader, backprop_step(*with_mep, mep_sgd));
      test(*with_mep, device, *test_loader, test_size);
    }
    const double apart = relative_difference(*with_mep, *with_torch);
    std::printf("  parameters apart from run 1: %.2e (relative)\n", apart);
    if (!(apart <= 1e-5)) throw std::runtime_error("mep::SGD took other steps than torch::optim::SGD");

    std::printf("3. mep::Muon for the weight matrices (conv kernels as matrices), mep::AdamW for the biases\n");
    auto with_muon = fresh();
    const auto split = mep::split_for_muon(with_muon->parameters(), /*conv_as_matrix=*/true);
    mep::Muon muon(split.matrices, mep::MuonOptions(0.02).conv_as_matrix(true));
    mep::AdamW adamw(split.others, mep::AdamWOptions(3e-3));
    for (size_t epoch = 1; epoch <= epochs; ++epoch) {
      train(epoch, *with_muon, device, *train_loader, backprop_step(*with_muon, muon, adamw));
      test(*with_muon, device, *test_loader, test_size);
    }

    std::printf("4. mep::SMEP (Equilibrium Propagation) through a listing of the Net's layers\n");
    auto with_ep = fresh();
    namespace nn = torch::nn;
    auto layers = mep::listing(with_ep, nn::Sequential(with_ep->conv1, nn::MaxPool2d(2), nn::ReLU(),        //
                                                       with_ep->conv2, with_ep->conv2_drop, nn::MaxPool2d(2),  //
                                                       nn::ReLU(), nn::Flatten(),                              //
                                                       with_ep->fc1, nn::ReLU(), nn::Dropout(0.5),             //
                                                       with_ep->fc2, nn::LogSoftmax(1)));
    mep::SMEP smep(layers, mep::SMEPOptions(0.01).loss(mep::Loss::NLL));
    for (size_t epoch = 1; epoch <= epochs; ++epoch) {
      train(epoch, *with_ep, device, *train_loader,
            [&](const torch::Tensor& data, const torch::Tensor& targets) { return smep.step(data, targets); });
      test(*with_ep, device, *test_loader, test_size);  // the Net's own forward, with the trained parameters
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mnist_net: %s\n", e.what());
    return 1;
  }
}
