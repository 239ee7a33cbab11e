// Update policies: Adam's bound, Dion (low-rank orthonormal, error feedback) and Fisher + Newton-Schulz.
#include <gtest/gtest.h>
#include <mep/update/adam.hpp>
#include <mep/update/dion.hpp>
#include <mep/update/fisher.hpp>

#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

struct DionOpts : mep::Dion::Options<DionOpts> {};
struct FisherOpts : mep::FisherNewtonSchulz::Options<FisherOpts> {};

const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

// Orthonormal basis (m × k) of a random k-dimensional subspace.
torch::Tensor random_orthonormal(int64_t m, int64_t k) { return std::get<0>(torch::linalg_qr(torch::randn({m, k}, f64))); }

template <class Opts>
std::string validation_message(const Opts& o) {
  try {
    o.validate();
  } catch (const mep::OptionError& e) {
    return e.what();
  }
  return "";
}

// ------------------------------------------------------------------ Adam

// direction_bound bounds Adam's direction and gives ranges holding what it writes (m, v, v_max), over
// gradients and moments of magnitudes from 1e-6 to 1e6, early and late steps.
TEST(Adam, DirectionBoundHoldsForTheValuesItWrites) {
  torch::manual_seed(4);
  for (bool amsgrad : {false, true})
    for (double scale : {1e-6, 1.0, 1e6})
      for (int64_t step : {1, 2, 50}) {
        mep::AdamUpdate adam;
        adam.amsgrad = amsgrad;
        mep::ParamState st;
        st.step = step;
        auto g = torch::randn({30, 7}, f64) * scale;
        mep::BufferExtents extents;
        if (step > 1) {
          st.set("exp_avg", torch::randn({30, 7}, f64) * scale * 0.3);
          st.set("exp_avg_sq", torch::rand({30, 7}, f64) * scale * scale);
          if (amsgrad) st.set("max_exp_avg_sq", st.get("exp_avg_sq") * 2);
          for (const auto& [name, t] : st.buffers) extents.ranges[name] = {t.min().item<double>(), t.max().item<double>()};
        }
        const double bound = adam.direction_bound(max_abs(g), extents, step);
        auto u = adam.direction(g, st);
        EXPECT_LE(max_abs(u), bound) << amsgrad << " " << scale << " " << step;
        // The ranges it returns hold every buffer the direction wrote.
        EXPECT_EQ(extents.ranges.size(), st.buffers.size());
        for (const auto& [name, t] : st.buffers) {
          const auto [lo, hi] = extents.range(name);
          EXPECT_GE(t.min().item<double>(), lo) << name;
          EXPECT_LE(t.max().item<double>(), hi) << name;
        }
      }
  mep::AdamUpdate no_eps;
  no_eps.eps = 0;
  mep::BufferExtents none;
  EXPECT_TRUE(std::isinf(no_eps.direction_bound(1.0, none, 1)));
  mep::BufferExtents negative;
  negative.ranges["exp_avg_sq"] = {-1e-3, 1.0};
  EXPECT_TRUE(std::isinf(mep::AdamUpdate().direction_bound(1.0, negative, 2)));
}

// ------------------------------------------------------------------ Dion

// Rank k = 3 < r = 20: QR's 17 surplus columns of P are round-off directions with
// ‖R_j‖ ≈ ‖G‖·1e-16; the ε = 1e-8 of the column normalisation keeps their Q_j (and their
// share of the update) at ≈ ‖G‖·1e-8 instead of normalising them to 1. The leakage
// therefore grows linearly with ‖G‖ (ε is absolute): ≈ 5e-8 at ‖G‖_F = 1, ≈ 3e-5 at 447.
TEST(Dion, LowRankGradientUpdateStaysInColumnSpace) {
  torch::manual_seed(1);
  const int64_t m = 300, n = 200, k = 3;
  const auto raw = torch::mm(torch::randn({m, k}, f64), torch::randn({k, n}, f64));
  auto uk = std::get<0>(torch::linalg_svd(raw, /*full_matrices=*/false)).narrow(1, 0, k);
  mep::Dion dion(DionOpts().rank_frac(0.1).dion_thresh(0));
  ASSERT_EQ(dion.rank_for(m, n), 20);
  auto leakage = [&](const torch::Tensor& g) {
    mep::ParamState st;
    st.step = 1;
    auto u = dion.direction(g, st);
    EXPECT_EQ(u.sizes(), g.sizes());
    EXPECT_NEAR(u.norm().item<double>(), std::sqrt(1.5 * k), 1e-6);  // √(m/n)·‖Q‖_F, 3 unit columns
    auto leak = u - torch::mm(uk, torch::mm(uk.t(), u));
    return (leak.norm() / u.norm()).item<double>();
  };
  const double unit = leakage(raw / raw.norm());
  const double large = leakage(raw);
  std::printf("[ measured ] Dion column-space leakage ||(I - U_k U_k^T) u|| / ||u||: %.3e at ||G||_F = 1, "
              "%.3e at ||G||_F = %.0f\n",
              unit, large, raw.norm().item<double>());
  EXPECT_LE(unit, 1e-5);
  EXPECT_LE(large, 1e-5);  // the relative ε makes the leakage independent of ‖G‖
}

// With r = min(m, n) and a fixed G, B stays a positive multiple of G (so μ has no effect)
// and P ← orth(G·G^T·P) is orthogonal iteration: the update converges to U·V^T at the
// rate (σ_{k+1}/σ_k)² per step of the closest singular-value pair. Well separated
// (σ_k = 3·0.9^k: 0.81 per step) it is there within 50 steps; crowded (linspace(1, 3, 40):
// (2.949/3)² ≈ 0.966 per step) it takes about 200.
TEST(Dion, FullRankConvergesToPolarFactor) {
  torch::manual_seed(2);
  const int64_t m = 60, n = 40;
  auto uo = random_orthonormal(m, n);
  auto vo = random_orthonormal(n, n);
  auto polar = torch::mm(uo, vo.t());
  auto distance_after = [&](const torch::Tensor& spectrum, int steps, const char* name) {
    auto g = torch::mm(uo * spectrum, vo.t());
    mep::Dion dion(DionOpts().rank_frac(1.0).dion_thresh(0).dion_mu(0.9));
    EXPECT_EQ(dion.rank_for(m, n), n);
    mep::ParamState st;
    torch::Tensor normalised;
    for (int s = 1; s <= steps; ++s) {
      ++st.step;
      normalised = dion.direction(g, st) / std::sqrt(static_cast<double>(m) / static_cast<double>(n));
    }
    const double abs_err = max_abs(normalised - polar);
    std::printf("[ measured ] Dion distance to U V^T after %d steps (%s): max abs %.3e\n", steps, name, abs_err);
    return abs_err;
  };
  auto separated = 3.0 * torch::pow(0.9, torch::arange(n, f64));
  EXPECT_LE(distance_after(separated, 50, "sigma_k = 3*0.9^k"), 2e-3);
  EXPECT_LE(distance_after(torch::linspace(1, 3, n, f64), 200, "linspace(1, 3)"), 2e-4);
}

TEST(Dion, ErrorFeedbackKeepsWhatTheLowRankDropped) {
  torch::manual_seed(3);
  const int64_t m = 80, n = 60;
  const double mu = 0.95;
  auto g = torch::randn({m, n}, f64);
  mep::Dion dion(DionOpts().rank_frac(0.1).dion_thresh(0).dion_mu(mu));
  const int64_t r = dion.rank_for(m, n);
  ASSERT_EQ(r, 6);
  mep::ParamState st;
  st.step = 1;
  auto u = dion.direction(g, st);

  // The same step by hand, from the same first basis (M = 0, so B = G).
  auto q0 = mep::Dion::initial_basis(n, r, g.options());
  auto p = std::get<0>(torch::linalg_qr(torch::mm(g, q0), "reduced"));
  auto rr = torch::mm(g.t(), p);
  auto m_expected = g - (1 - mu) * torch::mm(p, rr.t());
  auto m_state = st.get("dion_M");
  auto q_state = st.get("dion_Q");
  ASSERT_TRUE(m_state.defined());
  ASSERT_TRUE(q_state.defined());
  EXPECT_EQ(m_state.sizes(), g.sizes());
  EXPECT_EQ(q_state.sizes(), (std::vector<int64_t>{n, r}));
  EXPECT_LE(max_abs(m_state - m_expected), 1e-12);

  // Orthogonal to P, M is exactly G (nothing of it was applied); along P it keeps μ·Rᵀ.
  auto proj = torch::eye(m, f64) - torch::mm(p, p.t());
  EXPECT_LE(max_abs(torch::mm(proj, m_state) - torch::mm(proj, g)), 1e-12);
  EXPECT_LE(max_abs(torch::mm(p.t(), m_state) - mu * rr.t()), 1e-12);
  EXPECT_GT(torch::mm(proj, g).norm().item<double>(), 10.0);  // the dropped part is substantial

  // Q ← column-normalise(R) and u = √(m/n)·P·Qᵀ.
  auto norms = rr.norm(2, {0}, true);
  auto q_expected = rr / (norms + 1e-8 * norms.max());  // ε relative to the largest column
  EXPECT_LE(max_abs(q_state - q_expected), 1e-12);
  EXPECT_LE(max_abs(u - std::sqrt(double(m) / double(n)) * torch::mm(p, q_expected.t())), 1e-12);
}

TEST(Dion, SmallMatricesGetNewtonSchulzAndVectorsPassThrough) {
  torch::manual_seed(4);
  auto opts = DionOpts().ns_steps(7).ns_coefficients(mep::NSCoefficients::Quintic).ns_scale(mep::NSScale::Muon);
  mep::Dion dion(opts);
  mep::NewtonSchulz ns(opts);
  mep::ParamState st, st_ns;
  st.step = st_ns.step = 1;
  auto small = torch::randn({30, 20});  // 600 elements ≤ dion_thresh = 50000
  auto u = dion.direction(small, st);
  EXPECT_TRUE(torch::equal(u, ns.direction(small, st_ns)));
  EXPECT_FALSE(st.has("dion_M"));
  EXPECT_FALSE(st.has("dion_Q"));

  auto kernel = torch::randn({8, 4, 3, 3});  // conv kernel, 288 elements
  EXPECT_TRUE(torch::equal(dion.direction(kernel, st), ns.direction(kernel, st_ns)));

  auto bias = torch::randn({50});
  EXPECT_TRUE(torch::equal(dion.direction(bias, st), bias));
  auto scalar = torch::randn({});
  EXPECT_TRUE(torch::equal(dion.direction(scalar, st), scalar));
}

TEST(Dion, ConvKernelAndThresholdBoundary) {
  torch::manual_seed(5);
  mep::Dion dion(DionOpts().dion_thresh(288));
  mep::ParamState st;
  st.step = 1;
  auto at_thresh = torch::randn({8, 4, 3, 3});  // 288 elements: not more than dion_thresh
  dion.direction(at_thresh, st);
  EXPECT_FALSE(st.has("dion_Q"));

  auto kernel = torch::randn({16, 4, 3, 3});  // 576 elements > 288: Dion on the 16 × 36 view
  auto u = dion.direction(kernel, st);
  EXPECT_EQ(u.sizes(), kernel.sizes());
  EXPECT_EQ(u.scalar_type(), torch::kFloat32);
  EXPECT_EQ(st.get("dion_M").sizes(), (std::vector<int64_t>{16, 36}));
  EXPECT_EQ(st.get("dion_Q").sizes(), (std::vector<int64_t>{36, 4}));  // ⌊16·0.3⌋ = 4
  EXPECT_EQ(st.get("dion_M").scalar_type(), torch::kFloat32);
  EXPECT_EQ(st.get("dion_Q").scalar_type(), torch::kFloat32);
  EXPECT_TRUE(torch::isfinite(u).all().item<bool>());
  // u = P·Qᵀ: rank 4, ‖u‖_F = ‖Q‖_F = 2 (four unit columns; Q's columns are not
  // orthogonal after one step, so u is not yet a partial isometry).
  auto sv = torch::linalg_svdvals(u.reshape({16, 36}).to(torch::kFloat64));
  EXPECT_GT(sv[3].item<double>(), 0.1);
  EXPECT_LT(sv[4].item<double>(), 1e-5);
  EXPECT_NEAR(u.norm().item<double>(), 2.0, 1e-5);
}

TEST(Dion, DeterministicAndLeavesGlobalRngAlone) {
  mep::Dion dion(DionOpts().dion_thresh(0));
  torch::manual_seed(6);
  auto g = torch::randn({40, 30}, f64);
  torch::manual_seed(123);
  auto expected_next = torch::randn({5});
  torch::manual_seed(123);
  mep::ParamState a, b;
  a.step = b.step = 1;
  auto ua = dion.direction(g, a);
  auto next = torch::randn({5});
  EXPECT_TRUE(torch::equal(next, expected_next));
  auto ub = dion.direction(g, b);
  EXPECT_TRUE(torch::equal(ua, ub));
  EXPECT_TRUE(torch::equal(a.get("dion_Q"), b.get("dion_Q")));
}

TEST(Dion, OptionsValidate) {
  EXPECT_EQ(validation_message(DionOpts()), "");
  DionOpts o;
  EXPECT_DOUBLE_EQ(o.rank_frac(), 0.3);
  EXPECT_EQ(o.dion_thresh(), 50000);
  EXPECT_DOUBLE_EQ(o.dion_mu(), 0.95);
  EXPECT_EQ(o.ns_steps(), 5);
  for (double bad : {0.0, -0.1, 1.5}) {
    EXPECT_THROW(DionOpts().rank_frac(bad).validate(), mep::OptionError);
    EXPECT_NE(validation_message(DionOpts().rank_frac(bad)).find("rank_frac"), std::string::npos);
  }
  EXPECT_EQ(validation_message(DionOpts().rank_frac(1.0)), "");
  EXPECT_NE(validation_message(DionOpts().dion_mu(1.0)).find("dion_mu"), std::string::npos);
  EXPECT_NE(validation_message(DionOpts().dion_mu(-0.5)).find("dion_mu"), std::string::npos);
  EXPECT_NE(validation_message(DionOpts().dion_thresh(-1)).find("dion_thresh"), std::string::npos);
  EXPECT_NE(validation_message(DionOpts().ns_steps(-1)).find("ns_steps"), std::string::npos);
}

// ------------------------------------------------------------------ Fisher

// A gradient whose columns are orthogonal with squared norm c: its proxy gᵀg is c·I.
torch::Tensor orthogonal_columns(int64_t rows, int64_t cols, double c) {
  auto q = std::get<0>(torch::linalg_qr(torch::randn({rows, cols}, f64)));
  return std::sqrt(c) * q;
}

TEST(Fisher, IdentityFisherGivesNewtonSchulz) {
  torch::manual_seed(10);
  const double c = 2.0;
  auto g = orthogonal_columns(50, 30, c);
  mep::FisherNewtonSchulz fisher(FisherOpts{});
  mep::ParamState st;
  st.step = 1;
  auto u = fisher.direction(g, st);
  EXPECT_LE(max_abs(st.get("fisher") - 0.05 * c * torch::eye(30, f64)), 1e-12);
  EXPECT_LE(max_abs(u - mep::newton_schulz(g, 5)), 1e-6);
  // A second step: F = (0.95·0.05 + 0.05)·c·I, still a multiple of I.
  EXPECT_LE(max_abs(fisher.direction(g, st) - mep::newton_schulz(g, 5)), 1e-6);
  EXPECT_LE(max_abs(st.get("fisher") - (0.95 * 0.05 + 0.05) * c * torch::eye(30, f64)), 1e-12);
}

TEST(Fisher, DiagonalIdentityGivesNewtonSchulz) {
  torch::manual_seed(11);
  const double c = 3.0;
  auto g = orthogonal_columns(40, 25, c);  // tall: NS works on the transpose
  mep::FisherNewtonSchulz fisher(FisherOpts().fisher_diagonal(true).ns_scale(mep::NSScale::Muon));
  mep::ParamState st;
  st.step = 1;
  auto u = fisher.direction(g, st);
  EXPECT_EQ(st.get("fisher").sizes(), (std::vector<int64_t>{25}));
  EXPECT_LE(max_abs(st.get("fisher") - 0.05 * c), 1e-12);
  EXPECT_LE(max_abs(u - std::sqrt(40.0 / 25.0) * mep::newton_schulz(g, 5)), 1e-6);
}

TEST(Fisher, NonIdentityFisherChangesTheUpdate) {
  torch::manual_seed(12);
  auto g = torch::randn({16, 12}, f64);
  mep::FisherNewtonSchulz fisher(FisherOpts{});
  mep::ParamState st;
  st.step = 1;
  auto u = fisher.direction(g, st);
  EXPECT_LE(max_abs(st.get("fisher") - 0.05 * torch::mm(g.t(), g)), 1e-12);
  auto whitened = torch::mm(g, torch::linalg_inv(0.05 * torch::mm(g.t(), g) + 1e-3 * torch::eye(12, f64)));
  EXPECT_LE(max_abs(u - mep::newton_schulz(whitened, 5)), 1e-8);
  const double diff = max_abs(u - mep::newton_schulz(g, 5));
  std::printf("[ measured ] Fisher: the proxy moves the update by max abs %.3e from NS(g)\n", diff);
  EXPECT_GT(diff, 1e-2);

  mep::FisherNewtonSchulz diag(FisherOpts().fisher_diagonal(true));
  mep::ParamState sd;
  auto ud = diag.direction(g, sd);
  EXPECT_LE(max_abs(sd.get("fisher") - 0.05 * g.square().sum(0)), 1e-12);
  auto wd = g / (0.05 * g.square().sum(0) + 1e-3);
  EXPECT_LE(max_abs(ud - mep::newton_schulz(wd, 5)), 1e-8);
}

TEST(Fisher, ConvKernelsVectorsAndFloat32) {
  torch::manual_seed(14);
  mep::FisherNewtonSchulz fisher(FisherOpts{});
  mep::ParamState st;
  auto kernel = torch::randn({8, 3, 3, 3});
  auto u = fisher.direction(kernel, st);
  EXPECT_EQ(u.sizes(), kernel.sizes());
  EXPECT_EQ(u.scalar_type(), torch::kFloat32);
  EXPECT_EQ(st.get("fisher").scalar_type(), torch::kFloat32);
  EXPECT_EQ(st.get("fisher").sizes(), (std::vector<int64_t>{27, 27}));

  auto bias = torch::randn({8});
  mep::ParamState sb;
  EXPECT_TRUE(torch::equal(fisher.direction(bias, sb), bias));
  EXPECT_FALSE(sb.has("fisher"));

  // A huge gradient (whitened far beyond cubic NS's normalisation clamp) stays finite.
  auto big = 1e3 * torch::randn({20, 10});
  mep::ParamState sg;
  auto ub = fisher.direction(big, sg);
  EXPECT_TRUE(torch::isfinite(ub).all().item<bool>());
}

TEST(Fisher, NonPositiveDefiniteThrowsNamingTheShape) {
  mep::FisherNewtonSchulz fisher(FisherOpts{});
  mep::ParamState st;
  auto g = torch::randn({6, 5}, f64);
  st.set("fisher", -10 * torch::eye(5, f64));  // a corrupted state: F + λI is not positive definite
  try {
    fisher.direction(g, st);
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fisher_damping"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[6, 5]"), std::string::npos) << msg;
  }
}

TEST(Fisher, OptionsValidate) {
  EXPECT_EQ(validation_message(FisherOpts()), "");
  FisherOpts o;
  EXPECT_DOUBLE_EQ(o.fisher_damping(), 1e-3);
  EXPECT_DOUBLE_EQ(o.fisher_ema(), 0.95);
  EXPECT_FALSE(o.fisher_diagonal());
  EXPECT_EQ(o.ns_steps(), 5);
  for (double bad : {0.0, -1e-3}) {
    EXPECT_THROW(FisherOpts().fisher_damping(bad).validate(), mep::OptionError);
    EXPECT_NE(validation_message(FisherOpts().fisher_damping(bad)).find("fisher_damping"), std::string::npos);
  }
  EXPECT_NE(validation_message(FisherOpts().fisher_ema(1.0)).find("fisher_ema"), std::string::npos);
  EXPECT_NE(validation_message(FisherOpts().fisher_ema(-0.1)).find("fisher_ema"), std::string::npos);
  EXPECT_NE(validation_message(FisherOpts().ns_steps(-2)).find("ns_steps"), std::string::npos);
}

}  // namespace
