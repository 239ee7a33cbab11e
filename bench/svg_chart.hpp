#pragma once
/// \file svg_chart.hpp
/// The picture `mep_bench --svg` writes: a standalone SVG with two panels, test accuracy per
/// epoch for every optimizer (mean over the seeds, a band of ± one standard deviation) and
/// milliseconds per step as bars labelled with their ratio to a reference optimizer (SGD).
/// Plain text, no dependencies: small enough to read, and ctest checks that it parses as XML.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
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
inline std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}
// A tick spacing giving at most `most` intervals over `span`.
inline double tick_step(double span, int most) {
  for (double step : {0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 25.0, 50.0})
    if (span / step <= most) return step;
  return 100.0;
}
}  // namespace detail

/// The SVG document. `curves` and `bars` share colours by position; `reference` names the bar
/// the others are compared with (none if it is not among them).
inline std::string accuracy_speed_svg(const std::string& title, const std::vector<Curve>& curves,
                                      const std::vector<Bar>& bars, const std::string& reference) {
  static const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                  "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
                                  "#000000", "#98df8a", "#ff9896", "#aec7e8"};
  const auto colour = [](size_t i) { return colours[i % (sizeof colours / sizeof *colours)]; };
  using detail::num;
  // The bars' labels, right-aligned before the bars, set how far right the speed panel starts
  // (about 6.5 px per character at 12 px).
  size_t longest = 0;
  for (const auto& b : bars) longest = std::max(longest, b.label.size());
  const double x0 = 70, x1 = 560, y0 = 60, y1 = 400;  // the accuracy panel
  const double bx = std::max(700.0, x1 + 30 + 6.5 * static_cast<double>(longest)), bw = 150;
  const double W = bx + bw + 130, H = 460;
  std::ostringstream o;
  o << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" viewBox=\"0 0 " << W
    << ' ' << H << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">" << xml_escape(title)
    << "</text>\n";

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
  const auto px = [&](size_t e) { return epochs > 1 ? x0 + (x1 - x0) * static_cast<double>(e) / (epochs - 1) : (x0 + x1) / 2; };
  const auto py = [&](double acc) { return y1 - (y1 - y0) * (100 * acc - lo) / (hi - lo); };
  o << "<g id=\"accuracy\">\n<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << y0 - 12
    << "\" text-anchor=\"middle\">test accuracy per epoch (%), mean over the seeds ± 1 sd</text>\n";
  for (double t = lo; t <= hi + 1e-9; t += step) {
    const double y = y1 - (y1 - y0) * (t - lo) / (hi - lo);
    o << "<line x1=\"" << x0 << "\" y1=\"" << num(y) << "\" x2=\"" << x1 << "\" y2=\"" << num(y)
      << "\" stroke=\"#ddd\"/><text x=\"" << x0 - 6 << "\" y=\"" << num(y + 4) << "\" text-anchor=\"end\">" << t
      << "</text>\n";
  }
  const size_t every = std::max<size_t>(1, (epochs + 9) / 10);
  for (size_t e = 0; e < epochs; e += every)
    o << "<text x=\"" << num(px(e)) << "\" y=\"" << y1 + 16 << "\" text-anchor=\"middle\">" << e + 1 << "</text>\n";
  o << "<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << y1 + 34 << "\" text-anchor=\"middle\">epoch</text>\n"
    << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << x1 - x0 << "\" height=\"" << y1 - y0
    << "\" fill=\"none\" stroke=\"#888\"/>\n";
  for (size_t i = 0; i < curves.size(); ++i) {
    const auto& c = curves[i];
    o << "<g id=\"curve-" << i << "\"><title>" << xml_escape(c.label) << "</title>\n";
    if (c.band) {
      o << "<polygon fill=\"" << colour(i) << "\" fill-opacity=\"0.15\" stroke=\"none\" points=\"";
      for (size_t e = 0; e < c.high.size(); ++e) o << num(px(e)) << ',' << num(py(c.high[e])) << ' ';
      for (size_t e = c.low.size(); e-- > 0;) o << num(px(e)) << ',' << num(py(c.low[e])) << ' ';
      o << "\"/>\n";
    }
    o << "<polyline fill=\"none\" stroke=\"" << colour(i) << "\" stroke-width=\"2\" points=\"";
    for (size_t e = 0; e < c.mean.size(); ++e) o << num(px(e)) << ',' << num(py(c.mean[e])) << ' ';
    o << "\"/>\n</g>\n";
  }
  o << "</g>\n";

  // Milliseconds per step, with the ratio to the reference.
  double ref = 0, most = 0;
  for (const auto& b : bars) {
    most = std::max(most, b.ms);
    if (b.label == reference) ref = b.ms;
  }
  const double by = y0, bh = std::min(34.0, (y1 - y0) / std::max<size_t>(1, bars.size()));
  o << "<g id=\"speed\">\n<text x=\"" << bx + bw / 2 << "\" y=\"" << y0 - 12
    << "\" text-anchor=\"middle\">ms per step" << (ref > 0 ? " (× " + xml_escape(reference) + ")" : "")
    << "</text>\n";
  for (size_t i = 0; i < bars.size(); ++i) {
    const auto& b = bars[i];
    const double y = by + bh * static_cast<double>(i), w = most > 0 ? bw * b.ms / most : 0;
    std::string value = num(b.ms) + " ms";
    if (ref > 0) value += " (" + num(b.ms / ref) + "×)";
    o << "<text x=\"" << bx - 8 << "\" y=\"" << num(y + bh * 0.6) << "\" text-anchor=\"end\">" << xml_escape(b.label)
      << "</text><rect x=\"" << bx << "\" y=\"" << num(y + bh * 0.15) << "\" width=\"" << num(w) << "\" height=\""
      << num(bh * 0.7) << "\" fill=\"" << colour(i) << "\"/><text x=\"" << num(bx + w + 6) << "\" y=\""
      << num(y + bh * 0.6) << "\">" << xml_escape(value) << "</text>\n";
  }
  o << "</g>\n</svg>\n";
  return o.str();
}

}  // namespace mep_bench
