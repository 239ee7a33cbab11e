// libFuzzer target for the IDX reader: cmake -DMEP_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++, then
//   build/tests/fuzz/mep_fuzz_idx -max_total_time=300 tests/fuzz/corpus/idx
#include "idx_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  mep_fuzz::read_idx_bytes(data, size);
  return 0;
}
