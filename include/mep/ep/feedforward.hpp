#pragma once
/// \file feedforward.hpp
/// The feedforward pass that starts every EP step: x through the chain, segment by segment,
///
///   f_1 = f_1(a_0(x)),   f_l = f_l(a_{l−1}(f_{l−1})),   ŷ = post(f_L),
///
/// into the workspace (ep/workspace.hpp), which it allocates when the batch shape, dtype or
/// device changes and reuses otherwise. It freezes BatchNorm's statistics for the step
/// (ep/batch_norm.hpp); `commit_statistics` advances the running statistics once the step has
/// succeeded, and `undo_statistics` takes that back. At the feedforward states every error
/// ε_l is 0.

#include <mep/ep/chain.hpp>
#include <mep/ep/workspace.hpp>

#include <torch/torch.h>

namespace mep {

/// Whether `ws` is allocated for `chain` and a batch shaped and typed like `x`.
inline bool fits(const Workspace& ws, const Chain& chain, const torch::Tensor& x) {
  return ws.chain == &chain && !ws.tape.empty() && ws.tape.size() == chain.size() &&
         x.sizes() == c10::IntArrayRef(ws.shape) && x.options().type_equal(ws.options);
}

namespace detail {

// An op at its feedforward input: its statistics frozen, and its input kept when a module
// run through its forward has buffers to commit.
inline torch::Tensor feedforward_op(const Op& op, const torch::Tensor& in, OpTape& t) {
  if (const auto* bn = op.as<BatchNorm>()) bn->freeze(in, t.norm);
  const auto* m = op.as<ops::ModuleOp>();
  t.ff_in = m != nullptr && m->call.stateful ? in.clone() : torch::Tensor();
  return op.forward(in, t);
}

inline void run_feedforward(Workspace& ws, const Chain& chain, const Nudging& nudging, const torch::Tensor& x,
                            bool analytic) {
  torch::NoGradGuard no_grad;
  const bool fresh = !fits(ws, chain, x);
  ws.chain = &chain;
  ws.nudging = nudging;
  ws.analytic = analytic;
  const size_t L = chain.size();
  if (fresh) {
    ws.shape = x.sizes().vec();
    ws.options = x.options();
    ws.tape.assign(L, {});
    ws.s.assign(L, {}), ws.ff.assign(L, {}), ws.dE_ds.assign(L, {});
    ws.scratch = Scratch();
  }
  torch::Tensor h = x;
  for (size_t l = 0; l < L; ++l) {
    const Segment& seg = chain.segments[l];
    SegmentTape& t = ws.tape[l];
    if (fresh) seg.prepare(h, t);
    const torch::Tensor state = h;  // s_{l−1}
    for (size_t j = 0; j < seg.pre.size(); ++j) h = feedforward_op(seg.pre[j], h, t.ops[j]);
    t.in = h;
    t.ff_in = seg.kind == LayerKind::Module && seg.block.stateful ? h.clone() : torch::Tensor();
    if (l > 0 && (!analytic || !seg.analytic())) {
      seg.forward(state, t, true);  // the graph of the first sweep's VJP
    } else {
      t.leaf = t.graph = torch::Tensor();
      seg.layer_into(h, t);
    }
    if (fresh) {
      ws.ff[l] = torch::empty_like(t.pred, torch::MemoryFormat::Contiguous);
      ws.s[l] = torch::empty_like(ws.ff[l]);
      ws.dE_ds[l] = torch::empty_like(ws.ff[l]);
      if (l > 0) t.back = torch::Tensor();
    }
    ws.ff[l].copy_(t.pred);
    h = ws.ff[l];
  }
  if (fresh) ws.post_tape.assign(chain.post.size(), {});
  for (size_t j = 0; j < chain.post.size(); ++j) {
    if (fresh) chain.post[j].prepare(h, ws.post_tape[j]);
    h = feedforward_op(chain.post[j], h, ws.post_tape[j]);
  }
  ws.output = chain.post.empty() ? ws.ff[L - 1] : h.clone();
  if (fresh) {
    const auto states = ws.ff[0].options();  // x's, unless the first layer reads integer input
    auto& e = ws.sums;
    e.rows = torch::empty({x.size(0)}, states);
    e.row = torch::empty({x.size(0)}, states);
    e.total = torch::empty({}, states);
    e.diff = torch::empty_like(ws.output);
    e.dcost = torch::empty_like(ws.output);
    e.sq.clear(), e.sq_rows.clear();
    for (size_t l = 0; l < L; ++l) {
      e.sq.push_back(torch::empty_like(ws.ff[l]));
      e.sq_rows.push_back(e.sq.back().view({x.size(0), -1}));
    }
    e.sq_out = torch::empty_like(ws.output, torch::MemoryFormat::Contiguous);
    e.sq_out_rows = e.sq_out.view({x.size(0), -1});
    e.zeros = torch::zeros({x.size(0)}, states);
    const auto L64 = static_cast<int64_t>(L);
    e.partial = torch::empty({2, L64}, states);
    e.partial_d = torch::empty({2, L64}, states.dtype(torch::kDouble));
    e.partial_slots.clear(), e.partial_cols.clear();
    for (int64_t q = 0; q < 2; ++q)
      for (int64_t l = 0; l < L64; ++l) e.partial_slots.push_back(e.partial.select(0, q).select(0, l));
    for (int64_t l = 0; l < L64; ++l) e.partial_cols.push_back(e.partial_d.select(1, l));
  }
  ws.target = torch::Tensor();
  ws.at_feedforward = true;
}

}  // namespace detail

/// Runs the feedforward pass of `x` through `chain` into `ws`; on failure `ws` is emptied, so
/// that a half-built workspace is never reused.
inline void feedforward(Workspace& ws, const Chain& chain, const Nudging& nudging, const torch::Tensor& x,
                        bool analytic) {
  try {
    detail::run_feedforward(ws, chain, nudging, x, analytic);
  } catch (...) {
    ws = Workspace();
    throw;
  }
}

namespace detail {
// Calls f(op, tape) for every op of the chain, and g(segment, tape) for every segment.
template <class F, class G>
void for_each_statistic(Workspace& ws, F&& f, G&& g) {
  const Chain& chain = *ws.chain;
  for (size_t l = 0; l < chain.size(); ++l) {
    for (size_t j = 0; j < chain.segments[l].pre.size(); ++j) f(chain.segments[l].pre[j], ws.tape[l].ops[j]);
    g(chain.segments[l], ws.tape[l]);
  }
  for (size_t j = 0; j < chain.post.size(); ++j) f(chain.post[j], ws.post_tape[j]);
}
}  // namespace detail

/// Advances BatchNorm's running statistics with the batch statistics the last feedforward
/// froze in train mode, and the buffers of a module run through its forward (in train mode)
/// by one forward at its feedforward input, as one forward pass of the model would.
inline void commit_statistics(Workspace& ws) {
  torch::NoGradGuard no_grad;
  detail::for_each_statistic(
      ws,
      [](const Op& op, OpTape& t) {
        if (const auto* m = op.as<ops::ModuleOp>()) m->call.commit(t.ff_in, t.norm.saved_running);
        if (const auto* bn = op.as<BatchNorm>()) bn->commit(t.norm);
      },
      [](const Segment& seg, SegmentTape& t) {
        if (seg.kind == LayerKind::Module) seg.block.commit(t.ff_in, t.saved_buffers);
      });
}

/// Puts those statistics and buffers back as they were before the last `commit_statistics`.
inline void undo_statistics(Workspace& ws) {
  torch::NoGradGuard no_grad;
  detail::for_each_statistic(
      ws,
      [](const Op& op, OpTape& t) {
        if (const auto* m = op.as<ops::ModuleOp>()) m->call.undo(t.norm.saved_running);
        if (const auto* bn = op.as<BatchNorm>()) bn->undo(t.norm);
      },
      [](const Segment& seg, SegmentTape& t) {
        if (seg.kind == LayerKind::Module) seg.block.undo(t.saved_buffers);
      });
}

}  // namespace mep
