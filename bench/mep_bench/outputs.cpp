// The --json, --csv and --svg files, and report(), which prints the table and writes them.

#include "outputs.hpp"

#include "../svg_chart.hpp"
#include "report.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <system_error>

namespace mep_bench {
namespace {

namespace fs = std::filesystem;

/// Writes a text file atomically through `write(stream)` (for the flag `what`).
void write_text(const std::string& path, const char* what, const std::function<void(std::ostream&)>& write) {
  write_atomically(path, what, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::trunc);
    write(out);
    out.close();
    if (!out) throw std::runtime_error("cannot write");
  });
}

/// Creates the parent directories of `path` and checks that it can be written (for `flag`).
void prepare_output(const std::string& path, const char* flag) {
  const fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) {
    fs::create_directories(p.parent_path(), ec);
    if (ec)
      throw std::runtime_error(
          fmt::format("{} {}: cannot create directory {}: {}", flag, path, p.parent_path().string(), ec.message()));
  }
  if (fs::is_directory(p, ec)) throw std::runtime_error(fmt::format("{} {}: is a directory", flag, path));
  const bool existed = fs::exists(p, ec);
  {
    std::ofstream probe(path, std::ios::app);
    if (!probe) throw std::runtime_error(fmt::format("{} {}: cannot open for writing", flag, path));
  }
  if (!existed) fs::remove(p, ec);
}

/// An option's text as JSON: true/false as booleans, numbers as numbers, names as strings.
nlohmann::ordered_json option_json(const std::string& text) {
  if (text == "true" || text == "false") return text == "true";
  try {
    size_t used = 0;
    const double v = std::stod(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  return text;
}

nlohmann::ordered_json to_json(const Options& opt, int threads, const std::vector<Result>& results) {
  nlohmann::ordered_json j;
  j["protocol"] = {{"model", opt.model}, {"data", opt.data}, {"epochs", opt.epochs},
                   {"train", opt.train}, {"test", opt.test}, {"batch", opt.batch},
                   {"seed", opt.seeds.front()}, {"seeds", opt.seeds},
                   {"threads", threads}, {"device", opt.device}, {"settling", opt.settling},
                   {"lr_schedule", opt.lr_schedule}, {"normalize", opt.normalize},
                   {"world_size", opt.dist.world_size}};
  if (opt.cuda_graph) j["protocol"]["cuda_graph"] = true;
  auto& rs = j["results"] = nlohmann::ordered_json::array();
  for (const auto& r : results) {
    nlohmann::ordered_json o;
    o["optimizer"] = r.entry->name;
    o["seed"] = r.seed;
    o["best_val_acc"] = r.best_val_acc;
    o["final_train_acc"] = r.final_train_acc;
    o["epoch_s"] = r.median_epoch_s;
    o["step_ms"] = r.step_ms;
    o["lr"] = r.lr;
    if (r.bytes_per_step > 0) o["bytes_per_step"] = r.bytes_per_step, o["comm_ms_per_step"] = r.comm_ms;
    auto& os = o["options"] = nlohmann::ordered_json::object();
    for (const auto& [name, text] : r.options) os[name] = option_json(text);
    auto& es = o["epochs"] = nlohmann::ordered_json::array();
    for (const auto& e : r.epochs) es.push_back(epoch_json(e));
    rs.push_back(std::move(o));
  }
  return j;
}

/// The --svg picture: every optimizer in the order it ran, its test accuracy per epoch over
/// the seeds (mean ± sample standard deviation) and its median ms/step against SGD's.
std::string chart(const Options& opt, const std::vector<Result>& results) {
  std::vector<Curve> curves;
  std::vector<Bar> bars;
  for (const auto& [label, runs] : runs_by_label(results)) {
    std::vector<double> ms;
    for (const auto* r : runs) ms.push_back(r->step_ms);
    Curve c;
    c.label = label;
    c.band = runs.size() > 1;
    for (size_t e = 0; e < runs.front()->epochs.size(); ++e) {
      std::vector<double> acc;
      for (const auto* r : runs) acc.push_back(r->epochs[e].val_acc);
      const auto [mean, sd] = mean_sd(acc);
      c.mean.push_back(mean), c.low.push_back(mean - sd), c.high.push_back(mean + sd);
    }
    curves.push_back(std::move(c));
    bars.push_back({label, median(ms)});
  }
  const std::string data = opt.data.empty() ? "" : " on " + fs::path(opt.data).filename().string();
  const std::string title =
      fmt::format("{}{}, {}/{} samples, {} epochs, batch {}, seed{} {}", opt.model, data, opt.train, opt.test,
                  opt.epochs, opt.batch, opt.seeds.size() > 1 ? "s" : "", seed_list(opt.seeds, ","));
  return accuracy_speed_svg(title, curves, bars, "SGD");
}

/// One row per optimizer, seed and epoch, with every number the JSON has per epoch (10
/// significant digits); `variant` names the options in which the optimizer's runs differ
/// (label_runs), quoted.
void write_csv(std::ostream& out, const std::vector<Result>& results) {
  out << "optimizer,seed,epoch,train_loss,train_acc,test_loss,test_acc,epoch_s,settle_steps,settle_residual,"
         "settle_converged,lr,step_ms,variant\n";
  for (const auto& r : results)
    for (const auto& e : r.epochs) {
      const std::string settle =
          e.has_settle ? fmt::format("{:.10g},{:.10g},{:.10g}", e.settle_steps, e.settle_residual, e.settle_converged)
                       : ",,";
      out << fmt::format("{},{},{},{:.10g},{:.10g},{:.10g},{:.10g},{:.10g},{},{:.10g},{:.10g},\"{}\"\n",
                         r.entry->name, r.seed, e.epoch, e.train_loss, e.train_acc, e.val_loss, e.val_acc, e.epoch_s,
                         settle, r.lr, r.step_ms, r.variant);
    }
}

}  // namespace

void write_atomically(const std::string& path, const char* what, const std::function<void(const std::string&)>& write) {
  const std::string tmp = path + ".tmp";
  std::error_code ec;
  try {
    write(tmp);
  } catch (const std::exception& e) {
    fs::remove(tmp, ec);
    throw std::runtime_error(fmt::format("{} {}: write failed: {}", what, path, message(e)));
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw std::runtime_error(
        fmt::format("{} {}: cannot rename the written file into place: {}", what, path, ec.message()));
  }
}

void write_json(const std::string& path, const nlohmann::ordered_json& j, const char* what) {
  write_text(path, what, [&](std::ostream& out) { out << j.dump(2) << '\n'; });
}

nlohmann::ordered_json epoch_json(const EpochRecord& e) {
  nlohmann::ordered_json eo{{"epoch", e.epoch},     {"train_loss", e.train_loss}, {"train_acc", e.train_acc},
                            {"val_loss", e.val_loss}, {"val_acc", e.val_acc},     {"epoch_s", e.epoch_s}};
  if (e.has_settle) {  // EP family only
    eo["settle_steps"] = e.settle_steps;
    eo["settle_residual"] = e.settle_residual;
    eo["settle_converged"] = e.settle_converged;
  }
  return eo;
}

EpochRecord epoch_from_json(const nlohmann::json& j) {
  EpochRecord e;
  e.epoch = j.at("epoch").get<int64_t>();
  e.train_loss = j.at("train_loss"), e.train_acc = j.at("train_acc"), e.val_loss = j.at("val_loss");
  e.val_acc = j.at("val_acc"), e.epoch_s = j.at("epoch_s");
  if (j.contains("settle_steps")) {
    e.has_settle = true;
    e.settle_steps = j.at("settle_steps"), e.settle_residual = j.at("settle_residual");
    e.settle_converged = j.at("settle_converged");
  }
  return e;
}

void prepare_outputs(const Options& opt) {
  if (!opt.json.empty()) prepare_output(opt.json, "--json");
  if (!opt.csv.empty()) prepare_output(opt.csv, "--csv");
  if (!opt.svg.empty()) prepare_output(opt.svg, "--svg");
}

void report(const Options& opt, int threads, const std::vector<Result>& results) {
  print_table(results, opt.seeds);
  if (!opt.json.empty()) {
    write_json(opt.json, to_json(opt, threads, results));
    std::cout << "wrote " << opt.json << std::endl;
  }
  if (!opt.svg.empty()) {
    write_text(opt.svg, "--svg", [&](std::ostream& out) { out << chart(opt, results); });
    std::cout << "wrote " << opt.svg << std::endl;
  }
  if (!opt.csv.empty()) {
    write_text(opt.csv, "--csv", [&](std::ostream& out) { write_csv(out, results); });
    std::cout << "wrote " << opt.csv << std::endl;
  }
}

}  // namespace mep_bench
