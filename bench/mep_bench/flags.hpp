#pragma once
// mep_bench's command line: the flags (CLI11), and the checks that need more than one flag
// or the optimizers' option tables. Every failure is a std::runtime_error naming the flag.

#include "../trainers.hpp"

#include <mep/process_group.hpp>

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mep_bench {

/// What the command line asks for.
struct Options {
  std::string data = "data/mnist";
  std::string model = "mlp";
  std::string optimizers;  // empty: every optimizer of the registry
  int64_t epochs = 10;
  int64_t train = 3000;
  int64_t test = 500;
  int64_t batch = 128;
  uint64_t seed = 0;
  std::vector<uint64_t> seeds;  // --seeds: one run of every optimizer per seed (default: {seed})
  int threads = 0;
  std::string device = "cpu";
  std::string loss = "mse";
  std::string error_feedback = "off";
  std::string settling = "default";
  double lr = 0;  // 0: each optimizer's own (its preset's) learning rate
  std::string lr_schedule = "constant";  // or "cosine": lr·½(1 + cos(π·(epoch − 1)/epochs)) per epoch
  bool cuda_graph = false;  // EP family: steps as CUDA graphs (mep/cuda_graph.hpp)
  OptionTexts shared_options;  // --beta, --ns-steps, …: (option, text), where an optimizer has it
  std::vector<std::array<std::string, 3>> sets;  // --set NAME.OPTION=VALUE: {name, option, text}
  std::vector<double> normalize = {0.1307, 0.3081};  // pixel/255 → (x − mean)/std: MNIST's
  std::string protocol = "seed";  // seed: the first --train/--test samples; full: every sample of the files
  std::string json;
  std::string csv;
  std::string svg;
  std::string checkpoint;  // directory: save after every epoch
  bool resume = false;     // continue the run saved in `checkpoint`
  mep::ProcessGroupConfig dist;  // --world-size, --rank, --master-addr, --master-port (or torchrun's variables)
};

/// The command line as parsed, before the checks of check_training_flags.
struct Flags {
  std::optional<int> exit_status;  ///< set when there is nothing to run: --help, or a malformed flag (CLI11 said why)
  Options opt;
  bool from_json_given = false;        ///< --from-json FILE,...: gather saved runs, train nothing
  std::vector<std::string> from_json;  ///< its files
  bool optimizers_given = false;       ///< --optimizers, even with an empty list
  bool samples_given = false;          ///< --train or --test
  std::vector<std::string> sets;       ///< --set NAME.OPTION=VALUE, as given
};

/// Parses the command line. With --from-json, also checks that no training flag was given.
Flags parse_flags(int argc, char** argv);

/// Completes `flags.opt` for training (the seeds, --protocol full, the --set options) and checks
/// it; returns the selected optimizers in their order. Every optimizer's options are built and
/// validated here, so that an unknown or invalid option fails before any training.
std::vector<const OptimizerEntry*> check_training_flags(Flags& flags);

/// Checks --world-size, --rank and --batch of a distributed run, and picks its backend.
void check_ranks(Options& opt);

/// The device to train on (ranks on one machine take its GPUs in turn), after checking
/// --device and --cuda-graph against this build and machine.
torch::Device training_device(const Options& opt);

/// What the command line asks of `entry`'s optimizer, with data parallelism over `group`.
TrainerConfig trainer_config(const OptimizerEntry& entry, const Options& opt, mep::ProcessGroupPtr group = {});

}  // namespace mep_bench
