// --checkpoint and --resume: the run's manifest (run.json) and one file per optimizer and seed.

#include "checkpoints.hpp"

#include "outputs.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <system_error>

namespace mep_bench {
namespace {

namespace fs = std::filesystem;

/// What must be equal for a run to continue another: everything but the outputs and --epochs
/// (which a cosine schedule anneals over, so that it must be equal too).
nlohmann::ordered_json run_protocol(const Options& opt, int threads, const std::vector<std::string>& names) {
  nlohmann::ordered_json p = {{"model", opt.model},     {"data", opt.data},       {"train", opt.train},
                              {"test", opt.test},       {"batch", opt.batch},     {"seeds", opt.seeds},
                              {"threads", threads},     {"device", opt.device},   {"loss", opt.loss},
                              {"error_feedback", opt.error_feedback},             {"settling", opt.settling},
                              {"lr", opt.lr},           {"lr_schedule", opt.lr_schedule},
                              {"normalize", opt.normalize},
                              {"optimizers", join(names, ",")}};
  auto& options = p["options"] = nlohmann::ordered_json::array();
  for (const auto& [option, text] : opt.shared_options) options.push_back(option + "=" + text);
  for (const auto& [name, option, text] : opt.sets) options.push_back(name + "." + option + "=" + text);
  if (opt.lr_schedule == "cosine") p["epochs"] = opt.epochs;
  if (opt.cuda_graph) p["cuda_graph"] = true;
  return p;
}

}  // namespace

void prepare_checkpoints(const Options& opt, int threads, const std::vector<std::string>& names) {
  const auto protocol = run_protocol(opt, threads, names);
  const fs::path dir(opt.checkpoint);
  const std::string manifest = (dir / "run.json").string();
  std::error_code ec;
  if (!opt.resume) {
    fs::create_directories(dir, ec);
    if (ec || !fs::is_directory(dir, ec))
      throw std::runtime_error(fmt::format("--checkpoint {}: cannot create the directory", opt.checkpoint));
    write_json(manifest, protocol, "--checkpoint");
    return;
  }
  std::ifstream in(manifest);
  if (!in) throw std::runtime_error(fmt::format("--resume: {} holds no mep_bench run (no run.json)", opt.checkpoint));
  nlohmann::json saved;
  try {
    in >> saved;
  } catch (const std::exception&) {
    throw std::runtime_error(fmt::format("--resume: {} is corrupt (not JSON)", manifest));
  }
  for (const auto& [key, value] : protocol.items()) {
    if (saved.contains(key) && saved[key].dump() == value.dump()) continue;
    throw std::runtime_error(fmt::format("--resume: the checkpoint in {} is of another run: {} {} there, {} here",
                                         opt.checkpoint, key, saved.contains(key) ? saved[key].dump() : "missing",
                                         value.dump()));
  }
}

std::string checkpoint_path(const Options& opt, const std::string& name, uint64_t seed) {
  if (opt.checkpoint.empty()) return {};
  const std::string file = opt.seeds.size() > 1 ? fmt::format("{}.seed{}.pt", name, seed) : name + ".pt";
  return (fs::path(opt.checkpoint) / file).string();
}

void save_checkpoint(const std::string& path, const std::string& name, const Trainer& trainer, const Progressed& p) {
  nlohmann::ordered_json progress{{"step_s_total", p.step_s_total}, {"steps", p.steps},
                                  {"epoch_times", p.epoch_times}, {"epochs", nlohmann::ordered_json::array()}};
  for (const auto& r : p.records) progress["epochs"].push_back(epoch_json(r));
  torch::serialize::OutputArchive archive, trained;
  archive.write("optimizer_name", c10::IValue(name));
  archive.write("progress", c10::IValue(progress.dump()));
  auto generator = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(generator.mutex());
    archive.write("rng", generator.get_state(), /*is_buffer=*/true);
  }
  trainer.save(trained);
  archive.write("trainer", trained);
  write_atomically(path, "--checkpoint", [&](const std::string& tmp) { archive.save_to(tmp); });
}

Progressed load_checkpoint(const std::string& path, const std::string& name, Trainer& trainer) {
  try {
    torch::serialize::InputArchive archive, trained;
    archive.load_from(path);
    c10::IValue v;
    archive.read("optimizer_name", v);
    if (v.toStringRef() != name) throw std::runtime_error("it holds optimizer " + v.toStringRef() + ", not " + name);
    archive.read("progress", v);
    const auto progress = nlohmann::json::parse(v.toStringRef());
    Progressed p;
    p.step_s_total = progress.at("step_s_total");
    p.steps = progress.at("steps");
    p.epoch_times = progress.at("epoch_times").get<std::vector<double>>();
    for (const auto& e : progress.at("epochs")) p.records.push_back(epoch_from_json(e));
    torch::Tensor rng;
    archive.read("rng", rng, /*is_buffer=*/true);
    archive.read("trainer", trained);
    trainer.load(trained);
    auto generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(rng);
    return p;
  } catch (const std::exception& e) {
    throw std::runtime_error(fmt::format("--resume: {}: {}", path, message(e)));
  }
}

}  // namespace mep_bench
