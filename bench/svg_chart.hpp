#pragma once
/// \file svg_chart.hpp
/// The picture `mep_bench --svg` writes: a standalone SVG with two panels, test accuracy per
/// epoch for every optimizer (mean over the seeds, a band of ± one standard deviation) and
/// milliseconds per step as bars labelled with their ratio to a reference optimizer (SGD).
/// Plain text formatted with fmt: small enough to read, and ctest checks that it parses as XML.

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>
#include <vector>

namespace mep_bench {

/// One optimizer's accuracy per epoch (fractions in [0, 1]): mean and, with `band`, its band.
struct Curve {
  std::string label;
  std::vector<double> mean, low, high;
  bool band = false;
};

/// One optimizer's step time.
struct Bar {
  std::string label;
  double ms = 0;
};

/// `s` with the five XML special characters escaped.
inline std::string xml_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default: out += c;
    }
  }
  return out;
}

namespace detail {
// A tick spacing giving at most `most` intervals over `span`.
inline double tick_step(double span, int most) {
  for (double step : {0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 25.0, 50.0})
    if (span / step <= most) return step;
  return 100.0;
}
}  // namespace detail

/// The SVG document. `curves` and `bars` share colours by position; `reference` names the bar
/// the others are compared with (none if it is not among them). Coordinates are written with
/// one decimal ({:.1f}), sizes and tick values as {:g}.
inline std::string accuracy_speed_svg(const std::string& title, const std::vector<Curve>& curves,
                                      const std::vector<Bar>& bars, const std::string& reference) {
  static const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                  "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
                                  "#000000", "#98df8a", "#ff9896", "#aec7e8"};
  const auto colour = [](size_t i) { return colours[i % (sizeof colours / sizeof *colours)]; };
  // The bars' labels, right-aligned before the bars, set how far right the speed panel starts
  // (about 6.5 px per character at 12 px).
  size_t longest = 0;
  for (const auto& b : bars) longest = std::max(longest, b.label.size());
  const double x0 = 70, x1 = 560, y0 = 60, y1 = 400;  // the accuracy panel
  const double bx = std::max(700.0, x1 + 30 + 6.5 * static_cast<double>(longest)), bw = 150;
  const double W = bx + bw + 130, H = 460;
  std::string svg;
  auto o = std::back_inserter(svg);
  fmt::format_to(o,
                 "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0:g}\" height=\"{1:g}\" viewBox=\"0 0 {0:g} "
                 "{1:g}\" font-family=\"sans-serif\" font-size=\"12\">\n"
                 "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
                 "<text x=\"{2:g}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{3}</text>\n",
                 W, H, W / 2, xml_escape(title));

  // Accuracy per epoch.
  double lo = 100, hi = 0;
  size_t epochs = 1;
  for (const auto& c : curves) {
    epochs = std::max(epochs, c.mean.size());
    for (double v : c.low) lo = std::min(lo, 100 * v);
    for (double v : c.high) hi = std::max(hi, 100 * v);
  }
  if (lo > hi) lo = 0, hi = 100;
  const double step = detail::tick_step(hi - lo + 1, 8);
  lo = std::max(0.0, std::floor(lo / step) * step), hi = std::min(100.0, std::ceil(hi / step) * step);
  if (hi <= lo) hi = lo + step;
  const auto px = [&](size_t e) {
    return epochs > 1 ? x0 + (x1 - x0) * static_cast<double>(e) / (epochs - 1) : (x0 + x1) / 2;
  };
  const auto py = [&](double acc) { return y1 - (y1 - y0) * (100 * acc - lo) / (hi - lo); };
  fmt::format_to(o,
                 "<g id=\"accuracy\">\n<text x=\"{:g}\" y=\"{:g}\" text-anchor=\"middle\">test accuracy per epoch "
                 "(%), mean over the seeds ± 1 sd</text>\n",
                 (x0 + x1) / 2, y0 - 12);
  for (double t = lo; t <= hi + 1e-9; t += step) {
    const double y = y1 - (y1 - y0) * (t - lo) / (hi - lo);
    fmt::format_to(o,
                   "<line x1=\"{0:g}\" y1=\"{1:.1f}\" x2=\"{2:g}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/><text x=\"{3:g}\" "
                   "y=\"{4:.1f}\" text-anchor=\"end\">{5:g}</text>\n",
                   x0, y, x1, x0 - 6, y + 4, t);
  }
  const size_t every = std::max<size_t>(1, (epochs + 9) / 10);
  for (size_t e = 0; e < epochs; e += every)
    fmt::format_to(o, "<text x=\"{:.1f}\" y=\"{:g}\" text-anchor=\"middle\">{}</text>\n", px(e), y1 + 16, e + 1);
  fmt::format_to(o,
                 "<text x=\"{:g}\" y=\"{:g}\" text-anchor=\"middle\">epoch</text>\n"
                 "<rect x=\"{:g}\" y=\"{:g}\" width=\"{:g}\" height=\"{:g}\" fill=\"none\" stroke=\"#888\"/>\n",
                 (x0 + x1) / 2, y1 + 34, x0, y0, x1 - x0, y1 - y0);
  for (size_t i = 0; i < curves.size(); ++i) {
    const auto& c = curves[i];
    fmt::format_to(o, "<g id=\"curve-{}\"><title>{}</title>\n", i, xml_escape(c.label));
    if (c.band) {
      fmt::format_to(o, "<polygon fill=\"{}\" fill-opacity=\"0.15\" stroke=\"none\" points=\"", colour(i));
      for (size_t e = 0; e < c.high.size(); ++e) fmt::format_to(o, "{:.1f},{:.1f} ", px(e), py(c.high[e]));
      for (size_t e = c.low.size(); e-- > 0;) fmt::format_to(o, "{:.1f},{:.1f} ", px(e), py(c.low[e]));
      svg += "\"/>\n";
    }
    fmt::format_to(o, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"", colour(i));
    for (size_t e = 0; e < c.mean.size(); ++e) fmt::format_to(o, "{:.1f},{:.1f} ", px(e), py(c.mean[e]));
    svg += "\"/>\n</g>\n";
  }
  svg += "</g>\n";

  // Milliseconds per step, with the ratio to the reference.
  double ref = 0, most = 0;
  for (const auto& b : bars) {
    most = std::max(most, b.ms);
    if (b.label == reference) ref = b.ms;
  }
  const double by = y0, bh = std::min(34.0, (y1 - y0) / std::max<size_t>(1, bars.size()));
  fmt::format_to(o, "<g id=\"speed\">\n<text x=\"{:g}\" y=\"{:g}\" text-anchor=\"middle\">ms per step{}</text>\n",
                 bx + bw / 2, y0 - 12, ref > 0 ? " (× " + xml_escape(reference) + ")" : "");
  for (size_t i = 0; i < bars.size(); ++i) {
    const auto& b = bars[i];
    const double y = by + bh * static_cast<double>(i), w = most > 0 ? bw * b.ms / most : 0;
    const std::string value =
        ref > 0 ? fmt::format("{:.1f} ms ({:.1f}×)", b.ms, b.ms / ref) : fmt::format("{:.1f} ms", b.ms);
    fmt::format_to(o,
                   "<text x=\"{:g}\" y=\"{:.1f}\" text-anchor=\"end\">{}</text><rect x=\"{:g}\" y=\"{:.1f}\" "
                   "width=\"{:.1f}\" height=\"{:.1f}\" fill=\"{}\"/><text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n",
                   bx - 8, y + bh * 0.6, xml_escape(b.label), bx, y + bh * 0.15, w, bh * 0.7, colour(i), bx + w + 6,
                   y + bh * 0.6, xml_escape(value));
  }
  svg += "</g>\n</svg>\n";
  return svg;
}

}  // namespace mep_bench
