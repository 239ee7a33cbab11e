#pragma once
/// \file state.hpp
/// Per-parameter optimizer state, typed as `torch::optim::AdamParamState` is: a step count
/// and one tensor member per buffer that some policy keeps. A policy reads and writes its
/// members directly (`st.exp_avg`); a buffer the composition does not use stays undefined.
/// One struct for every composition rather than one per policy: the policies compose freely
/// (Newton–Schulz with heavy-ball momentum, error feedback and the spectral constraint), so
/// a parameter's state is the union of theirs, and one save/load covers all of it.
/// Checkpoints name each buffer ("momentum", "exp_avg", …), as the string-keyed state of
/// mep 0.3 did, so that its checkpoints load unchanged.

#include <torch/torch.h>

#include <array>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mep {

struct ParamState : torch::optim::OptimizerCloneableParamState<ParamState> {
  int64_t step = 0;
  torch::Tensor momentum;        ///< heavy-ball momentum m (SGD, Newton–Schulz, Fisher, Dion's pass-through)
  torch::Tensor exp_avg;         ///< Adam's first moment
  torch::Tensor exp_avg_sq;      ///< Adam's second moment
  torch::Tensor max_exp_avg_sq;  ///< Adam's running maximum of v (amsgrad)
  torch::Tensor momentum_buffer; ///< Muon's M (torch.optim.Muon's name)
  torch::Tensor dion_M;          ///< Dion's momentum, m × n
  torch::Tensor dion_Q;          ///< Dion's right basis, n × r
  torch::Tensor fisher;          ///< the Fisher proxy's moving average (FisherNewtonSchulz)
  torch::Tensor error_feedback;  ///< the error-feedback buffer
  torch::Tensor spectral_u;      ///< the spectral constraint's left singular vector estimate
  torch::Tensor spectral_v;      ///< and its right one

  using Field = torch::Tensor ParamState::*;
  /// Every buffer with its name in checkpoints.
  static const std::array<std::pair<const char*, Field>, 11>& fields() {
    static const std::array<std::pair<const char*, Field>, 11> f = {{{"momentum", &ParamState::momentum},
                                                                     {"exp_avg", &ParamState::exp_avg},
                                                                     {"exp_avg_sq", &ParamState::exp_avg_sq},
                                                                     {"max_exp_avg_sq", &ParamState::max_exp_avg_sq},
                                                                     {"momentum_buffer", &ParamState::momentum_buffer},
                                                                     {"dion_M", &ParamState::dion_M},
                                                                     {"dion_Q", &ParamState::dion_Q},
                                                                     {"fisher", &ParamState::fisher},
                                                                     {"error_feedback", &ParamState::error_feedback},
                                                                     {"spectral_u", &ParamState::spectral_u},
                                                                     {"spectral_v", &ParamState::spectral_v}}};
    return f;
  }

  /// f(name, tensor&) for every defined buffer, in `fields()` order.
  template <class F>
  void for_each_buffer(F&& f) {
    for (const auto& [name, field] : fields())
      if ((this->*field).defined()) f(name, this->*field);
  }
  template <class F>
  void for_each_buffer(F&& f) const {
    for (const auto& [name, field] : fields())
      if ((this->*field).defined()) f(name, this->*field);
  }

  /// The names of the defined buffers, in `fields()` order.
  std::vector<std::string> buffer_names() const {
    std::vector<std::string> names;
    for_each_buffer([&](const char* name, const torch::Tensor&) { names.emplace_back(name); });
    return names;
  }

  /// The buffer called `name` (undefined if it does not exist yet); std::invalid_argument
  /// for a name that is not a buffer's.
  torch::Tensor& buffer(const std::string& name) { return this->*field(name); }
  torch::Tensor get(const std::string& name) const { return this->*field(name); }
  bool has(const std::string& name) const { return (this->*field(name)).defined(); }
  void set(const std::string& name, torch::Tensor value) { this->*field(name) = std::move(value); }

  /// `t`, created as zeros shaped like `like` the first time.
  static torch::Tensor& zeros_like(torch::Tensor& t, const torch::Tensor& like) {
    if (!t.defined()) t = torch::zeros_like(like, torch::MemoryFormat::Contiguous);
    return t;
  }

  void serialize(torch::serialize::OutputArchive& a) const override {
    a.write("step", c10::IValue(step));
    c10::List<std::string> names;
    for_each_buffer([&](const char* name, const torch::Tensor&) { names.push_back(name); });
    a.write("names", c10::IValue(names));
    for_each_buffer([&](const char* name, const torch::Tensor& t) { a.write(std::string("buf.") + name, t, true); });
  }
  void serialize(torch::serialize::InputArchive& a) override {
    c10::IValue v;
    a.read("step", v);
    step = v.toInt();
    a.read("names", v);
    for (const auto& [name, f] : fields()) this->*f = torch::Tensor();
    for (const auto& name : v.toListRef()) {
      auto& t = this->*field(name.toStringRef());
      a.read("buf." + name.toStringRef(), t, /*is_buffer=*/true);
    }
  }

 private:
  static Field field(const std::string& name) {
    for (const auto& [n, f] : fields())
      if (name == n) return f;
    std::string known;
    for (const auto& [n, f] : fields()) known += (known.empty() ? "" : ", ") + std::string(n);
    throw std::invalid_argument("mep: no optimizer state buffer is called '" + name + "' (the buffers: " + known + ")");
  }
};

}  // namespace mep
