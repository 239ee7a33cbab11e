#pragma once
/// \file process_group.hpp
/// Builds the c10d process group that mep's optimizers take (`options.process_group(g)`,
/// data_parallel.hpp) the way torchrun's environment describes it: rank 0 serves a TCPStore
/// at MASTER_ADDR:MASTER_PORT, every rank joins it, and the ranks connect through Gloo (CPU
/// tensors) or, in a LibTorch built with it, NCCL (CUDA tensors). Every collective and the
/// rendezvous have a timeout, so that a rank that stops makes the others fail instead of
/// waiting forever.
///
/// Not part of <mep/mep.hpp>: it needs Gloo's headers (Debian: libgloo-dev).

#include <mep/data_parallel.hpp>

// LibTorch's CMake package defines USE_C10D_GLOO when its c10d has Gloo; ProcessGroupGloo.hpp
// is empty without it.
#ifndef USE_C10D_GLOO
#error "mep/process_group.hpp needs a LibTorch with Gloo (its CMake package defines USE_C10D_GLOO)"
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>
#if defined(USE_C10D_NCCL) || defined(MEP_WITH_NCCL)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define MEP_HAS_NCCL 1
#else
#define MEP_HAS_NCCL 0
#endif

#include <chrono>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mep {

/// Where and how the ranks meet.
struct ProcessGroupConfig {
  int rank = 0;
  int world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// Rendezvous and every collective: a rank waiting longer throws.
  std::chrono::milliseconds timeout{std::chrono::seconds(300)};
  /// "gloo" (CPU tensors) or "nccl" (CUDA tensors).
  std::string backend = "gloo";

  /// RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT as torchrun sets them, over the defaults
  /// above; a malformed value throws std::invalid_argument naming the variable.
  static ProcessGroupConfig from_environment() { return from_environment(ProcessGroupConfig()); }
  static ProcessGroupConfig from_environment(ProcessGroupConfig c) {
    c.rank = env_int("RANK", c.rank);
    c.world_size = env_int("WORLD_SIZE", c.world_size);
    if (const char* addr = std::getenv("MASTER_ADDR"); addr && *addr) c.master_addr = addr;
    c.master_port = env_int("MASTER_PORT", c.master_port);
    return c;
  }

  /// Throws std::invalid_argument naming the first invalid field.
  void validate() const {
    auto fail = [](const std::string& what) { throw std::invalid_argument("mep: process group: " + what); };
    if (world_size < 1) fail("world size " + std::to_string(world_size) + " (expected >= 1)");
    if (rank < 0 || rank >= world_size)
      fail("rank " + std::to_string(rank) + " (expected 0 <= rank < world size " + std::to_string(world_size) + ")");
    if (master_port < 1 || master_port > 65535) fail("master port " + std::to_string(master_port) + " (expected 1..65535)");
    if (master_addr.empty()) fail("empty master address");
    if (timeout.count() <= 0) fail("timeout must be > 0");
    if (backend != "gloo" && backend != "nccl") fail("backend '" + backend + "' (expected gloo or nccl)");
    if (backend == "nccl" && !MEP_HAS_NCCL)
      fail("backend nccl: this LibTorch has no NCCL (a CUDA build of LibTorch has; define MEP_WITH_NCCL)");
  }

 private:
  static int env_int(const char* name, int fallback) {
    const char* text = std::getenv(name);
    if (!text || !*text) return fallback;
    char* end = nullptr;
    const long v = std::strtol(text, &end, 10);
    if (*end != '\0' || v < 0 || v > 1 << 30)
      throw std::invalid_argument(std::string("mep: environment variable ") + name + " = '" + text +
                                  "' is not a non-negative integer");
    return static_cast<int>(v);
  }
};

namespace detail {
/// `backend` (Gloo for CPU tensors, NCCL for CUDA ones) as a process group. LibTorch 2.x
/// splits the two: a ProcessGroup dispatches to its backends; in 1.13 the backend is the group.
template <class Backend>
ProcessGroupPtr as_process_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                 c10::intrusive_ptr<Backend> backend, bool cuda) {
#if TORCH_VERSION_MAJOR >= 2
  auto group = c10::make_intrusive<c10d::ProcessGroup>(store, rank, size);
  const auto type = cuda ? c10d::ProcessGroup::BackendType::NCCL : c10d::ProcessGroup::BackendType::GLOO;
  group->setBackend(cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU, type, backend);
  group->setDefaultBackend(type);
  return group;
#else
  (void)store, (void)rank, (void)size, (void)cuda;
  return backend;
#endif
}
}  // namespace detail

/// Rank `rank` of a Gloo process group of `size` ranks meeting through `store`, its
/// transport on `device` (default: the loopback address, for ranks on one machine).
inline ProcessGroupPtr make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                       std::chrono::milliseconds timeout,
                                       std::shared_ptr<::gloo::transport::Device> device = nullptr) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(device ? device : c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  return detail::as_process_group(store, rank, size, c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options),
                                  /*cuda=*/false);
}

namespace detail {
inline ProcessGroupPtr connect(const ProcessGroupConfig& config) {
  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(config.master_port);
  store_options.isServer = config.rank == 0;
  store_options.numWorkers = static_cast<std::size_t>(config.world_size);
  store_options.waitWorkers = true;
  store_options.timeout = config.timeout;
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(config.master_addr, store_options);
  if (config.backend == "nccl") {
#if MEP_HAS_NCCL
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = config.timeout;
    return as_process_group(store, config.rank, config.world_size,
                            c10::make_intrusive<c10d::ProcessGroupNCCL>(store, config.rank, config.world_size, options),
                            /*cuda=*/true);
#endif
  }
  // Ranks on one machine talk over the loopback; across machines each binds to the
  // interface GLOO_SOCKET_IFNAME names, or to the address its hostname resolves to.
  std::shared_ptr<::gloo::transport::Device> device;
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname)
    device = c10d::ProcessGroupGloo::createDeviceForInterface(ifname);
  else if (config.master_addr != "127.0.0.1" && config.master_addr != "localhost")
    device = c10d::ProcessGroupGloo::createDefaultDevice();
  return make_gloo_group(store, config.rank, config.world_size, config.timeout, device);
}
}  // namespace detail

/// The process group `config` describes: rank 0 serves the TCPStore, every rank joins and
/// the backend connects them, each waiting up to config.timeout for the others; a failure
/// throws std::runtime_error naming the rank and the meeting point.
inline ProcessGroupPtr make_process_group(const ProcessGroupConfig& config) {
  config.validate();
  try {
    return detail::connect(config);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::ostringstream os;
    os << "mep: rank " << config.rank << " of " << config.world_size << ": cannot meet the other ranks at "
       << config.master_addr << ":" << config.master_port << " within " << config.timeout.count() / 1000.0
       << " s: " << what.substr(0, what.find('\n'));
    throw std::runtime_error(os.str());
  }
}

}  // namespace mep
