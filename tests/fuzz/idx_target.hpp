#pragma once
// The IDX reader under arbitrary bytes: the bytes are written as a plain and as a ".gz" file
// and read as images and as labels. Anything but a clean result or mep::data::IdxError
// (another exception, a crash, a sanitizer report) is a bug. Shared by the libFuzzer target
// (idx_fuzz.cpp, -DMEP_FUZZ=ON with clang) and the corpus replay that ctest runs (idx_replay.cpp).
#include <mep/data/idx.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

namespace mep_fuzz {

inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("mep_fuzz_idx_" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d.string();
  }();
  return dir;
}

inline void read_idx_bytes(const std::uint8_t* data, std::size_t size) {
  for (const char* name : {"input-idx", "input-idx.gz"}) {
    const std::string path = scratch_dir() + "/" + name;
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    }
    try {
      auto images = mep::data::read_idx_images(path);
      (void)images;
    } catch (const mep::data::IdxError&) {
    }
    try {
      auto labels = mep::data::read_idx_labels(path);
      (void)labels;
    } catch (const mep::data::IdxError&) {
    }
  }
}

}  // namespace mep_fuzz
