// Feedback policies: error feedback's recurrence, plain and projected.
#include <gtest/gtest.h>
#include <mep/mep.hpp>

#include "support.hpp"

#include <algorithm>
#include <string>

namespace {

TEST(ErrorFeedback, FollowsItsRecurrence) {
  mep::ErrorFeedback ef;
  ef.enabled = true, ef.beta = 0.5, ef.max_grad_norm = 1.0, ef.rule = mep::ErrorRule::Reference;
  mep::ParamState st;
  auto g = torch::tensor({0.3, -0.2, 0.1}, torch::kFloat64);
  EXPECT_TRUE(torch::equal(ef.accumulate(g, st), g));  // no buffer yet
  auto u = torch::tensor({1.0, 0.0, -5.0}, torch::kFloat64);
  ef.remember(g, u, st);
  auto e1 = (g - u).clamp(-2.0, 2.0);  // β·0 + (g_aug − u), clamped to ±2·max_grad_norm
  EXPECT_TRUE(torch::allclose(st.get("error_feedback"), e1));
  auto g_aug = ef.accumulate(g, st);
  EXPECT_TRUE(torch::allclose(g_aug, g + 0.5 * e1));
  // The reference rule counts the buffer twice: with a constant g and u it grows like
  // (2β)^t; at β = 0.5 that is linear growth, e_t = t·(g − u) + ..., here checked for t = 2.
  ef.remember(g_aug, u, st);
  EXPECT_TRUE(torch::allclose(st.get("error_feedback"), (0.5 * e1 + g_aug - u).clamp(-2.0, 2.0)));
  // Projected: e ← g_aug − (⟨g_aug,u⟩/‖u‖²)·u, what u's direction dropped (no second β·e).
  ef.rule = mep::ErrorRule::Projected;
  mep::ParamState sp;
  sp.set("error_feedback", torch::full({3}, 0.4, torch::kFloat64));
  auto ga = ef.accumulate(g, sp);
  ef.remember(ga, u, sp);
  auto r = ga - ((ga * u).sum() / (u * u).sum()) * u;
  EXPECT_TRUE(torch::allclose(sp.get("error_feedback"), r));
  EXPECT_NEAR((sp.get("error_feedback") * u).sum().item<double>(), 0.0, 1e-12);  // orthogonal to u
  ef.enabled = false;
  mep::ParamState off;
  ef.remember(g, u, off);
  EXPECT_FALSE(off.has("error_feedback"));
}

TEST(ErrorFeedback, DefaultRuleIsProjectedAndReferenceKeepsTheReferenceRule) {
  EXPECT_EQ(mep::ErrorFeedback().rule, mep::ErrorRule::Projected);
  EXPECT_FALSE(mep::ErrorFeedback().enabled);
  EXPECT_EQ(mep::SMEPOptions().error_rule(), mep::ErrorRule::Projected);
  EXPECT_FALSE(mep::SMEPOptions().error_feedback());
  EXPECT_EQ(mep::SDMEPOptions().error_rule(), mep::ErrorRule::Projected);
  EXPECT_EQ(mep::reference::SMEPOptions().error_rule(), mep::ErrorRule::Projected);

  // By name, as mep_bench records and sets it.
  auto o = mep::SMEPOptions().error_feedback(true);
  const auto texts = o.texts();
  EXPECT_NE(std::find(texts.begin(), texts.end(), std::make_pair(std::string("error_rule"), std::string("projected"))),
            texts.end());
  EXPECT_TRUE(o.set("error_rule", "reference"));
  EXPECT_EQ(o.error_rule(), mep::ErrorRule::Reference);
  try {
    o.set("error_rule", "doubled");
    ADD_FAILURE() << "no error for error_rule = doubled";
  } catch (const mep::OptionError& e) {
    EXPECT_NE(std::string(e.what()).find("one of projected, reference"), std::string::npos) << e.what();
  }

  // The policies built from the options follow each rule's recurrence, from a buffer e₀.
  const auto g = torch::tensor({0.3, -0.2, 0.1}, torch::kFloat64);
  const auto u = torch::tensor({1.0, 0.0, -5.0}, torch::kFloat64);
  const auto e0 = torch::tensor({0.4, -0.1, 0.2}, torch::kFloat64);
  auto follow = [&](const mep::ErrorFeedback& ef) {
    mep::ParamState st;
    st.set("error_feedback", e0.clone());
    auto g_aug = ef.accumulate(g, st);
    EXPECT_TRUE(torch::allclose(g_aug, g + 0.9 * e0));
    ef.remember(g_aug, u, st);
    return std::make_pair(g_aug, st.get("error_feedback").clone());
  };
  const auto [ga, projected] = follow(mep::ErrorFeedback(mep::SMEPOptions().error_feedback(true)));
  EXPECT_TRUE(torch::allclose(projected, ga - ((ga * u).sum() / (u * u).sum()) * u));
  const auto [gr, reference] =
      follow(mep::ErrorFeedback(mep::SMEPOptions().error_feedback(true).error_rule(mep::ErrorRule::Reference)));
  EXPECT_TRUE(torch::allclose(reference, (0.9 * e0 + gr - u).clamp(-20.0, 20.0)));  // β_ef·e counted twice

  // Whole optimizers: the default is the projected rule, bit for bit; the reference rule differs.
  auto train = [](const mep::SMEPOptions& options) {
    torch::manual_seed(3);
    auto model = mep_test::small_mlp();
    mep::SMEP opt(model, options);
    auto x = torch::randn({8, 20});
    auto y = torch::randint(0, 10, {8}, torch::kLong);
    for (int step = 0; step < 3; ++step) opt.step(x, y);
    return model->parameters();
  };
  const auto by_default = train(mep::SMEPOptions().error_feedback(true));
  const auto projected_params = train(mep::SMEPOptions().error_feedback(true).error_rule(mep::ErrorRule::Projected));
  const auto reference_params = train(mep::SMEPOptions().error_feedback(true).error_rule(mep::ErrorRule::Reference));
  EXPECT_EQ(mep_test::max_abs_diff(by_default, projected_params), 0.0);
  EXPECT_GT(mep_test::max_abs_diff(by_default, reference_params), 0.0);
}

}  // namespace
