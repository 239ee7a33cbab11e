#pragma once
/// \file cuda_graph.hpp
/// `mep::CudaGraphStep<Opt>`: one whole EP training step — feedforward, settling, EP
/// gradients, update, constraint — captured once into a CUDA graph and replayed, so that a
/// step costs one graph launch instead of hundreds of kernel launches.
///
/// STATUS: written against LibTorch 2.x's `ATen/cuda/CUDAGraph.h` and NOT YET RUN: the
/// machine it was written on has no GPU and a CPU-only LibTorch, so this file has never
/// been compiled against CUDA headers nor executed. tests/test_cuda_graph.cpp holds the
/// checks a GPU machine runs (scripts/maintainer/cuda_check.sh). Until they pass, treat it as a draft.
///
///   mep::SMEP opt(model, mep::SMEPOptions(0.01));        // model on a CUDA device
///   mep::CudaGraphStep<mep::SMEP> graphed(opt);          // refuses what cannot be captured
///   for (auto& [x, y] : batches) {
///     torch::Tensor loss = graphed.step(x, y);           // overwritten by the next step: clone to keep
///   }
///
/// Only with a CUDA LibTorch: mep.hpp includes this header when MEP_WITH_CUDA is defined
/// (CMake defines it for the tests and mep_bench when it finds one).
///
/// How a call runs. The wrapper keeps static input and target buffers on the model's device
/// (fixed shape, dtype), copies each batch into them (`copy_`, non_blocking, on the current
/// stream) and then either
///  - warms up: runs the optimizer's ordinary `step` on the static buffers, on a side stream
///    (`c10::cuda::getStreamFromPool`), as PyTorch's CUDA graph documentation prescribes
///    before a capture: lazily created state (momentum, spectral vectors, Dion's basis, the
///    gradient's workspace for this batch shape, cuBLAS handles) comes into being outside the
///    capture, and the branch a capture records is the steady-state one (a capture taken on a
///    step that creates the momentum buffer would record "m = u" for every replay). The
///    first capture is preceded by `warmup_steps` (3) such steps, every later one by
///    `rewarmup_steps` (1). Each warm-up step IS the call's training step (its loss is
///    returned): a call never runs more or less than one step;
///  - captures: `CUDAGraph::capture_begin()`, `opt.step(static_x, static_y)`,
///    `capture_end()` on the side stream, then one `replay()` on the current stream, which
///    performs the call's step;
///  - or replays the graph on the current stream.
/// The returned loss is then the graph's static output: the same tensor every replay,
/// overwritten by the next one — `clone()` it to keep it.
///
/// When it captures again. A capture bakes in the addresses of every tensor the step
/// touches and every host scalar the step computed. Each call builds, on the host and
/// without any device synchronisation, a key of
///  - the batch's and the target's shape, dtype and device;
///  - every parameter group's options, read as numbers through the options' own
///    `visit_group_options` (lr, momentum, dampening, nesterov, weight_decay: what a
///    scheduler, mep_bench's --lr-schedule or a user may change between steps), compared
///    value by value (the approach taken: no text, no allocation beyond a reused vector;
///    `policy_texts()` is not compared because the policies copy their options when the
///    optimizer is built and never read them again, and a group may not set them);
///  - the addresses of the tensors carried from step to step: each parameter's storage,
///    its optimizer-state buffers (a `torch::load` of the optimizer, or a new buffer, moves
///    them) and the model's buffers (BatchNorm's running statistics);
/// and captures again (after `rewarmup_steps` eager steps) when the key differs from the
/// captured one. With a learning rate that changes every step nothing is ever captured:
/// every call is an eager warm-up step (correct, but no faster). A batch shape that
/// alternates (an epoch's smaller last batch) costs an eager step and a capture each time.
///
/// What a capture refuses. The constructor throws OptionError, listing every reason, for an
/// optimizer whose step cannot be captured or would not replay as the eager step:
///  - an adaptive settling (`adaptive(true)`): it reads the energy on the host to accept or
///    undo a step, or takes data-dependent decisions the graph would freeze;
///  - `tol > 0`: early stopping reads the energy on the host, and the number of settling
///    steps would be frozen at the capture's;
///  - a model with modules the EP engine runs through autograd (`Chain::autograd_modules`,
///    named in the message) or `analytic(false)`: the autograd engine, the modules' own
///    forward() and their checks are not known to be capturable;
///  - `mode(mep::Mode::Backprop)`: the gradient is autograd's (as above);
///  - a process group: collectives and their host-side bookkeeping;
///  - an update policy that computes host scalars from the per-parameter step count
///    (`reads_step_count<Update>`: Adam's bias corrections 1 − βᵗ; AdamUpdate and what
///    derives from it) — the capture would freeze t.
/// Hence refused with their default options: `mep::reference::EqProp`, `SMEP`, `SDMEP`,
/// `NaturalEPMuon` (HeavyBall settling, adaptive, tol 1e-5) and `mep::reference::LocalEPMuon`
/// (tol 1e-4); `mep::with_settling_t<X, mep::HeavyBall>` at HeavyBall's defaults. Accepted
/// with their defaults: `mep::EqProp`, `SMEP`, `SDMEP`, `LocalEPMuon`, `NaturalEPMuon`
/// (LayerSweep: 2 sweeps, tol 0, not adaptive). The backprop family (SGD, Adam, AdamW, Muon
/// and their `reference::` versions) is not an EP optimizer: a compile-time error.
///
/// What else must hold, and is checked only when capturing: the step must not synchronise
/// with the host (`.item()`, a host read of the energy or a failure flag): a capture fails
/// at the first synchronisation, and the wrapper rethrows it as a std::runtime_error saying
/// so. On CUDA the optimizer's step reads nothing by default (`StepCheck::Deferred`, the
/// transaction undoing a failed step on the device); `StepCheck::Immediate` is refused. Also
/// refused at capture: a step that replaces (rather than writes in place) a parameter, an
/// optimizer-state buffer or a model buffer, since a replay would keep reading the old tensor.
///
/// What a replay does not do: nothing runs on the host, so host-side bookkeeping reflects
/// the capture: `settle_report()` is the capturing step's, and a replay raises no
/// exception: a replayed step that fails is undone on the device (the transaction's select is
/// part of the graph) but not reported; only the capturing step's flag reaches
/// `check_failures()`.
/// The per-parameter step counts (`ParamState::step`, saved in checkpoints) are advanced
/// by the wrapper after each replay, by what the captured step added. Random ops (Dropout)
/// draw fresh numbers at every replay (LibTorch's graph-safe Philox offsets), but not the
/// same numbers as an eager run would. The capture uses cudaStreamCaptureModeGlobal: no
/// other thread may use CUDA in ways a capture forbids while it runs.
///
/// The equality contract — a TEST, not a claim (tests/test_cuda_graph.cpp, run on a GPU by
/// scripts/maintainer/cuda_check.sh): for EqProp and SMEP on mlp_small in float32, 10 graphed steps
/// from the same initial parameters and batches as 10 eager steps leave every parameter
/// within 1e-5 relative (max |Δ| / max |W| per tensor) of the eager run's.

#if !defined(MEP_WITH_CUDA)
#error "mep/cuda_graph.hpp needs a CUDA build of LibTorch: define MEP_WITH_CUDA (CMake does when it finds one)"
#endif

#include <mep/ep/chain.hpp>
#include <mep/optimizer.hpp>
#include <mep/options.hpp>
#include <mep/update/adam.hpp>

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace mep {

/// Whether update policy `U` computes host scalars from the per-parameter step count
/// (`ParamState::step`), so that a CUDA graph would freeze them at the capture's value:
/// Adam's bias corrections. Specialise it (as std::true_type) for a policy of your own that
/// does.
template <class U>
struct reads_step_count : std::is_base_of<AdamUpdate, U> {};

/// Options of CudaGraphStep.
struct CudaGraphStepOptions {
  /// Eager steps on the side stream before the first capture (PyTorch's examples use 3).
  int64_t warmup_steps = 3;
  /// Eager steps before every later capture (a new batch shape, changed options).
  int64_t rewarmup_steps = 1;

  CudaGraphStepOptions& warmup(int64_t steps) {
    warmup_steps = steps;
    return *this;
  }
  CudaGraphStepOptions& rewarmup(int64_t steps) {
    rewarmup_steps = steps;
    return *this;
  }
  void validate() const {
    MEP_CHECK_OPTION(warmup_steps >= 1, "warmup_steps", warmup_steps,
                     "a value >= 1 (a capture must follow an eager step of the same shape)");
    MEP_CHECK_OPTION(rewarmup_steps >= 1, "rewarmup_steps", rewarmup_steps,
                     "a value >= 1 (a capture must follow an eager step of the same shape)");
  }
};

namespace detail {
template <class G, class = void>
struct is_ep_gradient : std::false_type {};
template <class G>
struct is_ep_gradient<G, std::void_t<typename G::SettlingPolicy>> : std::true_type {};

/// The preset's name for messages ("mep::SMEP"), or a generic one.
template <class Opt>
struct optimizer_name {
  static constexpr const char* value = "the optimizer";
};
template <class G, class U, class C, class F, class D>
struct optimizer_name<Optimizer<G, U, C, F, D>> {
  static constexpr const char* value = D::name;
};

/// What a capture depends on, read on the host (see the file's comment).
struct GraphKey {
  std::vector<int64_t> x_sizes, y_sizes;
  c10::ScalarType x_dtype = c10::ScalarType::Undefined, y_dtype = c10::ScalarType::Undefined;
  c10::Device x_device{c10::kCPU}, y_device{c10::kCPU};
  std::vector<double> group_options;  // every group's visit_group_options values, in order
  std::vector<const void*> storage;   // parameters, their state buffers, the model's buffers

  bool same_batch(const GraphKey& o) const {
    return x_sizes == o.x_sizes && y_sizes == o.y_sizes && x_dtype == o.x_dtype && y_dtype == o.y_dtype &&
           x_device == o.x_device && y_device == o.y_device;
  }
  bool operator==(const GraphKey& o) const {
    return same_batch(o) && group_options == o.group_options && storage == o.storage;
  }
  bool operator!=(const GraphKey& o) const { return !(*this == o); }
};
}  // namespace detail

/// The whole training step of an EP optimizer `Opt` (built from its model, on CUDA) as a
/// CUDA graph; see the file's comment for what it captures, when it captures again and
/// what it refuses. Holds a reference to the optimizer, which must outlive it. Not
/// thread-safe.
template <class Opt>
class CudaGraphStep {
  using Gradient = typename Opt::GradientPolicy;
  using Update = typename Opt::UpdatePolicy;
  using Options = typename Opt::Options;
  static_assert(detail::is_ep_gradient<Gradient>::value,
                "mep::CudaGraphStep captures the step(input, target) of an EP optimizer (EqProp, SMEP, SDMEP, "
                "LocalEPMuon, NaturalEPMuon or a composition with an EP gradient); a backprop optimizer's step is "
                "the user's own forward and backward");

 public:
  /// Checks that `opt`'s step can be captured (OptionError listing every reason otherwise),
  /// then that its model lives on one CUDA device (std::invalid_argument otherwise).
  explicit CudaGraphStep(Opt& opt, CudaGraphStepOptions options = {}) : opt_(opt), options_(options) {
    options_.validate();
    check_capturable(opt_);
    device_ = model_device(opt_);
    side_.emplace(c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index()));
  }

  CudaGraphStep(const CudaGraphStep&) = delete;
  CudaGraphStep& operator=(const CudaGraphStep&) = delete;

  /// Throws OptionError naming every reason why `opt`'s step cannot be captured; returns
  /// when there is none. Needs no GPU.
  static void check_capturable(Opt& opt) {
    std::vector<std::string> reasons;
    const Options& o = opt.options();
    const auto& settle = opt.gradient().settling().config;
    if (settle.adaptive)
      reasons.push_back("adaptive settling (adaptive = true) decides on the host, step by step; use adaptive(false)");
    if (settle.tol > 0) {
      std::ostringstream os;
      os << "tol = " << settle.tol << " stops settling early from host reads of the energy; use tol(0)";
      reasons.push_back(os.str());
    }
    if (o.mode() == Mode::Backprop) reasons.push_back("mode = backprop computes the gradient with autograd");
    if (!o.analytic()) reasons.push_back("analytic = false runs every segment through autograd");
    const Chain chain = Chain::from(opt.model());
    if (!chain.autograd_modules.empty()) {
      std::ostringstream os;
      os << "the EP engine runs " << chain.autograd_modules.size() << " module(s) of the model through autograd (";
      for (size_t i = 0; i < chain.autograd_modules.size(); ++i)
        os << (i ? ", " : "") << chain.autograd_modules[i]->name();
      os << ")";
      reasons.push_back(os.str());
    }
    if (o.process_group() || opt.data_parallel().active())
      reasons.push_back("a process group: collectives are not captured");
    if (o.step_check() == StepCheck::Immediate)
      reasons.push_back("step_check = immediate reads the step's check on the host; use StepCheck::Deferred (or Auto)");
    if (reads_step_count<Update>::value)
      reasons.push_back("the update computes host scalars from the step count (bias correction), which a graph "
                        "would freeze");
    if (reasons.empty()) return;
    std::string message = std::string("mep: CUDA graph capture of ") + detail::optimizer_name<Opt>::value + " refused: ";
    for (size_t i = 0; i < reasons.size(); ++i) message += (i ? "; " : "") + reasons[i];
    throw OptionError(message);
  }

  /// One training step on (x, y): the optimizer's `step(x, y)`, run eagerly, captured or
  /// replayed (see the file's comment). Returns the batch loss; after a capture or replay
  /// it is the graph's static output tensor, overwritten by the next step: clone() to keep.
  torch::Tensor step(const torch::Tensor& x, const torch::Tensor& y) {
    if (!x.defined() || !y.defined()) throw std::invalid_argument("mep: CudaGraphStep::step: undefined input or target");
    read_key(x, y, probe_);
    if (graph_ && probe_ == key_) {
      fill_static(x, y);
      replay();
      return static_loss_;
    }
    drop_graph();
    if (!pending_ || probe_ != pending_key_) {
      allocate_static(x, y);
      pending_key_ = probe_;
      pending_ = true;
      warm_done_ = 0;
    }
    fill_static(x, y);
    const int64_t needed = captures_ == 0 ? options_.warmup_steps : options_.rewarmup_steps;
    if (warm_done_ < needed) {
      auto loss = warm_up();
      ++warm_done_;
      read_key(x, y, pending_key_);  // what the step left (new state buffers): the next call compares with it
      return loss;
    }
    capture(x, y);
    pending_ = false;
    replay(/*after_capture=*/true);
    return static_loss_;
  }

  /// The optimizer this wrapper steps.
  Opt& optimizer() noexcept { return opt_; }
  /// Graphs captured so far (a new batch shape, changed options or moved tensors capture again).
  int64_t captures() const noexcept { return captures_; }
  /// Graph launches so far (one per captured step, the capturing call's included).
  int64_t replays() const noexcept { return replays_; }
  /// Eager (warm-up) steps so far.
  int64_t eager_steps() const noexcept { return eager_steps_; }
  /// Whether a captured graph is ready for the next call with the same key.
  bool has_graph() const noexcept { return graph_ != nullptr; }
  /// Drops the graph (and its memory pool): the next call warms up and captures again.
  void reset() {
    drop_graph();
    pending_ = false;
  }

 private:
  static c10::Device model_device(Opt& opt) {
    std::optional<c10::Device> device;
    for (const auto& group : opt.param_groups())
      for (const auto& p : group.params()) {
        if (!p.is_cuda())
          throw std::invalid_argument("mep: CudaGraphStep needs the model on a CUDA device; a parameter is on " +
                                      p.device().str());
        if (device && *device != p.device())
          throw std::invalid_argument("mep: CudaGraphStep needs the model on one CUDA device; it spans " +
                                      device->str() + " and " + p.device().str());
        device = p.device();
      }
    if (!device) throw std::invalid_argument("mep: CudaGraphStep: the optimizer has no parameters");
    return *device;
  }

  // The key of a call on (x, y), into `key` (its vectors' capacity reused).
  void read_key(const torch::Tensor& x, const torch::Tensor& y, detail::GraphKey& key) {
    key.x_sizes.assign(x.sizes().begin(), x.sizes().end());
    key.y_sizes.assign(y.sizes().begin(), y.sizes().end());
    key.x_dtype = x.scalar_type(), key.y_dtype = y.scalar_type();
    key.x_device = x.device(), key.y_device = y.device();
    key.group_options.clear();
    key.storage.clear();
    for (auto& group : opt_.param_groups()) {
      const auto* o = dynamic_cast<const Options*>(&group.options());
      if (o == nullptr) throw std::logic_error("mep: CudaGraphStep: a parameter group has another options type");
      o->visit_group_options([&key](const char*, const auto& value) {
        key.group_options.push_back(detail::option_number(value));
      });
      for (const auto& p : group.params()) {
        key.storage.push_back(p.data_ptr());
        if (!opt_.has_state(p)) {
          key.storage.push_back(nullptr);  // marks "no state yet"
          continue;
        }
        for (const auto& [name, t] : opt_.state_of(p).buffers) key.storage.push_back(t.defined() ? t.data_ptr() : nullptr);
      }
    }
    for (const auto& b : opt_.model()->buffers()) key.storage.push_back(b.defined() ? b.data_ptr() : nullptr);
  }

  // Static buffers shaped and typed like (x, y) on the model's device (kept when they fit).
  void allocate_static(const torch::Tensor& x, const torch::Tensor& y) {
    const auto fit = [this](torch::Tensor& buffer, const torch::Tensor& like) {
      if (!buffer.defined() || buffer.sizes() != like.sizes() || buffer.scalar_type() != like.scalar_type())
        buffer = torch::empty(like.sizes(), like.options().device(device_));
    };
    fit(static_x_, x);
    fit(static_y_, y);
  }

  // The batch into the static buffers, on the current stream (ordered before a replay on it).
  void fill_static(const torch::Tensor& x, const torch::Tensor& y) {
    c10::cuda::CUDAGuard guard(device_);
    static_x_.copy_(x, /*non_blocking=*/true);
    static_y_.copy_(y, /*non_blocking=*/true);
  }

  // `to` waits for the work queued so far on `from`.
  static void order(const c10::cuda::CUDAStream& from, const c10::cuda::CUDAStream& to) {
    at::cuda::CUDAEvent event;
    event.record(from);
    event.block(to);
  }

  torch::Tensor warm_up() {
    c10::cuda::CUDAGuard device_guard(device_);
    const auto current = c10::cuda::getCurrentCUDAStream(device_.index());
    order(current, *side_);
    torch::Tensor loss;
    {
      c10::cuda::CUDAStreamGuard stream_guard(*side_);
      loss = opt_.step(static_x_, static_y_);
    }
    order(*side_, current);
    ++eager_steps_;
    return loss;
  }

  // Captures the step on the static buffers; (x, y) is the call's batch, for the key.
  void capture(const torch::Tensor& x, const torch::Tensor& y) {
    c10::cuda::CUDAGuard device_guard(device_);
    const auto current = c10::cuda::getCurrentCUDAStream(device_.index());
    // What the step carries from step to step, and the step counts, before the capture's host pass.
    detail::GraphKey before;
    read_key(x, y, before);
    const auto steps_before = step_counts();
    order(current, *side_);
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    torch::Tensor loss;
    {
      c10::cuda::CUDAStreamGuard stream_guard(*side_);
      graph->capture_begin();  // pool {0, 0}: a private pool; cudaStreamCaptureModeGlobal (the defaults)
      try {
        loss = opt_.step(static_x_, static_y_);
      } catch (const std::exception& e) {
        abandon(*graph);
        throw std::runtime_error(std::string("mep: CUDA graph capture of the step failed; a step that synchronises "
                                             "with the host (a .item() or another device-to-host read) cannot be "
                                             "captured: ") +
                                 e.what());
      }
      try {
        graph->capture_end();
      } catch (const std::exception& e) {
        throw std::runtime_error(std::string("mep: CUDA graph capture of the step failed at capture_end: ") + e.what());
      }
    }
    order(*side_, current);
    detail::GraphKey after;
    read_key(x, y, after);
    if (after.storage != before.storage)
      throw std::runtime_error("mep: CUDA graph capture: the step replaced a parameter, an optimizer-state buffer "
                               "or a model buffer by a new tensor instead of writing it in place; a replay would "
                               "keep reading the old one, so this step cannot be graphed");
    const auto steps_after = step_counts();
    step_delta_.assign(steps_after.size(), 0);
    for (size_t i = 0; i < steps_after.size(); ++i) step_delta_[i] = steps_after[i] - steps_before[i];
    graph_ = std::move(graph);
    static_loss_ = loss;
    key_ = std::move(after);
    ++captures_;
  }

  // Ends a capture that failed midway, so that the stream leaves capture mode (the error
  // that ends it is the one already being reported).
  static void abandon(at::cuda::CUDAGraph& graph) {
    try {
      graph.capture_end();
    } catch (...) {
    }
  }

  void replay(bool after_capture = false) {
    c10::cuda::CUDAGuard guard(device_);
    graph_->replay();  // on the current stream
    ++replays_;
    if (after_capture) return;  // the capture's host pass counted this step already
    size_t i = 0;
    for (auto& group : opt_.param_groups())
      for (const auto& p : group.params()) {
        const int64_t d = i < step_delta_.size() ? step_delta_[i] : 0;
        ++i;
        if (d != 0) opt_.state_of(p).step += d;
      }
  }

  std::vector<int64_t> step_counts() {
    std::vector<int64_t> out;
    for (auto& group : opt_.param_groups())
      for (const auto& p : group.params()) out.push_back(opt_.has_state(p) ? opt_.state_of(p).step : 0);
    return out;
  }

  void drop_graph() {
    if (!graph_) return;
    // Replays queued on the current stream may still read the pool the graph owns.
    c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();
    static_loss_ = torch::Tensor();
    graph_.reset();
  }

  Opt& opt_;
  CudaGraphStepOptions options_;
  c10::Device device_{c10::kCUDA};
  std::optional<c10::cuda::CUDAStream> side_;  // warm-up and capture (set by the constructor)
  std::unique_ptr<at::cuda::CUDAGraph> graph_;
  torch::Tensor static_x_, static_y_, static_loss_;
  detail::GraphKey key_, probe_, pending_key_;
  bool pending_ = false;  // warming up for pending_key_
  int64_t warm_done_ = 0;
  std::vector<int64_t> step_delta_;
  int64_t captures_ = 0, replays_ = 0, eager_steps_ = 0;
};

}  // namespace mep
