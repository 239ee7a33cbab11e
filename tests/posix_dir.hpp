#pragma once
// Listing a directory's files and removing a directory tree with POSIX calls. The tests use these
// instead of std::filesystem's directory iteration and remove_all: PyTorch's 2.x wheels
// export their own copies of std::filesystem's symbols from libtorch.so, which take
// precedence over libstdc++'s in a program linked against them, and remove_all from
// PyTorch 2.11's copy crashed (null function pointer) on the GPU machine.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

namespace mep_test {

/// The regular files directly in `dir`, sorted by name (empty if it cannot be read).
inline std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string path = dir + "/" + e->d_name;
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) out.push_back(path);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

/// Removes `path` and, for a directory, everything in it; errors are ignored.
inline void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISDIR(st.st_mode)) {
    ::unlink(path.c_str());
    return;
  }
  if (DIR* d = ::opendir(path.c_str())) {
    std::vector<std::string> children;
    while (const dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") children.push_back(path + "/" + name);
    }
    ::closedir(d);
    for (const auto& c : children) remove_tree(c);
  }
  ::rmdir(path.c_str());
}

}  // namespace mep_test
