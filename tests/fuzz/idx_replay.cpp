// Replays the IDX fuzzing corpus (every regular file in the directories given) through the
// reader: exit 1 with the file's name if anything but mep::data::IdxError escapes.
#include "idx_target.hpp"
#include "../posix_dir.hpp"

#include <exception>
#include <iostream>
#include <iterator>
#include <vector>

int main(int argc, char** argv) {
  int files = 0;
  for (int a = 1; a < argc; ++a) {
    for (const auto& path : mep_test::files_in(argv[a])) {
      std::ifstream in(path, std::ios::binary);
      std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      try {
        mep_fuzz::read_idx_bytes(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
      } catch (const std::exception& e) {
        std::cerr << "idx_replay: " << path << ": " << e.what() << "\n";
        return 1;
      }
      ++files;
    }
  }
  mep_test::remove_tree(mep_fuzz::scratch_dir());
  std::cout << "idx_replay: " << files << " inputs, all read or rejected with IdxError\n";
  return files > 0 ? 0 : 1;
}
