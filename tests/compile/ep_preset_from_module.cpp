// Must not compile: an EP preset given a custom Module instead of a Sequential or a listing.
// tests/compile/expect_one_error.cmake checks that the compiler says so in one line.
#include <mep/mep.hpp>

struct Net : torch::nn::Module {
  Net() : fc(register_module("fc", torch::nn::Linear(4, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc->forward(x); }
  torch::nn::Linear fc;
};

int main() {
  auto net = std::make_shared<Net>();
  mep::SMEP opt(net, mep::SMEPOptions(0.01));
  return 0;
}
