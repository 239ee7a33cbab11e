// mep::MuonUpdate against a transcription of torch.optim.Muon's step (torch/optim/_muon.py,
// `_single_tensor_muon`, `_zeropower_via_newtonschulz` with use_addmm=False, `_adjust_lr`),
// the parameter checks, and split_for_muon.
#include <gtest/gtest.h>
#include <mep/gradient/backprop.hpp>
#include <mep/optimizer.hpp>
#include <mep/update/muon.hpp>

#include <cmath>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

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
