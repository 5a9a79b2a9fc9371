// Cache-blocked matrix transposition shared by the kernels (header only: each kernel library
// is built from one source file, which includes this; the build hash covers kernels/cpu/*.h).
#ifndef INSTABOOST_KERNELS_CPU_TRANSPOSE_TILES_H_
#define INSTABOOST_KERNELS_CPU_TRANSPOSE_TILES_H_

#include <algorithm>
#include <cstdint>

namespace transpose_tiles {

constexpr int64_t kTile = 16;

// One kTile x kTile tile of dst = src^T (src rows r0.., columns c0..; ld = row strides).
inline void Tile(const float *src, int64_t src_ld, int64_t rows, int64_t cols, int64_t r0,
                 int64_t c0, float *dst, int64_t dst_ld) {
  const int64_t r1 = std::min(rows, r0 + kTile), c1 = std::min(cols, c0 + kTile);
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = r0; r < r1; ++r) dst[c * dst_ld + r] = src[r * src_ld + c];
  }
}

// dst (cols, rows) = src (rows, cols)^T, tile by tile: both sides stay within a few cache lines
// per tile, where a plain double loop strides across one of them.
inline void Serial(const float *src, int64_t src_ld, int64_t rows, int64_t cols, float *dst,
                   int64_t dst_ld) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) Tile(src, src_ld, rows, cols, r0, c0, dst, dst_ld);
  }
}

// The same for contiguous matrices, its tiles shared among the threads of the enclosing
// parallel region.
inline void Shared(const float *src, int64_t rows, int64_t cols, float *dst) {
#pragma omp for collapse(2) schedule(static) nowait
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) Tile(src, cols, rows, cols, r0, c0, dst, rows);
  }
}

}  // namespace transpose_tiles

#endif  // INSTABOOST_KERNELS_CPU_TRANSPOSE_TILES_H_
