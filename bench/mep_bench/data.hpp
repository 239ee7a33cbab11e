#pragma once
// The data of a run (the first --train/--test samples of the IDX files, normalised, on the
// training device) and the evaluation of a model on it.

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mep_bench {

/// Images and labels of one split.
struct Split {
  torch::Tensor x, y;
  int64_t size() const { return x.size(0); }
};

/// The training (`train`) or test split of the IDX files in `dir`: its first `limit` samples
/// (every one for -1), pixels normalised to (x/255 − normalize[0]) / normalize[1], on `device`.
Split load_split(const std::string& dir, bool train, int64_t limit, const std::vector<double>& normalize,
                 const torch::Device& device);

/// Cross-entropy and accuracy of a model on a whole split.
struct Eval {
  double loss = 0, acc = 0;
};

/// `model` in eval mode on `split`, in batches without gradients; leaves it in train mode.
Eval evaluate(torch::nn::Sequential& model, const Split& split);

}  // namespace mep_bench
