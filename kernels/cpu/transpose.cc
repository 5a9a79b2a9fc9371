// Swap of the last two axes of a float32 tensor, (B, R, C) -> (B, C, R), as a MindSpore AOT
// custom-operator entry point for the CPU.
//
// Why: the unfold convolutions change layouts around their products -- NCHW images to pixel
// rows and back, (O, C, taps) weights to tap-major columns and back -- and a MindSpore
// transpose followed by a reshape materialises through its strided copy kernel, which ran
// about 10x slower than a blocked transpose here (a 512x512x3x3 weight: 11.4 ms vs NumPy's
// 1.05 ms; NCHW (2, 64, 256, 256) to rows: 37 ms).
//
// Entry points (params: input, then output):
//   SwapLastAxes (x (..., R, C)) -> y (..., C, R),   y[b][c][r] = x[b][r][c] for every leading b
//   ToRowTable   (x (B, R, C...)) -> y (B * C + 1, R), y[b * C + c][r] = x[b][r][c], last row 0
// ToRowTable is an unfold convolution's row table of NCHW images (x = (N, C, H, W), read as
// (N, C, H*W): a reshaped view would be copied by MindSpore first): one row per pixel and a
// zero row that padding taps gather, written in one pass (a transpose followed by a
// concatenation copies the table twice).
#include <cstdint>
#include <cstring>

#include "aot_entry.h"
#include "shapes.h"
#include "transpose_tiles.h"

namespace {

// y (B, C, R) = x (B, R, C) with each transposed matrix written at y + b * R * C.
void TransposeEach(const float *x, int64_t batch, int64_t rows, int64_t cols, float *y) {
#pragma omp parallel
  for (int64_t b = 0; b < batch; ++b) {
    transpose_tiles::Shared(x + b * rows * cols, rows, cols, y + b * rows * cols);
  }
}

int SwapLastAxesImpl(int nparam, void **params, int *ndims, int64_t **shapes) {
  const int nd = ndims[0];
  if (nparam != 2 || nd < 2 || ndims[1] != nd) return 1;
  const int64_t batch = tensor_shape::Product(shapes[0], 0, nd - 2);
  const int64_t rows = shapes[0][nd - 2], cols = shapes[0][nd - 1];
  for (int d = 0; d < nd - 2; ++d) {
    if (shapes[1][d] != shapes[0][d]) return 1;
  }
  if (shapes[1][nd - 2] != cols || shapes[1][nd - 1] != rows) return 1;
  TransposeEach(static_cast<const float *>(params[0]), batch, rows, cols,
                static_cast<float *>(params[1]));
  return 0;
}

int ToRowTableImpl(int nparam, void **params, int *ndims, int64_t **shapes) {
  int64_t x[3];  // (N, C, H*W)
  if (nparam != 2 || tensor_shape::AsMatrixStack(ndims[0], shapes[0], x) != 3 ||
      ndims[1] != 2) {
    return 1;
  }
  const int64_t batch = x[0], rows = x[1], cols = x[2];
  if (shapes[1][0] != batch * cols + 1 || shapes[1][1] != rows) return 1;
  float *y = static_cast<float *>(params[1]);
  TransposeEach(static_cast<const float *>(params[0]), batch, rows, cols, y);
  std::memset(y + batch * cols * rows, 0, sizeof(float) * rows);
  return 0;
}

}  // namespace

AOT_ENTRY_FLOAT32(SwapLastAxes, SwapLastAxesImpl)
AOT_ENTRY_FLOAT32(ToRowTable, ToRowTableImpl)
