/// mep_options: the options reference, docs/options.md, generated from the library's own
/// tables, so that it cannot go stale: every preset's options and defaults from `texts()` of
/// its default options, the values each takes from its type, and the meanings from the
/// options mixins' `visit_option_docs` (options.hpp), which sit next to the options.
///
///   mep_options --markdown    prints the page
///   mep_options --meanings    exits 1 naming every option of a preset without a meaning (or a
///                             meaning without an option)
///   mep_options --check FILE  the same, and exits 1 naming the first line where FILE differs
///                             from the page
/// Each also takes `--presets include/mep/presets.hpp`: then a preset declared there that this
/// program does not list is an error too. Every error goes to stderr, on a line of its own.
///
/// ctest runs both checks (tools/CMakeLists.txt). Written by hand here: the list of presets
/// (checked against presets.hpp), the learning rate for mep::SGD, whose options need one,
/// and the page's prose.

#include <mep/mep.hpp>

#include <fmt/format.h>

#include <cctype>
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <vector>

namespace {

/// The command that writes the page, as its first line says.
constexpr const char* kCommand = "build/tools/mep_options --markdown > docs/options.md";

/// The learning rate of the presets whose options need one (mep::SGD): mep_bench's for sgd.
constexpr double kRequiredLr = 0.1;

/// Every preset, in the order of presets.hpp: the drop-ins for torch::optim, the EP family,
/// then mep::reference::.
using Presets = std::tuple<mep::SGD, mep::Adam, mep::AdamW, mep::Muon, mep::EqProp, mep::SMEP, mep::SDMEP,
                           mep::LocalEPMuon, mep::NaturalEPMuon, mep::reference::SGD, mep::reference::Adam,
                           mep::reference::Muon, mep::reference::EqProp, mep::reference::SMEP, mep::reference::SDMEP,
                           mep::reference::LocalEPMuon, mep::reference::NaturalEPMuon>;

/// The policies and defaults of an options type.
template <class O>
struct Composition;
template <class G, class U, class C, class F, class D>
struct Composition<mep::OptimizerOptions<G, U, C, F, D>> {
  using Gradient = G;
  using Update = U;
  using Constraint = C;
  using Feedback = F;
  using Defaults = D;
};

template <class T>
std::string type_name() {
  return c10::demangle(typeid(T).name());
}

struct Row {
  std::string name, text, kind, meaning;
  bool group = false;
};

struct Section {
  std::string name;                 // as users spell it: mep::SMEP
  std::string policies[4];          // gradient, update, constraint, feedback
  std::vector<std::string> facts;   // the composition, a line each
  std::vector<Row> rows;            // in texts() order
  bool lr_required = false;         // the options need a learning rate: rows show kRequiredLr
};

/// A Markdown table cell: '|' escaped.
std::string cell(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '|') out += '\\';
    out += c;
  }
  return out;
}

/// The section of preset Opt. Adds to `problems` every option without a meaning, meaning
/// without an option, and name with two meanings.
template <class Opt>
Section describe(std::vector<std::string>& problems) {
  using Options = typename Opt::Options;
  using P = Composition<Options>;
  constexpr bool lr_required = !std::is_default_constructible_v<Options>;
  const Options options = [] {
    if constexpr (lr_required) return Options(kRequiredLr);
    else return Options();
  }();

  Section s;
  s.name = P::Defaults::name;
  s.lr_required = lr_required;
  s.policies[0] = type_name<typename P::Gradient>(), s.policies[1] = type_name<typename P::Update>();
  s.policies[2] = type_name<typename P::Constraint>(), s.policies[3] = type_name<typename P::Feedback>();
  const bool ep = !std::is_same_v<typename P::Gradient, mep::BackpropGradient>;
  s.facts.push_back(fmt::format("`mep::Optimizer<{}, {}, {}, {}, {}>`", s.policies[0], s.policies[1], s.policies[2],
                                s.policies[3], type_name<typename P::Defaults>()));
  s.facts.push_back(ep ? "constructed from the model; `step(input, target)` computes the gradient and updates"
                       : "constructed from a parameter list or parameter groups; `backward()`, then `step()`");
  s.facts.push_back(fmt::format("weight decay {}; {}",
                                P::Update::coupled_weight_decay ? "coupled (g ← g + λ·W)"
                                                                : "decoupled (W ← W·(1 − lr·λ))",
                                Options::has_momentum ? "heavy-ball momentum applied by the optimizer"
                                                      : "no heavy-ball momentum (the update keeps its own moments)"));
  if constexpr (lr_required)
    s.facts.push_back(fmt::format("the learning rate has no default (`{}Options(lr)`); this table is of "
                                  "`{}Options({})`, mep_bench's learning rate for sgd",
                                  s.name, s.name, kRequiredLr));
  else
    s.facts.push_back(fmt::format("`{}Options()` has the defaults below; `{}Options(lr)` sets the learning rate",
                                  s.name, s.name));

  std::map<std::string, std::string> kinds;
  options.visit_all_options([&](const char* name, const auto& value) {
    kinds[name] = mep::detail::option_kind<std::decay_t<decltype(value)>>();
  });
  std::set<std::string> group;
  options.visit_group_options([&](const char* name, const auto&) { group.insert(name); });
  std::map<std::string, int> documented;
  Options::visit_option_docs([&](const char* name, const char*) { ++documented[name]; });

  for (const auto& [name, text] : options.texts()) {
    Row r{name, text, kinds[name], "", group.count(name) > 0};
    if (const char* meaning = Options::option_meaning(name)) r.meaning = meaning;
    else problems.push_back(fmt::format("{}: option {} has no meaning (add it to the visit_option_docs next to the "
                                        "option)", s.name, name));
    s.rows.push_back(r);
  }
  for (const auto& [name, count] : documented) {
    if (kinds.count(name) == 0)
      problems.push_back(
          fmt::format("{}: visit_option_docs gives a meaning for {}, which is not an option", s.name, name));
    if (count > 1)
      problems.push_back(fmt::format("{}: visit_option_docs gives {} meanings for {}", s.name, count, name));
  }
  return s;
}

template <class... Opt>
std::vector<Section> sections_of(std::tuple<Opt...>*, std::vector<std::string>& problems) {
  return {describe<Opt>(problems)...};
}

/// "mep::reference::SMEP" → "mepreferencesmep", the anchor GitHub gives its heading.
std::string anchor(const std::string& heading) {
  std::string out;
  for (char c : heading)
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_')
      out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    else if (c == ' ')
      out += '-';
  return out;
}

/// The page; `problems` as describe's.
std::string page(std::vector<std::string>& problems) {
  const auto all = sections_of(static_cast<Presets*>(nullptr), problems);
  std::string out;
  auto put = [&out](const std::string& line) {
    out += line;
    out += '\n';
  };
  put(fmt::format("Generated by `{}` (tools/options_reference.cpp) from the options' own tables; "
                  "ctest `docs.options_reference_current` fails when it is stale.",
                  kCommand));
  put("");
  put("# Options reference");
  put("");
  put("Every option of every preset, with its default (as `texts()` prints it, and as `set(name, text)` "
      "and mep_bench's `--set NAME.OPTION=VALUE` read it back) and its meaning. Options are set by "
      "chained setters named after them, as in `torch::optim`: "
      "`mep::SMEPOptions(0.01).beta(0.5).settle_steps(10)`. The options marked *group* may differ per "
      "parameter group and are restored by `torch::load`; every other option is saved with the "
      "optimizer and checked on load. The meanings live next to the options, in each options "
      "mixin's `visit_option_docs` (include/mep/options.hpp explains it).");
  put("");
  put("| preset | gradient | update | constraint | feedback | options |");
  put("|---|---|---|---|---|---|");
  for (const auto& s : all)
    put(fmt::format("| [{}](#{}) | `{}` | `{}` | `{}` | `{}` | {} |", s.name, anchor(s.name), s.policies[0],
                    s.policies[1], s.policies[2], s.policies[3], s.rows.size()));
  put("");
  put("The EP presets' gradient `mep::BasicEPGradient<mep::LayerSweep>` is `mep::EPGradient`, with the default "
      "settling; the `mep::reference::` presets have the reference implementation's defaults, which "
      "mep_bench's tables use, with HeavyBall settling. `mep::with_settling_t<Opt, Settling>` is `Opt` with "
      "another settling policy, whose settling options take that policy's defaults.");
  for (const auto& s : all) {
    put("");
    put(fmt::format("## {}", s.name));
    put("");
    for (const auto& fact : s.facts) put(fmt::format("- {}", fact));
    put("");
    put("| option | default | takes | meaning |");
    put("|---|---|---|---|");
    for (const auto& r : s.rows)
      put(fmt::format("| `{}`{} | `{}`{} | {} | {} |", r.name, r.group ? " *group*" : "", cell(r.text),
                      s.lr_required && r.name == "lr" ? " (no default)" : "", cell(r.kind), cell(r.meaning)));
  }
  put("");
  put("## Options not in texts()");
  put("");
  put("Every optimizer's options also have these (the defaults of `mep::SMEPOptions()`, the same for every "
      "preset). They are not saved with the optimizer, not set by name, and set on the optimizer's options "
      "(a parameter group may not set them):");
  put("");
  put("| option | default | meaning |");
  put("|---|---|---|");
  mep::SMEPOptions().visit_unsaved_options([&](const char* name, const std::string& text, const char* meaning) {
    put(fmt::format("| `{}` | `{}` | {} |", name, cell(text), cell(meaning)));
  });
  return out;
}

/// The presets presets.hpp declares (`using Name = Optimizer<…>`), by their short names.
std::multiset<std::string> declared_presets(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  const std::string s = text.str();
  std::multiset<std::string> out;
  const std::regex declaration(R"(using\s+([A-Z]\w*)\s*=\s*Optimizer<)");
  for (auto it = std::sregex_iterator(s.begin(), s.end(), declaration); it != std::sregex_iterator(); ++it)
    out.insert((*it)[1].str());
  return out;
}

template <class... Opt>
std::multiset<std::string> listed_presets(std::tuple<Opt...>*) {
  std::multiset<std::string> out;
  for (const std::string& name : {std::string(Composition<typename Opt::Options>::Defaults::name)...})
    out.insert(name.substr(name.rfind("::") + 2));
  return out;
}

int usage() {
  std::fputs("usage: mep_options --markdown | --meanings | --check FILE  [--presets include/mep/presets.hpp]\n",
             stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) try {
  const std::vector<std::string> args(argv + 1, argv + argc);
  bool markdown = false, meanings = false;
  std::string check, presets;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--markdown") markdown = true;
    else if (args[i] == "--meanings") meanings = true;
    else if (args[i] == "--check" && i + 1 < args.size()) check = args[++i];
    else if (args[i] == "--presets" && i + 1 < args.size()) presets = args[++i];
    else return usage();
  }
  if (int(markdown) + int(meanings) + int(!check.empty()) != 1) return usage();

  std::vector<std::string> problems;
  const std::string text = page(problems);
  if (!presets.empty()) {
    const auto declared = declared_presets(presets), listed = listed_presets(static_cast<Presets*>(nullptr));
    for (const auto& name : std::set<std::string>(declared.begin(), declared.end()))
      if (declared.count(name) != listed.count(name))
        problems.push_back(fmt::format("{} declares {} preset(s) named {}, tools/options_reference.cpp lists {}",
                                       presets, declared.count(name), name, listed.count(name)));
  }
  for (const auto& p : problems) fmt::print(stderr, "mep_options: {}\n", p);
  if (!problems.empty()) return 1;
  if (meanings) return 0;
  if (markdown) {
    fmt::print("{}", text);
    return 0;
  }

  std::ifstream in(check);
  if (!in) {
    fmt::print(stderr, "mep_options: cannot read {}\n", check);
    return 1;
  }
  std::istringstream expected(text);
  std::string want, have;
  for (size_t line = 1;; ++line) {
    const bool more_want = static_cast<bool>(std::getline(expected, want));
    const bool more_have = static_cast<bool>(std::getline(in, have));
    if (!more_want && !more_have) return 0;
    if (more_want != more_have || want != have) {
      fmt::print(stderr, "mep_options: {}:{} is stale: expected \"{}\", found \"{}\"; regenerate it: {}\n", check,
                 line, more_want ? want : "(end of file)", more_have ? have : "(end of file)", kCommand);
      return 1;
    }
  }
} catch (const std::exception& e) {
  fmt::print(stderr, "mep_options: {}\n", e.what());
  return 1;
}
