// mep_bench's flags (CLI11): their names, help and defaults; parse_flags fills Options from them.

#include "flags.hpp"

#include "common.hpp"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <map>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace mep_bench {
namespace {

/// A CLI11 check that the value is a decimal integer >= `min` that fits in int64.
CLI::Validator integer_at_least(long long min) {
  return CLI::Validator(
      [min](std::string& s) -> std::string {
        const std::string expected = min > 0 ? "a positive integer" : "an integer >= " + std::to_string(min);
        long long v = 0;
        const char* end = s.data() + s.size();
        const auto r = std::from_chars(s.data(), end, v);
        if (s.empty() || r.ec == std::errc::invalid_argument || r.ptr != end)
          return "expected " + expected + ", got '" + s + "'";
        if (r.ec == std::errc::result_out_of_range || v < min) return "expected " + expected + ", got " + s;
        return {};
      },
      min > 0 ? "POSITIVE" : min == 0 ? "NONNEGATIVE" : ">=" + std::to_string(min));
}

/// Optimizer options with a flag of their own, each applied to every selected optimizer that has it.
struct SharedFlag {
  const char* flag;
  const char* option;
  const char* help;
};
constexpr SharedFlag shared_flags[] = {
    {"--beta", "beta", "nudging strength beta of the EP family"},
    {"--settle-steps", "settle_steps", "settling steps (layer sweeps, or heavy-ball steps) of the EP family"},
    {"--settle-lr", "settle_lr", "settling step size of the EP family"},
    {"--ns-steps", "ns_steps", "Newton-Schulz iterations of the orthogonalising optimizers"},
    {"--ns-coefficients", "ns_coefficients", "Newton-Schulz polynomial: cubic, quintic or polar_express"},
    {"--rank-frac", "rank_frac", "Dion's rank as a fraction of the smaller weight dimension"},
    {"--gamma", "gamma", "bound of the spectral constraint"},
    {"--spectral-mode", "spectral_mode",
     "rule of the spectral constraint: scale (W*gamma/sigma) or clip (singular values above gamma set to gamma)"},
    {"--bound-input-layer", "bound_input_layer",
     "whether the spectral constraint bounds the input layer too: true or false"},
    {"--momentum", "momentum", "momentum"},
    {"--weight-decay", "weight_decay", "weight decay"}};

/// --data, --model, --optimizers, the samples, epochs, batch, seeds, threads and device.
void add_protocol_flags(CLI::App& app, Options& opt) {
  app.add_option("--data", opt.data, "directory with the IDX files (train-*/t10k-*, optionally .gz)")
      ->type_name("DIR")
      ->capture_default_str();
  app.add_option("--model", opt.model, "model to train")
      ->check(CLI::IsMember({"mlp", "mlp_small", "cnn"}))
      ->capture_default_str();
  app.add_option("--optimizers", opt.optimizers,
                 "comma-separated optimizers to run (default: all: " + join(registry_names(), ",") + ")");
  app.add_option("--protocol", opt.protocol,
                 "seed: the first --train training and --test test samples (the protocol of the reference's "
                 "published tables); full: every sample of the data files (not with --train/--test)")
      ->check(CLI::IsMember({"seed", "full"}))
      ->capture_default_str();
  app.add_option("--normalize", opt.normalize,
                 "MEAN,STD of the pixels (in [0, 1]) for (x - MEAN) / STD: MNIST's by default; Fashion-MNIST's "
                 "are 0.2860,0.3530")
      ->delimiter(',')
      ->expected(2)
      ->capture_default_str();
  app.add_option("--epochs", opt.epochs, "training epochs")->check(integer_at_least(1))->capture_default_str();
  app.add_option("--train", opt.train, "training samples (the first N of the file)")
      ->check(integer_at_least(1))
      ->capture_default_str();
  app.add_option("--test", opt.test, "test samples (the first N of the file)")
      ->check(integer_at_least(1))
      ->capture_default_str();
  app.add_option("--batch", opt.batch, "training batch size")->check(integer_at_least(1))->capture_default_str();
  auto* seed_flag = app.add_option("--seed", opt.seed, "seed for initial weights, shuffles and dropout")
                        ->check(integer_at_least(0))
                        ->capture_default_str();
  app.add_option("--seeds", opt.seeds,
                 "comma-separated seeds: every optimizer runs once per seed, and the table shows the mean and "
                 "standard deviation of the best test accuracy (the JSON keeps every run)")
      ->delimiter(',')
      ->excludes(seed_flag);
  app.add_option("--threads", opt.threads, "intra-op threads (default: all cores)")
      ->check(integer_at_least(1))
      ->capture_default_str();
  app.add_option("--device", opt.device, "device to train on")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

/// The optimizers' options (shared flags, --symmetric, --set), the loss, the settling and the
/// learning rate.
void add_optimizer_flags(CLI::App& app, Options& opt, std::vector<std::string>& sets,
                         std::map<std::string, std::string>& shared, bool& symmetric) {
  app.add_option("--loss", opt.loss,
                 "loss/energy of the EP family (eqprop, smep, sdmep, local_ep, natural_ep); the backprop "
                 "optimizers always use cross-entropy")
      ->check(CLI::IsMember({"mse", "ce"}))
      ->capture_default_str();
  app.add_option("--error-feedback", opt.error_feedback,
                 "error feedback (beta_ef 0.9) in the optimizers that have it (smep, sdmep): off, "
                 "reference (error_rule reference: e <- beta_ef*e + g_aug - u) or projected (error_rule "
                 "projected, the library's default rule: e <- g_aug - <g_aug,u>/|u|^2 u)")
      ->check(CLI::IsMember({"off", "reference", "projected"}))
      ->capture_default_str();
  app.add_option("--lr", opt.lr,
                 "learning rate of every selected optimizer (default: each one's own, the Learning Rate column)")
      ->check(CLI::PositiveNumber);
  app.add_option("--lr-schedule", opt.lr_schedule,
                 "learning rate per epoch: constant (the seed protocol) or cosine, lr * (1 + cos(pi * (epoch - 1) "
                 "/ epochs)) / 2, annealed over --epochs")
      ->check(CLI::IsMember({"constant", "cosine"}))
      ->capture_default_str();
  app.add_flag("--cuda-graph", opt.cuda_graph,
               "EP family: capture each training step into a CUDA graph and replay it (mep/cuda_graph.hpp; "
               "captured again when the batch shape or the learning rate changes); only with --device cuda, in a "
               "build against a CUDA LibTorch; the backprop optimizers run as usual");
  for (const auto& f : shared_flags)
    app.add_option(f.flag, shared[f.option],
                   fmt::format("{} (option {}), in every selected optimizer that has it", f.help, f.option))
        ->type_name("VALUE");
  app.add_flag("--symmetric", symmetric, "symmetric (two-sided) EP estimate in the EP family (option symmetric)");
  app.add_option("--set", sets,
                 "one optimizer's option, by the library's option name (repeatable): e.g. --set smep.lr=0.02 "
                 "--set sdmep.ns_coefficients=polar_express")
      ->type_name("NAME.OPTION=VALUE");
  app.add_option("--settling", opt.settling,
                 "settling of the EP family: the library default (mep::DefaultSettling) or the reference's "
                 "(HeavyBall, 10 steps of 0.05, adaptive)")
      ->check(CLI::IsMember({"default", "reference"}))
      ->capture_default_str();
}

/// --checkpoint, --resume, --json, --svg, --csv and --from-json.
CLI::Option* add_output_flags(CLI::App& app, Options& opt, Flags& flags) {
  auto* checkpoint_flag = app.add_option("--checkpoint", opt.checkpoint,
                                         "save the run after every epoch into DIR (model, optimizer, random "
                                         "generator, results so far)")
                              ->type_name("DIR");
  app.add_flag("--resume", opt.resume,
               "continue the run saved in --checkpoint DIR up to --epochs (also extends a finished run); the "
               "other flags must be those of the saved run")
      ->needs(checkpoint_flag);
  app.add_option("--json", opt.json, "also write the results as JSON to FILE (parent directories are created)")
      ->type_name("FILE");
  app.add_option("--svg", opt.svg,
                 "also draw test accuracy per epoch (mean and band over the seeds) and ms/step (x SGD) into an "
                 "SVG FILE")
      ->type_name("FILE");
  app.add_option("--csv", opt.csv,
                 "also write one CSV row per optimizer, seed and epoch to FILE (parent directories are created)")
      ->type_name("FILE");
  return app
      .add_option("--from-json", flags.from_json,
                  "train nothing: gather the runs saved by --json in FILE,... (one protocol; any seeds and "
                  "optimizers, runs of one optimizer with different options labelled by those options) "
                  "into the table, and into --json, --svg and --csv")
      ->delimiter(',')
      ->type_name("FILE,...");
}

/// --world-size, --rank, --master-addr, --master-port (or torchrun's variables) and --dist-timeout.
void add_distribution_flags(CLI::App& app, Options& opt, double& timeout_s) {
  app.add_option("--world-size", opt.dist.world_size,
                 "data parallelism: the number of processes (ranks); each trains on its shard of every batch, "
                 "gradients are averaged (Gloo on CPU, NCCL with --device cuda); scripts/distributed.sh starts them")
      ->envname("WORLD_SIZE")
      ->check(integer_at_least(1))
      ->capture_default_str();
  app.add_option("--rank", opt.dist.rank,
                 "this process's rank, 0 .. world size - 1; only rank 0 prints and writes files")
      ->envname("RANK")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--master-addr", opt.dist.master_addr, "address of rank 0, where the ranks meet (its TCPStore)")
      ->envname("MASTER_ADDR")
      ->capture_default_str();
  app.add_option("--master-port", opt.dist.master_port, "port of rank 0's TCPStore")
      ->envname("MASTER_PORT")
      ->check(CLI::Range(1, 65535))
      ->capture_default_str();
  app.add_option("--dist-timeout", timeout_s,
                 "seconds a rank waits for the others (meeting, and every collective) before it fails")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
}

/// --from-json trains nothing: it takes the output flags only, and never writes a file it reads.
void check_from_json_flags(const CLI::App& app, const CLI::Option* from_json_flag, const Flags& flags) {
  for (const auto* o : app.get_options())
    if (o->count() > 0 && o != from_json_flag && !o->check_name("--json") && !o->check_name("--svg") &&
        !o->check_name("--csv"))
      throw std::runtime_error("--from-json trains nothing: it takes no " + o->get_name() +
                               " (only --json, --svg and --csv)");
  const auto& files = flags.from_json;
  for (const auto* path : {&flags.opt.json, &flags.opt.svg, &flags.opt.csv})
    if (!path->empty() && std::find(files.begin(), files.end(), *path) != files.end())
      throw std::runtime_error("--from-json: " + *path + " is both read and to be written");
}

}  // namespace

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  Options& opt = flags.opt;
  const unsigned hw = std::thread::hardware_concurrency();
  opt.threads = hw > 0 ? static_cast<int>(hw) : 1;
  std::map<std::string, std::string> shared;
  bool symmetric = false;
  double timeout_s = 300;

  CLI::App app{"mep_bench: MNIST benchmark of the mep optimizers. Every optimizer trains the same model from the "
               "same initial weights on the same shuffles; the results are printed as a Markdown table sorted by "
               "best test accuracy."};
  app.name("mep_bench");
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return "mep_bench: " + one_line(e.what()) + " (see --help)\n";
  });
  add_protocol_flags(app, opt);
  add_optimizer_flags(app, opt, flags.sets, shared, symmetric);
  const auto* from_json_flag = add_output_flags(app, opt, flags);
  add_distribution_flags(app, opt, timeout_s);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    flags.exit_status = app.exit(e);
    return flags;
  }
  flags.from_json_given = from_json_flag->count() > 0;
  if (flags.from_json_given) check_from_json_flags(app, from_json_flag, flags);
  flags.optimizers_given = app.get_option("--optimizers")->count() > 0;
  flags.samples_given = app.get_option("--train")->count() > 0 || app.get_option("--test")->count() > 0;

  for (const auto& f : shared_flags)
    if (app.get_option(f.flag)->count() > 0) opt.shared_options.emplace_back(f.option, shared[f.option]);
  if (symmetric) opt.shared_options.emplace_back("symmetric", "true");
  opt.dist.timeout = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(1e3 * timeout_s)));
  return flags;
}

}  // namespace mep_bench
