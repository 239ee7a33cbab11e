#pragma once
/// \file transaction.hpp
/// A step that updates every parameter or none, at a bounded number of multi-tensor
/// operations whatever the number of tensors.
///
/// `Transaction` saves the tensors a step will write (parameters, their optimizer state,
/// BatchNorm's statistics) into one flat buffer per dtype and device:
///
///   begin:     S ← T                     (one `cat_out` a buffer; 2 ops for strided tensors)
///   rollback:  T ← S                     (a copy per tensor: the host decided, on the failure path)
///   select:    T ← ok ? T : S            (4 ops a buffer; the device decides, nothing is read)
///
/// `select` stages T into a second flat buffer, takes `where(ok, T, S)` there (NaN-safe: a
/// multiply by a 0/1 flag would keep a NaN) and writes the result back (`_foreach_zero_`,
/// `_foreach_add_`: LibTorch 1.13 has no multi-tensor copy). It is the skip of PyTorch's
/// fused optimizers under AMP's `found_inf`, composed from operations LibTorch 1.13 has.
///
/// `FiniteSum` sums what the step must leave finite in one device scalar, Σ‖t‖₂: finite
/// exactly when every entry is (or when a square overflows, which a caller tells apart on
/// the failure path by checking tensor by tensor). 4 ops whatever the number of tensors.
/// (‖·‖₂: `_foreach_norm`'s fast kernel on CUDA and, on the CPU, 4× faster than its ‖·‖₁.)
///
/// The views into the flat buffers, and the flat views of the tensors that `cat_out` reads,
/// are made once and kept while the list of tensors is the same (the same tensors, storage,
/// shapes and dtypes), so that a steady-state step creates none.

#include <torch/torch.h>

#include <algorithm>
#include <cstddef>
#include <tuple>
#include <utility>
#include <vector>

namespace mep {

class Transaction {
 public:
  /// Saves `tensors` (undefined and empty ones are skipped).
  void begin(const std::vector<torch::Tensor>& tensors) {
    if (!same_list(tensors)) build(tensors);
    for (auto& b : buckets_) stage(b, b.saved, b.saved_views);
    open_ = true;
  }

  /// Puts every saved tensor back as `begin` found it.
  void rollback() {
    if (!open_) return;
    for (auto& b : buckets_)  // the failure path: a copy per tensor, exact (−0 stays −0)
      for (size_t i = 0; i < b.tensors.size(); ++i) b.tensors[i].copy_(b.saved_views[i]);
    open_ = false;
  }

  /// Keeps the step's values where `ok` (a bool scalar on the tensors' device) is true and
  /// puts the saved ones back otherwise, without reading `ok` on the host.
  void select(const torch::Tensor& ok) {
    if (!open_) return;
    for (auto& b : buckets_) {
      if (!b.current.defined()) {
        b.current = torch::empty_like(b.saved);
        b.current_views = views_of(b.current, b.tensors);
      }
      stage(b, b.current, b.current_views);
      at::where_out(b.current, ok.to(b.current.device()), b.current, b.saved);
      at::_foreach_zero_(b.tensors);
      at::_foreach_add_(b.tensors, b.current_views);
    }
    open_ = false;
  }

  /// Ends the transaction, keeping the step's values.
  void commit() { open_ = false; }

 private:
  struct Bucket {
    torch::Tensor saved, current;
    std::vector<torch::Tensor> tensors;
    std::vector<torch::Tensor> flat_tensors;  // tensors[i].view(-1), made once: the sources of cat_out
    bool contiguous = true;                   // false: a bucket of strided tensors, which have no flat view
    std::vector<torch::Tensor> saved_views, current_views;
  };
  using Key = std::tuple<c10::TensorImpl*, const void*, std::vector<int64_t>, c10::ScalarType, c10::Device>;

  static Key key_of(const torch::Tensor& t) {
    return {t.unsafeGetTensorImpl(), t.data_ptr(), t.sizes().vec(), t.scalar_type(), t.device()};
  }

  bool same_list(const std::vector<torch::Tensor>& tensors) const {
    size_t i = 0;
    for (const auto& t : tensors) {
      if (!t.defined() || t.numel() == 0) continue;
      if (i >= keys_.size() || keys_[i] != key_of(t)) return false;
      ++i;
    }
    return i == keys_.size();
  }

  // flat ← the bucket's tensors: one cat_out, or for strided tensors a zero and an add.
  static void stage(Bucket& b, torch::Tensor& flat, const std::vector<torch::Tensor>& views) {
    if (b.contiguous) {
      at::cat_out(flat, b.flat_tensors);
    } else {
      at::_foreach_zero_(views);
      at::_foreach_add_(views, b.tensors);
    }
  }

  static std::vector<torch::Tensor> views_of(const torch::Tensor& flat, const std::vector<torch::Tensor>& like) {
    std::vector<torch::Tensor> views;
    int64_t at = 0;
    for (const auto& t : like) {
      views.push_back(flat.narrow(0, at, t.numel()).view(t.sizes()));
      at += t.numel();
    }
    return views;
  }

  void build(const std::vector<torch::Tensor>& tensors) {
    keys_.clear();
    buckets_.clear();
    std::vector<std::tuple<c10::ScalarType, c10::Device, bool>> kinds;  // one bucket each, in first-seen order
    for (const auto& t : tensors) {
      if (!t.defined() || t.numel() == 0) continue;
      keys_.push_back(key_of(t));
      const auto kind = std::make_tuple(t.scalar_type(), t.device(), t.is_contiguous());
      const auto at = std::find(kinds.begin(), kinds.end(), kind) - kinds.begin();
      if (at == static_cast<std::ptrdiff_t>(kinds.size())) kinds.push_back(kind), buckets_.emplace_back();
      buckets_[at].tensors.push_back(t);
      buckets_[at].contiguous = std::get<2>(kind);
    }
    for (auto& b : buckets_) {
      int64_t n = 0;
      for (const auto& t : b.tensors) n += t.numel();
      b.saved = torch::empty({n}, b.tensors.front().options());
      b.saved_views = views_of(b.saved, b.tensors);
      if (b.contiguous)
        for (const auto& t : b.tensors) b.flat_tensors.push_back(t.view(-1));
    }
  }

  std::vector<Key> keys_;
  std::vector<Bucket> buckets_;
  bool open_ = false;
};

/// Σ‖t‖₂ over a list of floating-point tensors, as one scalar on their device, in 4
/// operations whatever the number of tensors (see the file's comment).
class FiniteSum {
 public:
  torch::Tensor sum_of_norms(const std::vector<torch::Tensor>& tensors) {
    if (tensors.empty()) return torch::Tensor();
    const auto& first = tensors.front();
    if (slots_.size() != tensors.size() || sums_.device() != first.device() || sums_.scalar_type() != first.scalar_type()) {
      sums_ = torch::empty({static_cast<int64_t>(tensors.size())}, first.options());
      slots_ = sums_.unbind();
    }
    auto norms = at::_foreach_norm(tensors, 2);
    for (auto& n : norms)
      if (n.device() != sums_.device()) n = n.to(sums_.device());  // a model across devices: rare
    at::_foreach_zero_(slots_);
    at::_foreach_add_(slots_, norms);
    return sums_.sum();
  }

 private:
  torch::Tensor sums_;
  std::vector<torch::Tensor> slots_;
};

}  // namespace mep
