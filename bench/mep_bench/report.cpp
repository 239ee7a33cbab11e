// The progress lines and the Markdown table on stdout.

#include "report.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <tuple>

namespace mep_bench {

void Progress::batch(const std::string& prefix, int64_t i, int64_t n, double running_loss, double elapsed_s) {
  if (!tty_) return;
  const double eta = elapsed_s / static_cast<double>(i) * static_cast<double>(n - i);
  const int width = static_cast<int>(std::to_string(n).size());
  std::cout << '\r' << prefix
            << fmt::format("  batch {:>{}}/{}  loss {:.4f}  elapsed {:.1f}s  ETA {:.1f}s", i, width, n, running_loss,
                           elapsed_s, eta)
            << "\033[K" << std::flush;
  open_ = true;
}

void Progress::epoch_done(const std::string& prefix, int64_t n, const EpochRecord& r) {
  if (tty_) std::cout << '\r';
  std::cout << prefix
            << fmt::format("  batch {}/{}  loss {:.4f}  | train {:6.2f}%  val {:6.2f}% (loss {:.4f})  | {:.2f}s", n,
                           n, r.train_loss, 100 * r.train_acc, 100 * r.val_acc, r.val_loss, r.epoch_s);
  if (r.has_settle)
    std::cout << fmt::format("  | settle {:.1f} steps, residual {:.1e}, converged {:.0f}%", r.settle_steps,
                             r.settle_residual, 100 * r.settle_converged);
  if (tty_) std::cout << "\033[K";
  std::cout << '\n' << std::flush;
  open_ = false;
}

void Progress::close() {
  if (open_) std::cout << '\n' << std::flush;
  open_ = false;
}

namespace {

/// One label's runs over the seeds.
struct Summary {
  std::string label;
  std::vector<double> best;  // best test accuracy per seed
  std::vector<uint64_t> seeds;
  double mean = 0, sd = 0, final_train = 0, epoch_s = 0, step_ms = 0, lr = 0;
};

/// The value of option `name` in `options`, or "default" where the run does not record it.
std::string option_text(const OptionTexts& options, const std::string& name) {
  for (const auto& [option, text] : options)
    if (option == name) return text;
  return "default";
}

/// One row per label, best mean test accuracy first.
std::vector<Summary> summarize(const std::vector<Result>& results) {
  std::vector<Summary> out;
  for (const auto& [label, runs] : runs_by_label(results)) {
    Summary s{label};
    std::vector<double> train, epoch_s, step_ms;
    for (const auto* r : runs) {
      s.best.push_back(r->best_val_acc), s.seeds.push_back(r->seed), s.lr = r->lr;
      train.push_back(r->final_train_acc), epoch_s.push_back(r->median_epoch_s), step_ms.push_back(r->step_ms);
    }
    std::tie(s.mean, s.sd) = mean_sd(s.best);
    s.final_train = mean_sd(train).first;
    s.epoch_s = median(epoch_s), s.step_ms = median(step_ms);
    out.push_back(std::move(s));
  }
  std::stable_sort(out.begin(), out.end(), [](const Summary& a, const Summary& b) { return a.mean > b.mean; });
  return out;
}

/// A row's Best Test Acc cell: with several seeds, mean ± sd and each seed's; saved runs
/// (--from-json) may hold some of the seeds only, and those are named.
std::string accuracy_cell(const Summary& r, const std::vector<uint64_t>& seeds) {
  if (seeds.size() <= 1) return fmt::format("{:.2f}%", 100 * r.mean);
  const std::string which =
      r.seeds == seeds ? "" : fmt::format("; seed{} {} only", r.seeds.size() > 1 ? "s" : "", seed_list(r.seeds, ", "));
  if (r.best.size() <= 1) return fmt::format("{:.2f}% ({})", 100 * r.mean, which.substr(2));
  std::vector<std::string> each;
  for (double b : r.best) each.push_back(fmt::format("{:.1f}", 100 * b));
  return fmt::format("{:.2f} ± {:.2f}% ({}{})", 100 * r.mean, 100 * r.sd, join(each, " / "), which);
}

}  // namespace

void label_runs(std::vector<Result>& results) {
  std::map<const OptimizerEntry*, std::vector<Result*>> by_entry;
  for (auto& r : results) by_entry[r.entry].push_back(&r);
  for (const auto& [entry, runs] : by_entry) {
    std::vector<std::string> names;  // every option any of its runs records, in order
    for (const auto* r : runs)
      for (const auto& [option, text] : r->options)
        if (std::find(names.begin(), names.end(), option) == names.end()) names.push_back(option);
    std::vector<std::string> differ;
    for (const auto& name : names)
      for (const auto* r : runs)
        if (option_text(r->options, name) != option_text(runs.front()->options, name)) {
          differ.push_back(name);
          break;
        }
    for (auto* r : runs) {
      std::vector<std::string> shown;
      for (const auto& name : differ) shown.push_back(name + " " + option_text(r->options, name));
      r->variant = join(shown, ", ");
      r->label = entry->label + (shown.empty() ? "" : " (" + r->variant + ")");
    }
  }
}

std::vector<std::pair<std::string, std::vector<const Result*>>> runs_by_label(const std::vector<Result>& results) {
  std::vector<std::pair<std::string, std::vector<const Result*>>> out;
  for (const auto& r : results) {
    auto it = std::find_if(out.begin(), out.end(), [&](const auto& g) { return g.first == r.label; });
    if (it == out.end()) it = out.insert(out.end(), {r.label, {}});
    it->second.push_back(&r);
  }
  return out;
}

void print_table(const std::vector<Result>& results, const std::vector<uint64_t>& seeds) {
  const auto rows = summarize(results);
  const std::string acc_header =
      seeds.size() > 1 ? fmt::format("Best Test Acc (mean ± sd; seeds {})", seed_list(seeds, ", ")) : "Best Test Acc";
  std::cout << fmt::format("\n| Rank | Optimizer | {} | Final Train Acc | Time/Epoch | ms/step | Learning Rate |\n",
                           acc_header)
            << "|------|-----------|---------------|-----------------|------------|---------|---------------|\n";
  size_t rank = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    if (i == 0 || r.mean != rows[i - 1].mean) rank = i + 1;  // ties share a rank
    std::cout << fmt::format("| {} | {} | {} | {:.2f}% | {:.2f}s | {:.2f} | {:g} |\n", rank, r.label,
                             accuracy_cell(r, seeds), 100 * r.final_train, r.epoch_s, r.step_ms, r.lr);
  }
  std::cout << std::flush;
}

}  // namespace mep_bench
