// Update policies: Adam's bound, Newton-Schulz, Dion (low-rank orthonormal, error feedback),
// Fisher + Newton-Schulz, and mep::MuonUpdate against a transcription of torch.optim.Muon's
// step (torch/optim/_muon.py, `_single_tensor_muon`, `_zeropower_via_newtonschulz` with
// use_addmm=False, `_adjust_lr`), its parameter checks and split_for_muon.
#include <gtest/gtest.h>
#include <mep/gradient/backprop.hpp>
#include <mep/mep.hpp>
#include <mep/optimizer.hpp>
#include <mep/update/adam.hpp>
#include <mep/update/dion.hpp>
#include <mep/update/fisher.hpp>
#include <mep/update/muon.hpp>

#include "support.hpp"

#include <cmath>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

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

// ------------------------------------------------------------------ Newton-Schulz

// The matrices of one shape are orthogonalised as one batch: each equals its own direction
// (float64, 1e-12), whatever the schedule and scale; other shapes and vectors as `direction`.
TEST(NewtonSchulz, BatchedDirectionsEqualPerMatrixOnes) {
  torch::manual_seed(12);
  for (auto coefficients : {mep::NSCoefficients::Cubic, mep::NSCoefficients::Quintic, mep::NSCoefficients::PolarExpress}) {
    mep::NewtonSchulz ns;
    ns.coefficients = coefficients;
    ns.scale = mep::NSScale::Muon;
    std::vector<torch::Tensor> g = {torch::randn({12, 7}, f64), torch::randn({12, 7}, f64), torch::randn({5}, f64),
                                    torch::randn({7, 12}, f64), torch::randn({12, 7}, f64),
                                    torch::randn({4, 3, 2, 2}, f64)};
    std::vector<mep::ParamState> states(g.size());
    std::vector<mep::ParamState*> st;
    for (auto& s : states) st.push_back(&s);
    const auto batched = ns.directions(g, st);
    ASSERT_EQ(batched.size(), g.size());
    for (size_t i = 0; i < g.size(); ++i) {
      const auto one = ns.direction(g[i], states[i]);
      EXPECT_EQ(batched[i].sizes(), g[i].sizes()) << i;
      EXPECT_LT((batched[i] - one).abs().max().item<double>(), 1e-12) << mep::enum_name(coefficients) << " " << i;
    }
  }
}

TEST(NewtonSchulz, CubicEqualsTheFormulaComputedDirectly) {
  torch::manual_seed(3);
  for (auto shape : {std::vector<int64_t>{40, 25}, std::vector<int64_t>{25, 40}, std::vector<int64_t>{30, 30}}) {
    auto g = torch::randn(shape, torch::kFloat64);
    auto x = g / g.norm().clamp(1e-4, 1e4);
    auto eye = torch::eye(shape[1], torch::kFloat64);
    for (int k = 0; k < 5; ++k) x = 0.5 * torch::mm(x, 3 * eye - torch::mm(x.t(), x));
    auto ours = mep::newton_schulz(g, 5, mep::NSCoefficients::Cubic);
    EXPECT_LE((ours - x).abs().max().item<double>(), 1e-12) << shape;
  }
}

TEST(NewtonSchulz, ZeroStepsGiveTheNormalisedGradient) {
  auto g = torch::randn({12, 7}, torch::kFloat64) * 3;
  auto u = mep::newton_schulz(g, 0, mep::NSCoefficients::Cubic);
  EXPECT_TRUE(torch::allclose(u, g / g.norm()));
  EXPECT_NEAR(u.norm().item<double>(), 1.0, 1e-12);
}

TEST(NewtonSchulz, QuinticSingularValuesAfterFiveSteps) {
  torch::manual_seed(4);
  for (auto shape : {std::vector<int64_t>{784, 256}, std::vector<int64_t>{256, 784}}) {
    auto s = torch::linalg_svdvals(mep::newton_schulz(torch::randn(shape), 5, mep::NSCoefficients::Quintic));
    EXPECT_GE(s.min().item<double>(), 0.68) << shape;
    EXPECT_LE(s.max().item<double>(), 1.2) << shape;
  }
  // A square Gaussian matrix has singular values too close to 0 for five steps to lift
  // them all; at least 95 % must be in range.
  auto s = torch::linalg_svdvals(mep::newton_schulz(torch::randn({256, 256}), 5, mep::NSCoefficients::Quintic));
  const double inside = ((s >= 0.68) & (s <= 1.2)).to(torch::kFloat64).mean().item<double>();
  EXPECT_GE(inside, 0.95);
}

TEST(NewtonSchulz, PolarExpressConvergesTowardsThePolarFactor) {
  torch::manual_seed(5);
  auto g = torch::randn({128, 64}, torch::kFloat64);
  auto s = torch::linalg_svdvals(mep::newton_schulz(g, 8, mep::NSCoefficients::PolarExpress));
  EXPECT_GE(s.min().item<double>(), 0.9);
  EXPECT_LE(s.max().item<double>(), 1.1);
}

TEST(NewtonSchulz, PolicyKeepsShapesPassesVectorsAndScales) {
  mep::NewtonSchulz ns;
  mep::ParamState st;
  auto bias = torch::randn({10});
  EXPECT_TRUE(torch::equal(ns.direction(bias, st), bias));
  auto kernel = torch::randn({8, 3, 3, 3});
  auto u = ns.direction(kernel, st);
  EXPECT_EQ(u.sizes(), kernel.sizes());
  ns.scale = mep::NSScale::Muon;
  auto tall = torch::randn({64, 16});
  EXPECT_NEAR(ns.direction(tall, st).norm().item<double>() / mep::newton_schulz(tall, 5).norm().item<double>(), 2.0,
              1e-5);
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

// A failed factorisation reads nothing on the host: the direction comes out non-finite (the
// optimizer's one check of the step sees it) and diagnose() names the shape and the option.
TEST(Fisher, NonPositiveDefiniteIsNonFiniteAndDiagnosedNamingTheShape) {
  mep::FisherNewtonSchulz fisher(FisherOpts{});
  mep::ParamState st;
  auto g = torch::randn({6, 5}, f64);
  fisher.begin_step();
  EXPECT_TRUE(torch::isfinite(fisher.direction(g, st)).all().item<bool>());
  EXPECT_NO_THROW(fisher.diagnose());
  st.fisher = -10 * torch::eye(5, f64);  // a corrupted state: F + λI is not positive definite
  EXPECT_FALSE(torch::isfinite(fisher.direction(g, st)).all().item<bool>());
  try {
    fisher.diagnose();
    FAIL() << "expected std::runtime_error";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("fisher_damping"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[6, 5]"), std::string::npos) << msg;
  }
  fisher.begin_step();  // a new step forgets the last one's factorisations
  EXPECT_NO_THROW(fisher.diagnose());
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

// ------------------------------------------------------------------ Muon

namespace {

// The options of the policy alone, as an optimizer's options type would inherit them.
struct MuonOpts : mep::MuonUpdate::Options<MuonOpts> {};

// torch.optim.Muon's step for one parameter, op for op: the reference the policy must match.
struct TorchMuonStep {
  double lr = 0.02, weight_decay = 0.1, momentum = 0.95, eps = 1e-7;
  bool nesterov = true;
  std::string adjust_lr_fn = "original";  // or "match_rms_adamw"
  std::tuple<double, double, double> abc{3.4445, -4.7750, 2.0315};
  int64_t ns_steps = 5;
  torch::Tensor momentum_buffer;

  torch::Tensor zeropower(const torch::Tensor& grad) const {
    const auto [a, b, c] = abc;
    torch::Tensor ortho_grad = grad.to(torch::kBFloat16);  // grad.bfloat16()
    if (grad.size(0) > grad.size(1)) ortho_grad = ortho_grad.transpose(0, 1);
    ortho_grad.div_(torch::clamp(torch::linalg::vector_norm(ortho_grad, 2, c10::nullopt, false, c10::nullopt), eps,
                                 c10::nullopt));
    for (int64_t i = 0; i < ns_steps; ++i) {
      auto gram_matrix = torch::matmul(ortho_grad, ortho_grad.transpose(0, 1));
      auto gram_update = torch::add(torch::mul(gram_matrix, b), torch::matmul(torch::mul(gram_matrix, c), gram_matrix));
      ortho_grad = torch::add(torch::mul(ortho_grad, a), torch::matmul(gram_update, ortho_grad));
    }
    if (grad.size(0) > grad.size(1)) ortho_grad = ortho_grad.transpose(0, 1);
    return ortho_grad;
  }

  double adjusted_lr(const torch::Tensor& param) const {
    const double A = static_cast<double>(param.size(0)), B = static_cast<double>(param.size(1));
    if (adjust_lr_fn == "original") return lr * std::sqrt(std::max(1.0, A / B));
    return lr * (0.2 * std::sqrt(std::max(A, B)));
  }

  void step(torch::Tensor& param, const torch::Tensor& grad) {
    if (!momentum_buffer.defined()) momentum_buffer = torch::zeros_like(grad, torch::MemoryFormat::Preserve);
    momentum_buffer.lerp_(grad, 1 - momentum);
    torch::Tensor update = nesterov ? grad.lerp(momentum_buffer, momentum) : momentum_buffer;
    update = zeropower(update);
    const double alr = adjusted_lr(param);
    param.mul_(1 - lr * weight_decay);
    param.add_(update, -alr);
  }
};

// The policy applied as mep::Optimizer applies an update policy with coupled_weight_decay =
// false and lr_scale: θ ← θ(1 − lr·λ), then θ.add_(u, −lr·lr_scale(θ)).
void policy_step(const mep::MuonUpdate& u, mep::ParamState& st, torch::Tensor& p, const torch::Tensor& g, double lr,
                 double weight_decay) {
  ++st.step;
  auto d = u.direction(g, st);
  p.mul_(1 - lr * weight_decay);
  p.add_(d, -lr * u.lr_scale(p));
}

// A gradient that depends on the parameter (so that any difference carries into later
// steps), plus noise.
torch::Tensor gradient_at(const torch::Tensor& p, const torch::Tensor& target) {
  auto noise = torch::randn(p.sizes(), torch::TensorOptions().dtype(p.scalar_type())) * 0.1;
  return (p - target) + noise;
}

struct Case {
  int64_t rows, cols;
  bool nesterov;
  mep::NSScale scale;
};

std::string name(const Case& c) {
  std::ostringstream os;
  os << c.rows << "x" << c.cols << (c.nesterov ? " nesterov" : " plain") << " scale " << c.scale;
  return os.str();
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (auto shape : {std::pair<int64_t, int64_t>{24, 10}, {10, 24}, {16, 16}})
    for (bool nesterov : {true, false})
      for (auto scale : {mep::NSScale::Muon, mep::NSScale::AdamW})
        cases.push_back({shape.first, shape.second, nesterov, scale});
  return cases;
}

}  // namespace

TEST(Muon, Float32WithBfloat16NewtonSchulzIsBitIdenticalToTorch) {
  for (const auto& c : all_cases()) {
    SCOPED_TRACE(name(c));
    torch::manual_seed(7);
    auto p_ref = torch::randn({c.rows, c.cols});
    auto target = torch::randn({c.rows, c.cols});
    auto p = p_ref.clone();
    TorchMuonStep ref;
    ref.nesterov = c.nesterov;
    ref.adjust_lr_fn = c.scale == mep::NSScale::Muon ? "original" : "match_rms_adamw";
    const mep::MuonUpdate policy(MuonOpts().nesterov(c.nesterov).ns_scale(c.scale));
    mep::ParamState st;
    for (int t = 0; t < 20; ++t) {
      torch::manual_seed(100 + t);
      auto g_ref = gradient_at(p_ref, target);
      torch::manual_seed(100 + t);
      auto g = gradient_at(p, target);
      ASSERT_TRUE(torch::equal(g, g_ref)) << "step " << t;
      const auto g_before = g.clone();
      ref.step(p_ref, g_ref);
      policy_step(policy, st, p, g, ref.lr, ref.weight_decay);
      ASSERT_TRUE(torch::equal(g, g_before)) << "direction() changed the gradient, step " << t;
      ASSERT_TRUE(torch::equal(p, p_ref)) << "step " << t << ": max |diff| " << (p - p_ref).abs().max().item<double>();
      ASSERT_TRUE(torch::equal(st.get("momentum_buffer"), ref.momentum_buffer)) << "step " << t;
    }
    EXPECT_EQ(p.scalar_type(), torch::kFloat32);
  }
}

TEST(Muon, DirectionIsTheBfloat16OrthogonalisedUpdateAndLrScaleIsTorchsAdjustment) {
  torch::manual_seed(3);
  auto g = torch::randn({12, 5});
  mep::ParamState st;
  const mep::MuonUpdate muon{MuonOpts()};
  auto d = muon.direction(g, st);
  EXPECT_EQ(d.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(d.sizes(), g.sizes());
  TorchMuonStep ref;
  auto buf = torch::zeros_like(g).lerp_(g, 1 - 0.95);
  EXPECT_TRUE(torch::equal(d, ref.zeropower(g.lerp(buf, 0.95))));
  // The orthogonalised update's singular values are near 1 (within the quintic's band).
  auto sv = std::get<1>(torch::svd(d.to(torch::kFloat64)));
  EXPECT_GT(sv.min().item<double>(), 0.5);
  EXPECT_LT(sv.max().item<double>(), 1.5);

  EXPECT_DOUBLE_EQ(muon.lr_scale(torch::zeros({12, 5})), std::sqrt(12.0 / 5.0));
  EXPECT_DOUBLE_EQ(muon.lr_scale(torch::zeros({5, 12})), 1.0);
  const mep::MuonUpdate adamw(MuonOpts().ns_scale(mep::NSScale::AdamW));
  EXPECT_DOUBLE_EQ(adamw.lr_scale(torch::zeros({12, 5})), 0.2 * std::sqrt(12.0));
  EXPECT_DOUBLE_EQ(adamw.lr_scale(torch::zeros({5, 12})), 0.2 * std::sqrt(12.0));
  const mep::MuonUpdate none(MuonOpts().ns_scale(mep::NSScale::None));
  EXPECT_DOUBLE_EQ(none.lr_scale(torch::zeros({12, 5})), 1.0);

  // Below eps the norm is clamped to eps (torch's clamp(min=eps), not + eps).
  auto tiny = torch::randn({3, 7}) * 1e-10;
  mep::ParamState st_tiny;
  const mep::MuonUpdate plain(MuonOpts().nesterov(false).ns_steps(0));
  TorchMuonStep ref0;
  ref0.ns_steps = 0;
  auto tiny_buf = torch::zeros_like(tiny).lerp_(tiny, 1 - 0.95);
  auto d0 = plain.direction(tiny, st_tiny);
  EXPECT_TRUE(torch::equal(d0, ref0.zeropower(tiny_buf)));
  EXPECT_TRUE(torch::equal(d0, (tiny_buf.to(torch::kBFloat16) / torch::scalar_tensor(1e-7, torch::kBFloat16))));
}

namespace {
// The rule in float64, written from its formulas (not torch's op order):
//   M ← μM + (1−μ)g;  U = (1−μ)g + μM or M;  X = U/max(‖U‖, ε) (on the wide orientation);
//   X ← aX + (bA + cA²)X, A = XXᵀ;  θ ← θ(1 − lrλ) − lr·s·X.
struct FormulaMuon {
  double lr = 0.02, weight_decay = 0.1, mu = 0.95, eps = 1e-7;
  bool nesterov = true;
  mep::NSScale scale = mep::NSScale::Muon;
  torch::Tensor m;

  void step(torch::Tensor& p, const torch::Tensor& g) {
    if (!m.defined()) m = torch::zeros_like(g);
    m = mu * m + (1 - mu) * g;
    auto u = nesterov ? (1 - mu) * g + mu * m : m;
    const bool tall = u.size(0) > u.size(1);
    auto x = tall ? u.t() : u;
    x = x / std::max(x.norm().item<double>(), eps);
    for (int k = 0; k < 5; ++k) {
      auto A = torch::matmul(x, x.t());
      x = 3.4445 * x + torch::matmul(-4.7750 * A + 2.0315 * torch::matmul(A, A), x);
    }
    if (tall) x = x.t();
    const double rows = static_cast<double>(p.size(0)), cols = static_cast<double>(p.size(1));
    const double s = scale == mep::NSScale::Muon ? std::sqrt(std::max(1.0, rows / cols)) : 0.2 * std::sqrt(std::max(rows, cols));
    p = p * (1 - lr * weight_decay) - lr * s * x;
  }
};
}  // namespace

TEST(Muon, Float64InItsOwnDtypeFollowsTheRule) {
  for (const auto& c : all_cases()) {
    SCOPED_TRACE(name(c));
    torch::manual_seed(11);
    const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
    auto p = torch::randn({c.rows, c.cols}, f64);
    auto target = torch::randn({c.rows, c.cols}, f64);
    auto p_ref = p.clone();
    FormulaMuon ref;
    ref.nesterov = c.nesterov;
    ref.scale = c.scale;
    const mep::MuonUpdate policy(MuonOpts().nesterov(c.nesterov).ns_scale(c.scale).ns_bfloat16(false));
    mep::ParamState st;
    for (int t = 0; t < 20; ++t) {
      torch::manual_seed(200 + t);
      auto g = gradient_at(p, target);
      auto g_ref = g.clone();
      policy_step(policy, st, p, g, ref.lr, ref.weight_decay);
      ref.step(p_ref, g_ref);
      ASSERT_EQ(p.scalar_type(), torch::kFloat64);
      const double rel = ((p - p_ref).norm() / p_ref.norm()).item<double>();
      ASSERT_LE(rel, 1e-10) << "step " << t;
    }
  }
}

TEST(Muon, CubicCoefficientsAreTorchsWithOneAndAHalfMinusAHalfZero) {
  torch::manual_seed(5);
  auto p = torch::randn({9, 14}), target = torch::randn({9, 14});
  auto p_ref = p.clone();
  TorchMuonStep ref;
  ref.abc = {1.5, -0.5, 0.0};
  ref.ns_steps = 7;
  const mep::MuonUpdate policy(MuonOpts().ns_coefficients(mep::NSCoefficients::Cubic).ns_steps(7));
  mep::ParamState st;
  for (int t = 0; t < 10; ++t) {
    auto g = (p - target).contiguous();
    ref.step(p_ref, g.clone());
    policy_step(policy, st, p, g, ref.lr, ref.weight_decay);
    ASSERT_TRUE(torch::equal(p, p_ref)) << "step " << t;
  }
}

TEST(Muon, ZeroStepsGiveTheNormalisedUpdateAndAZeroGradientStaysFinite) {
  const mep::MuonUpdate zero(MuonOpts().ns_steps(0).nesterov(false).ns_bfloat16(false));
  mep::ParamState st;
  auto g = torch::tensor({{3.0, 0.0}, {0.0, 4.0}}, torch::kFloat64);
  auto d = zero.direction(g, st);
  EXPECT_TRUE(torch::allclose(d, g * 0.05 / (g * 0.05).norm()));

  const mep::MuonUpdate muon{MuonOpts()};
  mep::ParamState st0;
  auto z = muon.direction(torch::zeros({4, 6}), st0);
  EXPECT_TRUE(torch::isfinite(z).all().item<bool>());
  EXPECT_EQ(z.abs().max().item<double>(), 0.0);
}

TEST(Muon, TheMomentumBufferIsNotNormalisedWhenNewtonSchulzRunsInTheGradientsDtype) {
  // torch's grad.bfloat16() would be the buffer itself here; the buffer stays the EMA.
  const mep::MuonUpdate muon(MuonOpts().nesterov(false).ns_bfloat16(false));
  mep::ParamState st;
  torch::manual_seed(1);
  auto g = torch::randn({6, 4});
  muon.direction(g, st);
  EXPECT_TRUE(torch::equal(st.get("momentum_buffer"), torch::zeros_like(g).lerp_(g, 1 - 0.95)));
}

TEST(Muon, ConvKernelsAsMatricesWhenAsked) {
  torch::manual_seed(9);
  auto w = torch::randn({4, 3, 3, 3});
  auto g = torch::randn({4, 3, 3, 3});
  const mep::MuonUpdate plain{MuonOpts()};
  try {
    plain.check_parameter(w, "parameter 0 (group 0)");
    FAIL() << "a conv kernel was accepted without conv_as_matrix";
  } catch (const mep::OptionError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("parameter 0 (group 0)"), std::string::npos) << what;
    EXPECT_NE(what.find("[4, 3, 3, 3]"), std::string::npos) << what;
    EXPECT_NE(what.find("conv_as_matrix"), std::string::npos) << what;
  }
  mep::ParamState refused;
  EXPECT_THROW(plain.direction(g, refused), mep::OptionError);

  const mep::MuonUpdate conv(MuonOpts().conv_as_matrix(true));
  EXPECT_NO_THROW(conv.check_parameter(w, "parameter 0 (group 0)"));
  mep::ParamState st;
  auto d = conv.direction(g, st);
  EXPECT_EQ(d.sizes(), g.sizes());
  TorchMuonStep ref;
  auto gm = g.reshape({4, 27});
  auto buf = torch::zeros_like(gm).lerp_(gm, 1 - 0.95);
  EXPECT_TRUE(torch::equal(d.reshape({4, 27}), ref.zeropower(gm.lerp(buf, 0.95))));
  EXPECT_EQ(st.get("momentum_buffer").sizes(), g.sizes());
  EXPECT_DOUBLE_EQ(conv.lr_scale(w), 1.0);  // √max(1, 4/27)
  const mep::MuonUpdate conv_adamw(MuonOpts().conv_as_matrix(true).ns_scale(mep::NSScale::AdamW));
  EXPECT_DOUBLE_EQ(conv_adamw.lr_scale(w), 0.2 * std::sqrt(27.0));
  const mep::MuonUpdate tall(MuonOpts().conv_as_matrix(true));
  EXPECT_DOUBLE_EQ(tall.lr_scale(torch::zeros({64, 2, 1, 1})), std::sqrt(32.0));
}

TEST(Muon, NonMatricesAreRefusedNamingTheParameterItsShapeAndTheRoute) {
  const mep::MuonUpdate muon{MuonOpts()};
  for (const auto& bad : {torch::zeros({5}), torch::zeros({}), torch::zeros({2, 3}, torch::kInt64)}) {
    try {
      muon.check_parameter(bad, "parameter 3 (group 1)");
      FAIL() << "accepted shape " << bad.sizes();
    } catch (const mep::OptionError& e) {
      const std::string what = e.what();
      std::ostringstream shape;
      shape << bad.sizes();
      EXPECT_NE(what.find("parameter 3 (group 1)"), std::string::npos) << what;
      EXPECT_NE(what.find("shape " + shape.str()), std::string::npos) << what;
      EXPECT_NE(what.find("mep::AdamW"), std::string::npos) << what;
      EXPECT_NE(what.find("mep::split_for_muon"), std::string::npos) << what;
      EXPECT_NE(what.find("torch.optim.Muon"), std::string::npos) << what;
      EXPECT_EQ(what.find("conv_as_matrix"), std::string::npos) << what;
    }
  }
  EXPECT_NO_THROW(muon.check_parameter(torch::zeros({3, 5}), "parameter 0 (group 0)"));
  EXPECT_NO_THROW(muon.check_parameter(torch::zeros({3, 5}, torch::kFloat64), "parameter 0 (group 0)"));
}

TEST(Muon, OptionsAreValidatedByName) {
  const auto expect_error = [](const MuonOpts& o, const std::string& option) {
    try {
      o.validate();
      ADD_FAILURE() << option << " accepted";
    } catch (const mep::OptionError& e) {
      EXPECT_NE(std::string(e.what()).find("option " + option + " ="), std::string::npos) << e.what();
    }
  };
  EXPECT_NO_THROW(MuonOpts().validate());
  expect_error(MuonOpts().momentum(1.0), "momentum");
  expect_error(MuonOpts().momentum(-0.1), "momentum");
  expect_error(MuonOpts().ns_steps(-1), "ns_steps");
  expect_error(MuonOpts().ns_steps(100), "ns_steps");
  expect_error(MuonOpts().ns_coefficients(static_cast<mep::NSCoefficients>(7)), "ns_coefficients");
  expect_error(MuonOpts().ns_scale(static_cast<mep::NSScale>(7)), "ns_scale");
  expect_error(MuonOpts().eps(0.0), "eps");
  expect_error(MuonOpts().eps(std::nan("")), "eps");
  EXPECT_NO_THROW(MuonOpts().ns_steps(99).momentum(0.0).validate());

  std::vector<std::string> names;
  MuonOpts().visit_options([&](const char* n, const auto&) { names.emplace_back(n); });
  EXPECT_EQ(names, (std::vector<std::string>{"momentum", "nesterov", "ns_steps", "ns_coefficients", "ns_scale", "eps",
                                             "ns_bfloat16", "conv_as_matrix"}));

  const MuonOpts defaults;
  const mep::MuonUpdate built(defaults), plain;
  for (const auto* u : {&built, &plain}) {
    EXPECT_EQ(u->momentum, 0.95);
    EXPECT_TRUE(u->nesterov);
    EXPECT_EQ(u->ns_steps, 5);
    EXPECT_EQ(u->ns_coefficients, mep::NSCoefficients::Quintic);
    EXPECT_EQ(u->ns_scale, mep::NSScale::Muon);
    EXPECT_EQ(u->eps, 1e-7);
    EXPECT_TRUE(u->ns_bfloat16);
    EXPECT_FALSE(u->conv_as_matrix);
  }
  static_assert(!mep::MuonUpdate::coupled_weight_decay && mep::MuonUpdate::owns_momentum);
}

TEST(Muon, SplitForMuonSendsMatricesToMuonAndTheRestToAdamW) {
  torch::nn::Sequential model(torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 4, 3)), torch::nn::Flatten(),
                              torch::nn::Linear(4 * 6 * 6, 32), torch::nn::LayerNorm(torch::nn::LayerNormOptions({32})),
                              torch::nn::Linear(32, 10));
  // Parameters: 0.weight [4,1,3,3], 0.bias, 2.weight [32,144], 2.bias, 3.weight, 3.bias, 4.weight [10,32], 4.bias.
  const auto params = model->parameters();
  auto s = mep::split_for_muon(params);
  ASSERT_EQ(s.matrices.size(), 2u);
  EXPECT_TRUE(s.matrices[0].is_same(params[2]));
  EXPECT_TRUE(s.matrices[1].is_same(params[6]));
  EXPECT_EQ(s.others.size(), 6u);
  EXPECT_TRUE(s.others[0].is_same(params[0]));  // the conv kernel, without conv_as_matrix
  EXPECT_TRUE(s.matrix_names.empty());

  auto c = mep::split_for_muon(params, /*conv_as_matrix=*/true);
  EXPECT_EQ(c.matrices.size(), 3u);
  EXPECT_EQ(c.others.size(), 5u);

  // Jordan's recipe: the first layer and the output layer to AdamW by name.
  auto named = mep::split_for_muon(model, /*conv_as_matrix=*/true, {"0.weight", "4.weight"});
  EXPECT_EQ(named.matrix_names, (std::vector<std::string>{"2.weight"}));
  EXPECT_EQ(named.other_names,
            (std::vector<std::string>{"0.weight", "0.bias", "2.bias", "3.weight", "3.bias", "4.weight", "4.bias"}));
  ASSERT_EQ(named.matrices.size(), 1u);
  EXPECT_TRUE(named.matrices[0].is_same(params[2]));
  EXPECT_THROW(mep::split_for_muon(*model, false, {"5.weight"}), std::invalid_argument);

  // Every split matrix passes the policy's check; every other parameter fails it.
  const mep::MuonUpdate muon(MuonOpts().conv_as_matrix(true));
  for (const auto& p : c.matrices) EXPECT_NO_THROW(muon.check_parameter(p, "a matrix"));
  for (const auto& p : c.others) EXPECT_THROW(muon.check_parameter(p, "another"), mep::OptionError);
}

namespace {
using MuonOptimizer = mep::Optimizer<mep::BackpropGradient, mep::MuonUpdate, mep::NoConstraint, mep::NoFeedback>;
}  // namespace

TEST(Muon, AsTheOptimizersUpdatePolicyItStepsAsTorch) {
  for (bool nesterov : {true, false})
    for (auto scale : {mep::NSScale::Muon, mep::NSScale::AdamW}) {
      SCOPED_TRACE(std::string(nesterov ? "nesterov" : "plain") + (scale == mep::NSScale::Muon ? " muon" : " adamw"));
      torch::manual_seed(21);
      std::vector<torch::Tensor> params = {torch::randn({24, 10}), torch::randn({10, 24})};
      std::vector<torch::Tensor> targets = {torch::randn({24, 10}), torch::randn({10, 24})};
      std::vector<torch::Tensor> refs = {params[0].clone(), params[1].clone()};
      std::vector<TorchMuonStep> torch_steps(2);
      for (auto& r : torch_steps) {
        r.nesterov = nesterov;
        r.adjust_lr_fn = scale == mep::NSScale::Muon ? "original" : "match_rms_adamw";
      }
      MuonOptimizer opt(params, MuonOptimizer::Options(0.02).weight_decay(0.1).nesterov(nesterov).ns_scale(scale));
      for (int t = 0; t < 20; ++t) {
        for (size_t i = 0; i < params.size(); ++i) {
          torch::manual_seed(300 + t * 2 + static_cast<int>(i));
          auto g = gradient_at(params[i], targets[i]);
          params[i].mutable_grad() = g.clone();
          torch_steps[i].step(refs[i], g);
        }
        opt.step();
        for (size_t i = 0; i < params.size(); ++i) {
          ASSERT_TRUE(torch::equal(params[i], refs[i])) << "parameter " << i << ", step " << t;
          ASSERT_TRUE(torch::equal(opt.state_of(params[i]).get("momentum_buffer"), torch_steps[i].momentum_buffer));
        }
      }
    }
}

TEST(Muon, TheOptimizerRefusesANonMatrixParameterNamingIt) {
  auto w = torch::randn({8, 4}), b = torch::zeros({8});
  try {
    MuonOptimizer opt(std::vector<torch::Tensor>{w, b}, MuonOptimizer::Options(0.02));
    FAIL() << "a bias was accepted";
  } catch (const mep::OptionError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("parameter 1 (group 0)"), std::string::npos) << what;
    EXPECT_NE(what.find("[8]"), std::string::npos) << what;
    EXPECT_NE(what.find("mep::AdamW"), std::string::npos) << what;
  }
  MuonOptimizer opt(std::vector<torch::Tensor>{w}, MuonOptimizer::Options(0.02));
  EXPECT_THROW(opt.add_param_group(torch::optim::OptimizerParamGroup({torch::zeros({3, 3, 2, 2})})), mep::OptionError);
  MuonOptimizer conv(std::vector<torch::Tensor>{torch::zeros({3, 3, 2, 2})}, MuonOptimizer::Options(0.02).conv_as_matrix(true));
  EXPECT_EQ(conv.param_groups().size(), 1u);
}


// ------------------------------------------------------------------ Fisher in a preset

namespace {

using mep_test::copy_parameters;
using mep_test::tiny;

TEST(EPOptim, NaturalEPMuonUpdatesDifferFromSMEPs) {
  torch::manual_seed(11);
  auto x = torch::randn({32, 20});
  auto y = torch::randint(0, 10, {32}, torch::kLong);
  auto a = tiny(), b = tiny();
  copy_parameters(a, b);
  mep::SMEP smep(a, mep::SMEPOptions());
  mep::NaturalEPMuon natural(b, mep::NaturalEPMuonOptions());
  smep.step(x, y);
  natural.step(x, y);
  auto pa = a->parameters(), pb = b->parameters();
  EXPECT_GT((pa[0] - pb[0]).abs().max().item<double>(), 1e-6);  // weight matrices differ
  EXPECT_TRUE(torch::equal(pa[1], pb[1]));                       // biases: same EP gradient, same rule
  EXPECT_TRUE(natural.has_state(pb[0]) && natural.state_of(pb[0]).has("fisher"));
}

struct NSOnly : mep::NewtonSchulz::Options<NSOnly> {};
struct FisherOnly : mep::FisherNewtonSchulz::Options<FisherOnly> {};
struct MuonOnly : mep::MuonUpdate::Options<MuonOnly> {};
struct DionOnly : mep::Dion::Options<DionOnly> {};

TEST(NewtonSchulz, OneOutputScaleForEveryPolicy) {
  torch::manual_seed(12);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::None, 60, 20), 1.0);
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::Muon, 60, 20), std::sqrt(3.0));
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::Muon, 20, 60), 1.0);
  EXPECT_EQ(mep::ns_output_scale(mep::NSScale::AdamW, 20, 60), 0.2 * std::sqrt(60.0));
  for (auto scale : {mep::NSScale::None, mep::NSScale::Muon, mep::NSScale::AdamW}) {
    for (auto shape : {std::vector<int64_t>{30, 20}, std::vector<int64_t>{20, 30}}) {
      const auto g = torch::randn(shape, f64);
      const double s = mep::ns_output_scale(scale, shape[0], shape[1]);
      mep::ParamState a, b;
      // Newton-Schulz: s·NS(g).
      const auto plain = mep::newton_schulz(g, 5, mep::NSCoefficients::Cubic);
      const auto u = mep::NewtonSchulz(NSOnly().ns_scale(scale)).direction(g, a);
      EXPECT_TRUE(torch::equal(u, s == 1.0 ? plain : plain * s)) << scale;
      // Fisher: s times its unscaled direction.
      const auto unscaled = mep::FisherNewtonSchulz(FisherOnly()).direction(g, a);
      const auto scaled = mep::FisherNewtonSchulz(FisherOnly().ns_scale(scale)).direction(g, b);
      EXPECT_TRUE(torch::equal(scaled, s == 1.0 ? unscaled : unscaled * s)) << scale;
      // Muon: s is its learning-rate factor.
      EXPECT_EQ(mep::MuonUpdate(MuonOnly().ns_scale(scale)).lr_scale(g), s) << scale;
    }
  }

  // Dion's own update is scaled by Muon's rule whatever ns_scale: ‖u‖_F = s·√r (P orthonormal,
  // Q's columns of norm 1 − O(1e-8)).
  const mep::Dion dion(DionOnly().dion_thresh(0));
  EXPECT_EQ(mep::Dion::own_scale, mep::NSScale::Muon);
  for (auto shape : {std::vector<int64_t>{60, 20}, std::vector<int64_t>{20, 60}}) {
    mep::ParamState st;
    const auto u = dion.direction(torch::randn(shape, f64), st);
    const double r = static_cast<double>(dion.rank_for(shape[0], shape[1]));
    EXPECT_NEAR(u.norm().item<double>() / std::sqrt(r), mep::ns_output_scale(mep::NSScale::Muon, shape[0], shape[1]),
                1e-6);
  }
  // ...so a Dion update refuses any ns_scale but none, naming it.
  EXPECT_NO_THROW(DionOnly().validate());
  for (auto scale : {mep::NSScale::Muon, mep::NSScale::AdamW}) {
    try {
      mep::SDMEP opt(mep_test::small_mlp(), mep::SDMEPOptions().ns_scale(scale));
      ADD_FAILURE() << "no error for SDMEP with ns_scale " << scale;
    } catch (const mep::OptionError& e) {
      std::ostringstream shown;
      shown << "ns_scale = " << scale << " (expected none with Dion";
      EXPECT_NE(std::string(e.what()).find(shown.str()), std::string::npos) << e.what();
    }
  }
}

}  // namespace
