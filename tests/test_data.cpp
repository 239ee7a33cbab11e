// Tests for mep/data/idx.hpp: IDX parsing, validation errors and normalisation.
#include <mep/data/idx.hpp>

#include "posix_dir.hpp"

#include <gtest/gtest.h>
#include <zlib.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using mep::data::IdxError;

namespace {

using Bytes = std::vector<unsigned char>;

void put_be32(Bytes& b, std::uint32_t v) {
  b.push_back(static_cast<unsigned char>(v >> 24));
  b.push_back(static_cast<unsigned char>(v >> 16));
  b.push_back(static_cast<unsigned char>(v >> 8));
  b.push_back(static_cast<unsigned char>(v));
}

Bytes image_bytes(std::uint32_t n, std::uint32_t rows, std::uint32_t cols, const Bytes& pixels,
                  std::uint32_t magic = 0x00000803) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, rows);
  put_be32(b, cols);
  b.insert(b.end(), pixels.begin(), pixels.end());
  return b;
}

Bytes label_bytes(const Bytes& labels, std::uint32_t magic = 0x00000801) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, static_cast<std::uint32_t>(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

// Three 2x4 images with distinct pixels (including 0 and 255) and their labels.
const Bytes kPixels = {0,   1,   2,   3,   4,   5,   6,   7,   //
                       128, 129, 130, 131, 250, 253, 254, 255,  //
                       255, 0,   17,  34,  51,  68,  85,  102};
const Bytes kLabels = {0, 9, 4};

template <class F>
void expect_idx_error(F&& f, const std::string& file, const std::vector<std::string>& phrases) {
  try {
    f();
    ADD_FAILURE() << "expected mep::data::IdxError mentioning " << file;
  } catch (const IdxError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file), std::string::npos) << "message lacks file name: " << msg;
    for (const auto& p : phrases) {
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected mep::data::IdxError, got std::exception: " << e.what();
  }
}

}  // namespace

class Idx : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device rd;
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    dir_ = fs::temp_directory_path() /
           ("mep_idx_test_" + std::to_string(stamp) + "_" + std::to_string(rd()));
    fs::create_directories(dir_);
  }
  void TearDown() override { mep_test::remove_tree(dir_.string()); }

  std::string write(const std::string& name, const Bytes& bytes) const {
    const fs::path p = dir_ / name;
    std::ofstream out(p, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.close();
    EXPECT_TRUE(out.good()) << "failed to write fixture " << p;
    return p.string();
  }

  std::string write_gz(const std::string& name, const Bytes& bytes) const {
    const fs::path p = dir_ / name;
    gzFile gz = gzopen(p.string().c_str(), "wb");
    EXPECT_NE(gz, nullptr);
    if (gz == nullptr) return p.string();
    EXPECT_EQ(gzwrite(gz, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
    gzclose(gz);
    return p.string();
  }

  std::string valid_images(const std::string& name = "imgs-idx3-ubyte") const {
    return write(name, image_bytes(3, 2, 4, kPixels));
  }
  std::string valid_labels(const std::string& name = "labels-idx1-ubyte") const {
    return write(name, label_bytes(kLabels));
  }

  fs::path dir_;
};

TEST_F(Idx, RoundTripsExactPixelsAndLabels) {
  const auto images = mep::data::read_idx_images(valid_images());
  ASSERT_EQ(images.scalar_type(), torch::kUInt8);
  ASSERT_EQ(images.sizes(), (std::vector<int64_t>{3, 2, 4}));
  const auto flat = images.reshape({-1});
  for (std::size_t i = 0; i < kPixels.size(); ++i) {
    EXPECT_EQ(flat[static_cast<int64_t>(i)].item<std::uint8_t>(), kPixels[i]) << "pixel " << i;
  }
  // Row-major layout: image 1, row 1, col 3 is the 16th byte.
  EXPECT_EQ(images[1][1][3].item<std::uint8_t>(), 255);

  const auto labels = mep::data::read_idx_labels(valid_labels());
  ASSERT_EQ(labels.scalar_type(), torch::kInt64);
  ASSERT_EQ(labels.sizes(), (std::vector<int64_t>{3}));
  for (std::size_t i = 0; i < kLabels.size(); ++i) {
    EXPECT_EQ(labels[static_cast<int64_t>(i)].item<int64_t>(), kLabels[i]);
  }
}

TEST_F(Idx, WrongMagicImages) {
  const auto path = write("bad-magic-images", image_bytes(3, 2, 4, kPixels, 0x00000801));
  expect_idx_error([&] { mep::data::read_idx_images(path); }, path,
                   {"wrong magic", "expected 0x00000803", "found 0x00000801"});
}

TEST_F(Idx, WrongMagicLabels) {
  const auto path = write("bad-magic-labels", label_bytes(kLabels, 0x12345678));
  expect_idx_error([&] { mep::data::read_idx_labels(path); }, path,
                   {"wrong magic", "expected 0x00000801", "found 0x12345678"});
}

TEST_F(Idx, TruncatedImages) {
  Bytes pixels = kPixels;
  pixels.pop_back();
  const auto path = write("short-images", image_bytes(3, 2, 4, pixels));
  expect_idx_error([&] { mep::data::read_idx_images(path); }, path,
                   {"truncated file", "need 40 bytes", "file has 39 bytes"});
}

TEST_F(Idx, TruncatedLabels) {
  Bytes b = label_bytes(kLabels);
  b.pop_back();
  const auto path = write("short-labels", b);
  expect_idx_error([&] { mep::data::read_idx_labels(path); }, path,
                   {"truncated file", "need 11 bytes", "file has 10 bytes"});
}

TEST_F(Idx, OverLongImages) {
  Bytes b = image_bytes(3, 2, 4, kPixels);
  b.push_back(7);
  b.push_back(7);
  const auto path = write("long-images", b);
  expect_idx_error([&] { mep::data::read_idx_images(path); }, path,
                   {"over-long file", "need 40 bytes", "file has 42 bytes"});
}

TEST_F(Idx, OverLongLabels) {
  Bytes b = label_bytes(kLabels);
  b.push_back(1);
  const auto path = write("long-labels", b);
  expect_idx_error([&] { mep::data::read_idx_labels(path); }, path,
                   {"over-long file", "need 11 bytes", "file has 12 bytes"});
}

TEST_F(Idx, TruncatedHeader) {
  Bytes b = image_bytes(3, 2, 4, {});
  b.resize(10);
  const auto path = write("short-header", b);
  expect_idx_error([&] { mep::data::read_idx_images(path); }, path,
                   {"truncated header", "at least 16 bytes", "file has 10 bytes"});

  const auto empty = write("empty-file", {});
  expect_idx_error([&] { mep::data::read_idx_labels(empty); }, empty,
                   {"truncated header", "at least 8 bytes", "file has 0 bytes"});
}

TEST_F(Idx, EveryProperPrefixIsRejected) {
  const Bytes full = image_bytes(3, 2, 4, kPixels);
  for (std::size_t len = 0; len < full.size(); ++len) {
    const auto path = write("prefix-" + std::to_string(len), Bytes(full.begin(), full.begin() + len));
    EXPECT_THROW(mep::data::read_idx_images(path), IdxError) << "prefix length " << len;
  }
}

TEST_F(Idx, ZeroDimension) {
  const auto zero_rows = write("zero-rows", image_bytes(3, 0, 4, {}));
  expect_idx_error([&] { mep::data::read_idx_images(zero_rows); }, zero_rows,
                   {"zero dimension", "3 x 0 x 4"});
  const auto zero_n = write("zero-n", image_bytes(0, 28, 28, {}));
  expect_idx_error([&] { mep::data::read_idx_images(zero_n); }, zero_n, {"zero dimension"});
  const auto zero_labels = write("zero-labels", label_bytes({}));
  expect_idx_error([&] { mep::data::read_idx_labels(zero_labels); }, zero_labels,
                   {"zero dimension"});
}

TEST_F(Idx, HugeHeaderDimsFailCleanly) {
  const auto overflow = write("overflow", image_bytes(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, kPixels));
  expect_idx_error([&] { mep::data::read_idx_images(overflow); }, overflow,
                   {"more data than can be loaded"});
  // Claims about 200 GB but holds 24 bytes: must report truncation, not try to allocate.
  const auto big = write("big-claim", image_bytes(0x10000000u, 28, 28, kPixels));
  expect_idx_error([&] { mep::data::read_idx_images(big); }, big, {"truncated file"});
}

TEST_F(Idx, MissingFileAndDirectory) {
  const std::string missing = (dir_ / "does-not-exist-idx3-ubyte").string();
  expect_idx_error([&] { mep::data::read_idx_images(missing); }, missing,
                   {"cannot open file", "no such file"});
  expect_idx_error([&] { mep::data::read_idx_labels(missing); }, missing,
                   {"cannot open file", "no such file"});
  const std::string dir = dir_.string();
  expect_idx_error([&] { mep::data::read_idx_images(dir); }, dir, {"is a directory"});
}

TEST_F(Idx, MismatchedCounts) {
  const auto images = valid_images();
  const auto labels = write("two-labels", label_bytes({1, 2}));
  expect_idx_error([&] { mep::data::load_idx(images, labels); }, images,
                   {"count mismatch", "3 images", "2 labels", "two-labels"});
}

TEST_F(Idx, LabelOutOfRange) {
  const auto images = valid_images();
  const auto labels = write("bad-labels", label_bytes({3, 10, 1}));
  expect_idx_error([&] { mep::data::load_idx(images, labels); }, labels,
                   {"label out of range", "index 1", "value 10", "[0, 9]"});
  // A larger max_label accepts the same file.
  const auto ds = mep::data::load_idx(images, labels, -1, 0.1307, 0.3081, /*max_label=*/10);
  EXPECT_EQ(ds.labels[1].item<int64_t>(), 10);
}

TEST_F(Idx, LimitHandling) {
  const auto images = valid_images();
  const auto labels = valid_labels();

  const auto all = mep::data::load_idx(images, labels);
  EXPECT_EQ(all.images.size(0), 3);
  EXPECT_EQ(all.labels.size(0), 3);

  const auto exact = mep::data::load_idx(images, labels, 3);
  EXPECT_EQ(exact.images.size(0), 3);

  const auto two = mep::data::load_idx(images, labels, 2);
  ASSERT_EQ(two.images.sizes(), (std::vector<int64_t>{2, 1, 2, 4}));
  ASSERT_EQ(two.labels.sizes(), (std::vector<int64_t>{2}));
  EXPECT_TRUE(torch::equal(two.images, all.images.narrow(0, 0, 2)));
  EXPECT_EQ(two.labels[0].item<int64_t>(), 0);
  EXPECT_EQ(two.labels[1].item<int64_t>(), 9);

  expect_idx_error([&] { mep::data::load_idx(images, labels, 4); }, images,
                   {"invalid limit 4", "the file has 3 samples"});
  expect_idx_error([&] { mep::data::load_idx(images, labels, 0); }, images, {"invalid limit 0"});
  expect_idx_error([&] { mep::data::load_idx(images, labels, -2); }, images, {"invalid limit -2"});
}

TEST_F(Idx, NormalisationMath) {
  const auto ds = mep::data::load_idx(valid_images(), valid_labels());
  ASSERT_EQ(ds.images.scalar_type(), torch::kFloat32);
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{3, 1, 2, 4}));
  ASSERT_EQ(ds.labels.scalar_type(), torch::kInt64);
  EXPECT_TRUE(ds.images.is_contiguous());

  const float white = ds.images[1][0][1][3].item<float>();  // pixel 255
  const float black = ds.images[0][0][0][0].item<float>();  // pixel 0
  const float mid = ds.images[1][0][0][0].item<float>();    // pixel 128
  EXPECT_NEAR(white, (1.0 - 0.1307) / 0.3081, 1e-5);
  EXPECT_NEAR(black, (0.0 - 0.1307) / 0.3081, 1e-5);
  EXPECT_NEAR(mid, (128.0 / 255.0 - 0.1307) / 0.3081, 1e-5);

  // Identity normalisation recovers pixel / 255.
  const auto raw = mep::data::load_idx(valid_images("i2"), valid_labels("l2"), -1, 0.0, 1.0);
  const auto expected =
      mep::data::read_idx_images(valid_images("i3")).to(torch::kFloat32).div(255.0).unsqueeze(1);
  EXPECT_TRUE(torch::allclose(raw.images, expected));

  expect_idx_error([&] { mep::data::load_idx(valid_images("i4"), valid_labels("l4"), -1, 0.0, 0.0); },
                   "i4", {"invalid normalisation"});
}

TEST_F(Idx, LoadSplitPlainAndGzip) {
  write("train-images-idx3-ubyte", image_bytes(3, 2, 4, kPixels));
  write("train-labels-idx1-ubyte", label_bytes(kLabels));
  write_gz("t10k-images-idx3-ubyte.gz", image_bytes(3, 2, 4, kPixels));
  write_gz("t10k-labels-idx1-ubyte.gz", label_bytes(kLabels));

  const auto train = mep::data::load_split(dir_.string(), true);
  const auto test = mep::data::load_split(dir_.string(), false);
  EXPECT_TRUE(torch::equal(train.images, test.images));
  EXPECT_TRUE(torch::equal(train.labels, test.labels));
  EXPECT_EQ(mep::data::load_split(dir_.string(), false, 1).images.size(0), 1);

  const fs::path empty = dir_ / "empty";
  fs::create_directories(empty);
  expect_idx_error([&] { mep::data::load_split(empty.string(), true); },
                   "train-images-idx3-ubyte", {"no such file"});
}

TEST_F(Idx, GzipErrors) {
  // Validation applies to the decompressed bytes.
  Bytes b = label_bytes(kLabels);
  b.push_back(0);
  const auto long_gz = write_gz("long-labels.gz", b);
  expect_idx_error([&] { mep::data::read_idx_labels(long_gz); }, long_gz,
                   {"over-long file", "file has 12 bytes"});

  // A gzip stream cut in half is reported, not crashed on.
  Bytes big_pixels(4 * 28 * 28);
  std::mt19937 rng(7);
  for (auto& p : big_pixels) p = static_cast<unsigned char>(rng());
  const auto whole = write_gz("whole.gz", image_bytes(4, 28, 28, big_pixels));
  std::ifstream in(whole, std::ios::binary);
  Bytes gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gz.resize(gz.size() / 2);
  const auto cut = write("cut-images.gz", gz);
  expect_idx_error([&] { mep::data::read_idx_images(cut); }, cut, {});
}

TEST_F(Idx, RealMnistSubset) {
  const char* src = std::getenv("MEP_SOURCE_DIR");
  if (src == nullptr) GTEST_SKIP() << "MEP_SOURCE_DIR not set";
  const fs::path mnist = fs::path(src) / "data" / "mnist";
  if (!fs::exists(mnist / "train-images-idx3-ubyte")) {
    GTEST_SKIP() << "no " << (mnist / "train-images-idx3-ubyte") << "; run data/make_datasets.sh";
  }
  const auto raw = mep::data::read_idx_images((mnist / "train-images-idx3-ubyte").string());
  ASSERT_EQ(raw.sizes(), (std::vector<int64_t>{8000, 28, 28}));
  EXPECT_EQ(raw.min().item<int>(), 0);
  EXPECT_EQ(raw.max().item<int>(), 255);

  const auto train = mep::data::load_split(mnist.string(), true);
  ASSERT_EQ(train.images.sizes(), (std::vector<int64_t>{8000, 1, 28, 28}));
  ASSERT_EQ(train.labels.sizes(), (std::vector<int64_t>{8000}));
  const auto counts = torch::bincount(train.labels, {}, 10);
  ASSERT_EQ(counts.size(0), 10);
  for (int64_t k = 0; k < 10; ++k) {
    EXPECT_GT(counts[k].item<int64_t>(), 500) << "class " << k;
  }
  EXPECT_NEAR(train.images.min().item<float>(), -0.1307 / 0.3081, 1e-5);
  EXPECT_NEAR(train.images.max().item<float>(), (1.0 - 0.1307) / 0.3081, 1e-5);
  const double mean_pixel = raw.to(torch::kFloat64).mean().item<double>() / 255.0;
  EXPECT_NEAR(mean_pixel, 0.1307, 0.02);  // real MNIST statistics

  const auto test = mep::data::load_split(mnist.string(), false);
  EXPECT_EQ(test.images.size(0), 2000);
}
