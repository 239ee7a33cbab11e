#pragma once
/// \file op_count.hpp
/// Counts the ATen operators a piece of code runs, through ATen's RecordFunction callbacks
/// (`at::addGlobalCallback`). Two numbers:
///  - leaf ops: operators that call no other operator, views included. A `_foreach_*`
///    operator counts as one and its children are not counted. On a GPU each leaf op that is
///    not a view is (about) one kernel launch.
///  - syncs: the operators that read a tensor's value on the host (`aten::_local_scalar_dense`,
///    `is_nonzero`, `equal`, `nonzero`, `allclose`), counted wherever they occur. On a GPU
///    each one blocks the host until the device has finished. Reads through `.to(kCPU)` or
///    `data_ptr` are not operators of this kind and are not seen.

#include <ATen/record_function.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace mep_bench {

struct OpCount {
  int64_t leaf = 0;
  int64_t syncs = 0;
  std::map<std::string, int64_t> by_name;  ///< leaf ops, and the syncs, by operator name
};

namespace detail {
struct Frame {
  bool has_child = false;
  bool foreach_op = false;
  bool inside_foreach = false;
};
inline std::mutex& count_mutex() {
  static std::mutex m;
  return m;
}
inline OpCount*& active_count() {
  static OpCount* c = nullptr;
  return c;
}
inline std::vector<Frame>& frames() {
  thread_local std::vector<Frame> f;
  return f;
}
inline bool is_sync(const char* name) {
  static const char* const names[] = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal",
                                      "aten::nonzero", "aten::allclose"};
  for (const char* n : names)
    if (std::strcmp(name, n) == 0) return true;
  return false;
}
inline std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  auto& f = frames();
  const bool inside = !f.empty() && (f.back().foreach_op || f.back().inside_foreach);
  if (!f.empty()) f.back().has_child = true;
  Frame frame;
  frame.inside_foreach = inside;
  frame.foreach_op = std::strncmp(fn.name(), "aten::_foreach_", 15) == 0;
  f.push_back(frame);
  return nullptr;
}
inline void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  auto& f = frames();
  if (f.empty()) return;
  const Frame frame = f.back();
  f.pop_back();
  std::lock_guard<std::mutex> lock(count_mutex());
  OpCount* c = active_count();
  if (c == nullptr) return;
  const bool sync = is_sync(fn.name());
  const bool leaf = !frame.inside_foreach && (frame.foreach_op || !frame.has_child);
  if (sync) ++c->syncs;
  if (leaf) ++c->leaf;
  if (sync || leaf) ++c->by_name[fn.name()];
}
}  // namespace detail

/// The operators `fn()` runs on any thread, counted as above.
template <class Fn>
OpCount count_ops(Fn&& fn) {
  OpCount count;
  {
    std::lock_guard<std::mutex> lock(detail::count_mutex());
    detail::active_count() = &count;
  }
  auto handle = at::addGlobalCallback(
      at::RecordFunctionCallback(&detail::on_start, &detail::on_end).scopes({at::RecordScope::FUNCTION}));
  try {
    fn();
  } catch (...) {
    at::removeCallback(handle);
    std::lock_guard<std::mutex> lock(detail::count_mutex());
    detail::active_count() = nullptr;
    throw;
  }
  at::removeCallback(handle);
  std::lock_guard<std::mutex> lock(detail::count_mutex());
  detail::active_count() = nullptr;
  return count;
}

}  // namespace mep_bench
