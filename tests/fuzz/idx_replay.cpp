// Replays the IDX fuzzing corpus (every file under the directories given) through the
// reader: exit 1 with the file's name if anything but mep::data::IdxError escapes.
#include "idx_target.hpp"

#include <exception>
#include <iostream>
#include <iterator>
#include <vector>

int main(int argc, char** argv) {
  int files = 0;
  for (int a = 1; a < argc; ++a) {
    for (const auto& entry : std::filesystem::recursive_directory_iterator(argv[a])) {
      if (!entry.is_regular_file()) continue;
      std::ifstream in(entry.path(), std::ios::binary);
      std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      try {
        mep_fuzz::read_idx_bytes(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
      } catch (const std::exception& e) {
        std::cerr << "idx_replay: " << entry.path().string() << ": " << e.what() << "\n";
        return 1;
      }
      ++files;
    }
  }
  std::filesystem::remove_all(mep_fuzz::scratch_dir());
  std::cout << "idx_replay: " << files << " inputs, all read or rejected with IdxError\n";
  return files > 0 ? 0 : 1;
}
