// mep/data/idx.hpp - strict readers for IDX (MNIST-format) image and label files.
//
// torch::data::datasets::MNIST only accepts exactly 60,000/10,000 samples; these
// readers accept any sample count and validate every file thoroughly.
//
// IDX format (all integers big-endian):
//   images: u32 magic 0x00000803, u32 N, u32 rows, u32 cols, then N*rows*cols u8 pixels
//   labels: u32 magic 0x00000801, u32 N, then N u8 labels
//
// Gzip: a path ending in ".gz" is decompressed with zlib. Any target including this
// header must therefore link zlib (CMake: target_link_libraries(... ZLIB::ZLIB)).
// Define MEP_DATA_NO_ZLIB before including to drop gzip support and the dependency.
//
// Every failure throws mep::data::IdxError (a std::runtime_error) whose message
// names the file and the problem.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#ifndef MEP_DATA_NO_ZLIB
#include <zlib.h>
#endif

namespace mep::data {

/// Error raised for any unreadable or malformed IDX input.
class IdxError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Images and labels loaded by load_idx / load_split.
struct IdxDataset {
  torch::Tensor images;  ///< float32 [N, 1, rows, cols], normalised
  torch::Tensor labels;  ///< int64 [N]
};

namespace detail {

constexpr std::uint32_t kIdxImageMagic = 0x00000803;
constexpr std::uint32_t kIdxLabelMagic = 0x00000801;
constexpr std::size_t kIdxChunk = std::size_t{1} << 20;

[[noreturn]] inline void idx_fail(const std::string& path, const std::string& what) {
  throw IdxError("mep::data: " + path + ": " + what);
}

inline std::string idx_hex(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08X", static_cast<unsigned>(v));
  return buf;
}

inline bool idx_is_gzip_path(const std::string& path) {
  return path.size() >= 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
}

inline std::uint32_t idx_be32(const unsigned char* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) |
         (std::uint32_t{p[2]} << 8) | std::uint32_t{p[3]};
}

/// Sequential byte reader over a plain file (std::ifstream) or, for ".gz" paths, zlib.
class IdxByteReader {
 public:
  explicit IdxByteReader(const std::string& path) : path_(path) {
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status)) idx_fail(path_, "cannot open file: no such file");
    if (std::filesystem::is_directory(status)) idx_fail(path_, "cannot open file: is a directory");
    if (idx_is_gzip_path(path)) {
#ifndef MEP_DATA_NO_ZLIB
      gz_ = gzopen(path.c_str(), "rb");
      if (gz_ == nullptr) idx_fail(path_, "cannot open file for reading (gzip)");
      return;
#else
      idx_fail(path_, "gzip input is unsupported (built with MEP_DATA_NO_ZLIB)");
#endif
    }
    in_.open(path, std::ios::in | std::ios::binary);
    if (!in_.is_open()) idx_fail(path_, "cannot open file for reading");
    const auto size = std::filesystem::file_size(path, ec);
    if (!ec) size_hint_ = static_cast<std::uint64_t>(size);
  }

  IdxByteReader(const IdxByteReader&) = delete;
  IdxByteReader& operator=(const IdxByteReader&) = delete;

  ~IdxByteReader() {
#ifndef MEP_DATA_NO_ZLIB
    if (gz_ != nullptr) gzclose(gz_);
#endif
  }

  /// Reads up to n bytes into dst; returns the count read (short only at end of file).
  std::size_t read(unsigned char* dst, std::size_t n) {
    std::size_t total = 0;
    while (total < n) {
      const std::size_t want = std::min(n - total, kIdxChunk);
      std::size_t got = 0;
#ifndef MEP_DATA_NO_ZLIB
      if (gz_ != nullptr) {
        const int r = gzread(gz_, dst + total, static_cast<unsigned>(want));
        if (r < 0) gz_fail();
        got = static_cast<std::size_t>(r);
        if (got < want) {
          int errnum = Z_OK;
          gzerror(gz_, &errnum);
          if (errnum != Z_OK) gz_fail();
        }
      } else
#endif
      {
        in_.read(reinterpret_cast<char*>(dst + total), static_cast<std::streamsize>(want));
        got = static_cast<std::size_t>(in_.gcount());
        if (in_.bad()) idx_fail(path_, "I/O error while reading");
      }
      total += got;
      if (got < want) break;
    }
    return total;
  }

  /// File size in bytes for plain files, 0 when unknown (gzip input).
  std::uint64_t size_hint() const { return size_hint_; }

  /// Consumes the remainder of the input and returns its length in bytes.
  std::uint64_t count_rest() {
    std::vector<unsigned char> scratch(kIdxChunk);
    std::uint64_t total = 0;
    for (;;) {
      const std::size_t got = read(scratch.data(), scratch.size());
      total += got;
      if (got < scratch.size()) return total;
    }
  }

 private:
#ifndef MEP_DATA_NO_ZLIB
  [[noreturn]] void gz_fail() {
    int errnum = Z_OK;
    const char* msg = gzerror(gz_, &errnum);
    idx_fail(path_, std::string("corrupt or unreadable gzip data: ") + (msg ? msg : "unknown error"));
  }
  gzFile gz_ = nullptr;
#endif
  std::string path_;
  std::ifstream in_;
  std::uint64_t size_hint_ = 0;
};

/// Reads an IDX file with the given magic and `ndims` dimensions. Returns the dims in
/// `dims` and the payload (product of dims bytes). Validates magic, nonzero dims and
/// that the file holds exactly header + payload bytes.
inline std::vector<unsigned char> idx_read(const std::string& path, std::uint32_t magic,
                                           std::size_t ndims, const char* kind,
                                           std::vector<std::uint32_t>& dims) {
  IdxByteReader reader(path);
  const std::size_t header_len = 4 * (1 + ndims);
  unsigned char header[16] = {};
  const std::size_t got_header = reader.read(header, header_len);
  if (got_header < header_len) {
    idx_fail(path, "truncated header: expected at least " + std::to_string(header_len) +
                       " bytes for an IDX " + kind + " file, file has " +
                       std::to_string(got_header) + " bytes");
  }
  const std::uint32_t found = idx_be32(header);
  if (found != magic) {
    std::string hint;
    if (found == kIdxImageMagic) hint = " (this looks like an IDX image file)";
    if (found == kIdxLabelMagic) hint = " (this looks like an IDX label file)";
    idx_fail(path, std::string("wrong magic number for an IDX ") + kind + " file: expected " +
                       idx_hex(magic) + ", found " + idx_hex(found) + hint);
  }
  dims.assign(ndims, 0);
  std::uint64_t payload = 1;
  bool overflow = false;
  std::ostringstream shape;
  for (std::size_t i = 0; i < ndims; ++i) {
    dims[i] = idx_be32(header + 4 * (i + 1));
    shape << (i ? " x " : "") << dims[i];
    if (dims[i] != 0 && payload > std::numeric_limits<std::uint64_t>::max() / 4 / dims[i]) {
      overflow = true;
    } else {
      payload *= dims[i];
    }
  }
  if (std::find(dims.begin(), dims.end(), 0u) != dims.end()) {
    idx_fail(path, "zero dimension in header (dims " + shape.str() + ")");
  }
  if (overflow) {
    idx_fail(path, "header dims " + shape.str() + " describe more data than can be loaded");
  }
  const std::uint64_t expected = header_len + payload;

  std::vector<unsigned char> data;
  data.reserve(static_cast<std::size_t>(
      std::min<std::uint64_t>(payload, std::max<std::uint64_t>(reader.size_hint(), kIdxChunk))));
  while (data.size() < payload) {
    const std::size_t old = data.size();
    const std::size_t want =
        static_cast<std::size_t>(std::min<std::uint64_t>(payload - old, kIdxChunk));
    data.resize(old + want);
    const std::size_t got = reader.read(data.data() + old, want);
    data.resize(old + got);
    if (got < want) {
      idx_fail(path, "truncated file: header dims " + shape.str() + " need " +
                         std::to_string(expected) + " bytes, file has " +
                         std::to_string(header_len + data.size()) + " bytes");
    }
  }
  const std::uint64_t extra = reader.count_rest();
  if (extra != 0) {
    idx_fail(path, "over-long file: header dims " + shape.str() + " need " +
                       std::to_string(expected) + " bytes, file has " +
                       std::to_string(expected + extra) + " bytes");
  }
  return data;
}

}  // namespace detail

/// Reads an IDX image file (magic 0x00000803, dims N, rows, cols) into a uint8 tensor
/// [N, rows, cols]. Validates the magic, that no dim is zero and that the file length
/// is exactly 16 + N*rows*cols bytes. Paths ending in ".gz" are gunzipped first.
inline torch::Tensor read_idx_images(const std::string& path) {
  std::vector<std::uint32_t> dims;
  const auto data = detail::idx_read(path, detail::kIdxImageMagic, 3, "image", dims);
  auto out = torch::empty({static_cast<int64_t>(dims[0]), static_cast<int64_t>(dims[1]),
                           static_cast<int64_t>(dims[2])},
                          torch::kUInt8);
  std::memcpy(out.data_ptr<std::uint8_t>(), data.data(), data.size());
  return out;
}

/// Reads an IDX label file (magic 0x00000801, dim N) into an int64 tensor [N].
/// Validates the magic, N > 0 and that the file length is exactly 8 + N bytes.
/// Label values are not range-checked here (see load_idx).
inline torch::Tensor read_idx_labels(const std::string& path) {
  std::vector<std::uint32_t> dims;
  const auto data = detail::idx_read(path, detail::kIdxLabelMagic, 1, "label", dims);
  auto out = torch::empty({static_cast<int64_t>(dims[0])}, torch::kInt64);
  auto* dst = out.data_ptr<int64_t>();
  for (std::size_t i = 0; i < data.size(); ++i) dst[i] = data[i];
  return out;
}

/// Loads an IDX image/label pair.
///
/// Returns images as float32 [N, 1, rows, cols] computed as (pixel/255 - mean) / stddev,
/// and labels as int64 [N]. Beyond the per-file checks of read_idx_images /
/// read_idx_labels it validates that both files hold the same number of samples, that
/// every label lies in [0, max_label], and that stddev is positive and finite.
///
/// `limit`: -1 keeps all samples; a value in [1, N] keeps the first `limit` samples.
/// Any other value, including one larger than N, throws (no silent clamping).
inline IdxDataset load_idx(const std::string& images_path, const std::string& labels_path,
                           int64_t limit = -1, double mean = 0.1307, double stddev = 0.3081,
                           int64_t max_label = 9) {
  if (!std::isfinite(mean) || !std::isfinite(stddev) || !(stddev > 0.0)) {
    detail::idx_fail(images_path, "invalid normalisation: mean " + std::to_string(mean) +
                                      ", stddev " + std::to_string(stddev) +
                                      " (stddev must be positive and finite)");
  }
  torch::Tensor images = read_idx_images(images_path);
  torch::Tensor labels = read_idx_labels(labels_path);
  const int64_t n_images = images.size(0);
  const int64_t n_labels = labels.size(0);
  if (n_images != n_labels) {
    detail::idx_fail(images_path, "image/label count mismatch: " + std::to_string(n_images) +
                                      " images but " + std::to_string(n_labels) +
                                      " labels in " + labels_path);
  }
  const auto* lab = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_labels; ++i) {
    if (lab[i] < 0 || lab[i] > max_label) {
      detail::idx_fail(labels_path, "label out of range at index " + std::to_string(i) +
                                        ": value " + std::to_string(lab[i]) +
                                        ", allowed [0, " + std::to_string(max_label) + "]");
    }
  }
  if (limit != -1) {
    if (limit < 1 || limit > n_images) {
      detail::idx_fail(images_path, "invalid limit " + std::to_string(limit) +
                                        ": must be -1 (all) or in [1, " +
                                        std::to_string(n_images) + "], the file has " +
                                        std::to_string(n_images) + " samples");
    }
    images = images.narrow(0, 0, limit);
    labels = labels.narrow(0, 0, limit).clone();
  }
  IdxDataset out;
  out.images = images.to(torch::kFloat32)
                   .div_(255.0)
                   .sub_(mean)
                   .div_(stddev)
                   .unsqueeze(1)
                   .contiguous();
  out.labels = labels;
  return out;
}

/// Loads the training (train=true) or test split stored in `dir` under the standard
/// names train-images-idx3-ubyte / train-labels-idx1-ubyte (or t10k-*). If a plain file
/// is absent, the same name with ".gz" is used when present (needs zlib). Arguments
/// after `train` are as for load_idx.
inline IdxDataset load_split(const std::string& dir, bool train, int64_t limit = -1,
                             double mean = 0.1307, double stddev = 0.3081,
                             int64_t max_label = 9) {
  const std::string prefix = train ? "train" : "t10k";
  auto pick = [&](const std::string& name) {
    const std::filesystem::path plain = std::filesystem::path(dir) / name;
    std::error_code ec;
    if (std::filesystem::exists(plain, ec)) return plain.string();
#ifndef MEP_DATA_NO_ZLIB
    const std::filesystem::path gz = std::filesystem::path(dir) / (name + ".gz");
    if (std::filesystem::exists(gz, ec)) return gz.string();
    detail::idx_fail(plain.string(), "cannot open file: no such file (nor " + gz.string() + ")");
#else
    detail::idx_fail(plain.string(), "cannot open file: no such file");
#endif
  };
  const std::string images_path = pick(prefix + "-images-idx3-ubyte");
  const std::string labels_path = pick(prefix + "-labels-idx1-ubyte");
  return load_idx(images_path, labels_path, limit, mean, stddev, max_label);
}

}  // namespace mep::data
