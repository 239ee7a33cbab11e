// mep_bench — the MNIST benchmark of the mep optimizers: trains one model per optimizer from
// identical initial weights on the same shuffles and reports accuracy and time, as a Markdown
// table and optionally as JSON, CSV and an SVG picture.
//
//   mep_bench [--model mlp|mlp_small|cnn] [--optimizers sgd,adam,...] [--epochs 10]
//             [--train 3000] [--test 500] [--batch 128] [--seed 0] [--threads N]
//             [--device cpu|cuda] [--loss mse|ce] [--error-feedback off|reference|projected]
//             [--settling default|reference] [--lr LR] [--data data/mnist] [--json FILE]
//             [--checkpoint DIR [--resume]] [--csv FILE] [--svg FILE] [--cuda-graph]
//   mep_bench --from-json FILE,... [--json FILE] [--csv FILE] [--svg FILE]
//
// The second form trains nothing: it gathers runs saved by --json (one protocol, any seeds)
// into one table, picture and file.
//
// For the EP family, each epoch also reports what settling did (mean steps and relative
// residual per training step, fraction of steps that met the stopping rule).
//
// Every error is one line on stderr starting with "mep_bench: " and a non-zero exit.
//
// The parts: flags.cpp and flag_checks.cpp (the command line), data.cpp (the data and the
// evaluation), runner.cpp (the training), report.cpp (progress lines and the table),
// outputs.cpp (--json, --csv, --svg), saved_runs.cpp (--from-json), checkpoints.cpp
// (--checkpoint, --resume).

#include "checkpoints.hpp"
#include "common.hpp"
#include "data.hpp"
#include "flags.hpp"
#include "outputs.hpp"
#include "report.hpp"
#include "runner.hpp"
#include "saved_runs.hpp"

#include <mep/process_group.hpp>

#include <fmt/format.h>
#include <torch/torch.h>

#include <unistd.h>

#include <exception>
#include <filesystem>
#include <iostream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace mep_bench {
namespace {

/// The line that opens a training run's output: its protocol.
void print_header(const Options& opt, int threads, const std::vector<std::string>& names) {
  std::vector<std::string> options;
  for (const auto& [option, text] : opt.shared_options) options.push_back(option + "=" + text);
  for (const auto& [name, option, text] : opt.sets) options.push_back(name + "." + option + "=" + text);
  const std::string ranks =
      opt.dist.world_size > 1 ? fmt::format(" | ranks {} ({})", opt.dist.world_size, opt.dist.backend) : "";
  const std::string shown = options.empty() ? "" : " | options " + join(options, " ");
  std::cout << fmt::format("mep_bench: model {} | data {} (train {}, test {}) | epochs {} | batch {} | seed{} {} | "
                           "threads {} | device {}{} | settling {} | optimizers {}{}",
                           opt.model, opt.data, opt.train, opt.test, opt.epochs, opt.batch,
                           opt.seeds.size() > 1 ? "s" : "", seed_list(opt.seeds, ","), threads, opt.device, ranks,
                           opt.settling, join(names, ","), shown)
            << std::endl;
}

/// Trains the `selected` optimizers at every seed on `device`, then prints the table and
/// writes the outputs (rank 0 only).
void train_and_report(Options& opt, const std::vector<const OptimizerEntry*>& selected, const torch::Device& device,
                      Progress& progress, const Interrupts& interrupts) {
  std::error_code ec;
  if (!std::filesystem::is_directory(opt.data, ec))
    throw std::runtime_error("--data " + opt.data +
                             ": no such directory (make the datasets with data/make_datasets.sh, or pass --data DIR)");
  if (opt.dist.rank > 0) {  // rank 0 prints and writes; the others stay silent unless they fail
    opt.json.clear(), opt.csv.clear(), opt.svg.clear();
    std::cout.setstate(std::ios::badbit);
  }
  prepare_outputs(opt);
  mep::ProcessGroupPtr group;  // the ranks, when --world-size > 1
  if (opt.dist.world_size > 1) group = mep::make_process_group(opt.dist);

  torch::set_num_threads(opt.threads);
  const int threads = torch::get_num_threads();
  const Split train = load_split(opt.data, true, opt.train, opt.normalize, device);
  const Split test = load_split(opt.data, false, opt.test, opt.normalize, device);
  opt.train = train.size(), opt.test = test.size();  // --protocol full: what the files hold
  std::vector<std::string> names;
  for (const auto* e : selected) names.push_back(e->name);
  if (!opt.checkpoint.empty()) prepare_checkpoints(opt, threads, names);
  print_header(opt, threads, names);

  const Training training{opt, train, test, device, group, progress, interrupts};
  std::vector<Result> results;
  for (auto seed : opt.seeds)
    for (const auto* entry : selected) results.push_back(run_optimizer(*entry, seed, training));
  interrupts.check();
  label_runs(results);
  report(opt, threads, results);
}

}  // namespace
}  // namespace mep_bench

int main(int argc, char** argv) {
  using namespace mep_bench;
  const Interrupts interrupts;  // first: every thread started later inherits the blocked signals
  Progress progress(isatty(STDOUT_FILENO) != 0);
  std::string program = "mep_bench";  // and the rank, in the errors of a distributed run
  try {
    Flags flags = parse_flags(argc, argv);
    if (flags.exit_status) return *flags.exit_status;
    if (flags.from_json_given) {
      report_saved_runs(flags.from_json, flags.opt);
      return 0;
    }
    const auto selected = check_training_flags(flags);
    Options& opt = flags.opt;
    if (opt.dist.world_size > 1) program = fmt::format("mep_bench (rank {})", opt.dist.rank);
    check_ranks(opt);
    train_and_report(opt, selected, training_device(opt), progress, interrupts);
    return 0;
  } catch (const std::exception& e) {
    progress.close();
    std::cerr << program << ": " << message(e) << std::endl;
  } catch (...) {
    progress.close();
    std::cerr << "mep_bench: unknown error" << std::endl;
  }
  return interrupts.requested() ? 130 : 1;
}
