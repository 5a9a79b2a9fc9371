// Work over a set of tensors (every gradient, every parameter) cut into pieces of at most a
// fixed number of values, so that threads share it evenly even where one tensor holds most of
// the values (the box head's 12.8 M-weight FC among the detector's 44 M).
#ifndef INSTABOOST_KERNELS_CPU_TENSOR_CHUNKS_H_
#define INSTABOOST_KERNELS_CPU_TENSOR_CHUNKS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tensor_chunks {

// Values [start, start + count) of tensor `tensor`.
struct Chunk {
  int tensor;
  int64_t start, count;
};

// The chunks of tensors holding counts[0], counts[1], ... values, in order.
inline std::vector<Chunk> Split(const std::vector<int64_t> &counts, int64_t chunk_values) {
  std::vector<Chunk> chunks;
  for (int i = 0; i < static_cast<int>(counts.size()); ++i) {
    for (int64_t start = 0; start < counts[i]; start += chunk_values) {
      chunks.push_back({i, start, std::min(chunk_values, counts[i] - start)});
    }
  }
  return chunks;
}

}  // namespace tensor_chunks

#endif  // INSTABOOST_KERNELS_CPU_TENSOR_CHUNKS_H_
