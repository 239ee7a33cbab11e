#pragma once
/// \file data_parallel.hpp
/// Data parallelism over a c10d process group (PyTorch's distributed engine: Gloo on CPU,
/// NCCL on CUDA). Each of the N ranks computes the gradient on its shard of the batch —
/// backprop, or EP settling, which is per sample — and the optimizer averages before
/// updating:
///
///   g ← (1/N)·Σ_r g_r          (one all-reduce of every gradient, flattened per dtype)
///
/// With equal shards of a batch B, the average of the shards' mean gradients is B's mean
/// gradient, so N ranks take the step one process takes on B (up to the summation order).
/// Everything after the average (momentum, Newton–Schulz, Dion, Fisher proxies, error
/// feedback, the spectral constraint) is a deterministic function of it and of state that
/// started identical, so the ranks' parameters stay bit-identical: the all-reduce hands every
/// rank the same sums. Parameters (and a model's buffers) are broadcast from rank 0 when the
/// optimizer is built; the spectral constraint's vectors and Dion's basis are seeded from
/// the weight shape.
///
/// A collective that fails — another rank died, or the process group's timeout passed —
/// throws std::runtime_error naming the rank and the collective, before any gradient or
/// parameter changes.

#if __has_include(<torch/csrc/distributed/c10d/ProcessGroup.hpp>)
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#define MEP_HAS_C10D 1
#else
#define MEP_HAS_C10D 0
#endif

#include <torch/torch.h>

#include <chrono>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mep {

#if MEP_HAS_C10D
/// A c10d process group, as optimizers take it (`options.process_group(group)`).
using ProcessGroupPtr = c10::intrusive_ptr<c10d::ProcessGroup>;
#else
// A LibTorch without c10d: no group can be given, and DataParallel is never active.
using ProcessGroupPtr = c10::intrusive_ptr<c10::intrusive_ptr_target>;
#endif

/// The collectives of data-parallel training over one process group. Without a group (or
/// with a group of one rank) every call leaves its tensors as they are.
class DataParallel {
 public:
  DataParallel() = default;
  explicit DataParallel(ProcessGroupPtr group) : group_(std::move(group)) {}

  bool active() const noexcept { return group_ && size() > 1; }
  int rank() const noexcept {
#if MEP_HAS_C10D
    return group_ ? group_->getRank() : 0;
#else
    return 0;
#endif
  }
  int size() const noexcept {
#if MEP_HAS_C10D
    return group_ ? group_->getSize() : 1;
#else
    return 1;
#endif
  }

  /// t ← (1/N)·Σ_r t_r for every tensor: one all-reduce per (dtype, device), through a
  /// flat buffer, so the tensors change only when it succeeds. `what` names them in errors.
  void average(const std::vector<torch::Tensor>& tensors, const char* what) {
    if (!active()) return;
    torch::NoGradGuard no_grad;
    std::map<std::pair<int, std::string>, std::vector<torch::Tensor>> buckets;
    for (const auto& t : tensors)
      if (t.defined() && t.numel() > 0) buckets[{static_cast<int>(t.scalar_type()), t.device().str()}].push_back(t);
    std::vector<std::pair<std::vector<torch::Tensor>*, torch::Tensor>> reduced;
    for (auto& [key, ts] : buckets) {
      std::vector<torch::Tensor> flat;
      for (const auto& t : ts) flat.push_back(t.reshape({-1}));
      std::vector<torch::Tensor> buffer = {torch::cat(flat)};
      run("all-reduce of the " + std::string(what), buffer, [&](std::vector<torch::Tensor>& b) {
#if MEP_HAS_C10D
        return group_->allreduce(b);
#else
        (void)b;
#endif
      });
      reduced.emplace_back(&ts, buffer[0].div_(size()));
    }
    for (auto& [ts, buffer] : reduced) {
      int64_t offset = 0;
      for (auto& t : *ts) {
        t.copy_(buffer.narrow(0, offset, t.numel()).view(t.sizes()));
        offset += t.numel();
      }
    }
  }

  /// Before an update: averages the gradients over the ranks, with `buffers` (a model's
  /// floating-point buffers, which the step's forward changed) and `*loss` (replaced by the
  /// ranks' mean). `averages_itself(g)` picks the gradients the update averages itself
  /// (Dion's factors): they stay local, and the sum of their sums is averaged with the rest,
  /// so that a non-finite one on any rank is seen by every rank. Returns that average, or an
  /// undefined tensor when there are none.
  template <class AveragesItself>
  torch::Tensor average_gradients(const std::vector<torch::Tensor>& grads, const std::vector<torch::Tensor>& buffers,
                                  torch::Tensor* loss, AveragesItself&& averages_itself) {
    if (!active()) return torch::Tensor();
    std::vector<torch::Tensor> shared, local;
    for (const auto& g : grads) (averages_itself(g) ? local : shared).push_back(g);
    for (const auto& b : buffers)
      if (b.is_floating_point()) shared.push_back(b);
    if (loss && loss->defined()) shared.push_back(*loss = loss->detach().clone());
    torch::Tensor local_sum;
    if (!local.empty()) {
      std::vector<torch::Tensor> sums;
      for (const auto& g : local) sums.push_back(g.sum());
      shared.push_back(local_sum = torch::stack(sums).sum());
    }
    average(shared, "gradients");
    return local_sum;
  }

  /// Every tensor ← rank 0's (one broadcast per tensor).
  void broadcast(const std::vector<torch::Tensor>& tensors, const char* what) {
    if (!active()) return;
    torch::NoGradGuard no_grad;
    for (const auto& t : tensors) {
      if (!t.defined() || t.numel() == 0) continue;
      std::vector<torch::Tensor> buffer = {t.is_contiguous() ? t.detach() : t.contiguous()};
      run("broadcast of the " + std::string(what) + " from rank 0", buffer, [&](std::vector<torch::Tensor>& b) {
#if MEP_HAS_C10D
        return group_->broadcast(b);
#else
        (void)b;
#endif
      });
      if (!buffer[0].is_same(t)) t.detach().copy_(buffer[0]);
    }
  }

  /// Bytes this rank has handed to collectives so far (the payloads: a ring all-reduce
  /// moves about 2·(N − 1)/N times this over each rank's link).
  int64_t bytes() const noexcept { return bytes_; }
  /// Collectives run so far.
  int64_t collectives() const noexcept { return collectives_; }
  /// Seconds spent in them so far (waiting for the other ranks included).
  double seconds() const noexcept { return seconds_; }

 private:
  template <class Call>
  void run(const std::string& what, std::vector<torch::Tensor>& buffer, Call&& call) {
    for (const auto& t : buffer) bytes_ += t.numel() * static_cast<int64_t>(t.element_size());
    ++collectives_;
#if MEP_HAS_C10D
    const auto start = std::chrono::steady_clock::now();
    try {
      call(buffer)->wait();
      seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    } catch (const std::exception& e) {
      std::ostringstream os;
      os << "mep: rank " << rank() << " of " << size() << ": the " << what
         << " failed (another rank stopped, or the process group's timeout passed): " << first_line(e.what());
      throw std::runtime_error(os.str());
    }
#else
    (void)call;
#endif
  }
  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

  ProcessGroupPtr group_;
  int64_t bytes_ = 0, collectives_ = 0;
  double seconds_ = 0;
};

}  // namespace mep
