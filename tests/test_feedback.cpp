// Feedback policies: error feedback's recurrence, plain and projected.
#include <gtest/gtest.h>
#include <mep/mep.hpp>

namespace {

TEST(ErrorFeedback, FollowsItsRecurrence) {
  mep::ErrorFeedback ef;
  ef.enabled = true, ef.beta = 0.5, ef.max_grad_norm = 1.0;
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
  ef.projected = true;
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

}  // namespace
