// 3x3 max pooling with stride 2 and padding 1 (the ResNet stem's) for the CPU (float32, NCHW),
// and its gradient, as MindSpore AOT custom-operator entry points.
//
// Why: MindSpore 2.10's CPU MaxPool took 87.5 ms forward and 120 ms forward + backward for the
// stem's (2, 64, 256, 256) map at 512² (measured); here each is one pass over memory.
//
// Entry points (params: inputs, then output):
//   MaxPool3x3Stride2     (x (N, C, H, W))     -> y (N, C, Ho, Wo), Ho = (H - 1) / 2 + 1
//   MaxPool3x3Stride2Grad (x, dy (N, C, Ho, Wo)) -> dx (N, C, H, W)
// y[i][j] is the maximum of x over rows 2i-1 .. 2i+1 and columns 2j-1 .. 2j+1 inside the map
// (the padding never wins). The gradient goes to the window's first maximum in row-major order
// (ties after a ReLU are common: all zeros), found again from x, so no index tensor is kept;
// overlapping windows add up. A NaN in a window is its maximum, so it propagates to y.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot_entry.h"

namespace {

constexpr int64_t kKernel = 3, kStride = 2, kPadding = 1;

struct PoolShape {
  int64_t planes, height, width, out_height, out_width;
};

bool ReadShape(int nparam, int *ndims, int64_t **shapes, bool grad, PoolShape *s) {
  if (nparam != (grad ? 3 : 2)) return false;
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] != 4) return false;
  }
  const int64_t *x = shapes[0], *y = shapes[1];
  s->planes = x[0] * x[1];
  s->height = x[2];
  s->width = x[3];
  s->out_height = (x[2] + 2 * kPadding - kKernel) / kStride + 1;
  s->out_width = (x[3] + 2 * kPadding - kKernel) / kStride + 1;
  if (s->height < 1 || s->width < 1) return false;
  if (y[0] != x[0] || y[1] != x[1] || y[2] != s->out_height || y[3] != s->out_width) {
    return false;
  }
  if (grad) {
    for (int d = 0; d < 4; ++d) {
      if (shapes[2][d] != x[d]) return false;
    }
  }
  return true;
}

// Whether value v replaces the current maximum m met before it: v is larger, or a NaN where m
// is not (a NaN then stays: no comparison with it is true). Ties keep the earlier value.
inline bool Replaces(float v, float m) { return m == m && (v > m || v != v); }

// Rows (or columns) [first, last) of window `index` along an axis of `size` pixels.
inline void WindowRange(int64_t index, int64_t size, int64_t *first, int64_t *last) {
  *first = std::max<int64_t>(index * kStride - kPadding, 0);
  *last = std::min<int64_t>(index * kStride - kPadding + kKernel, size);
}

// For output row i of one plane: each column's maximum over the window's rows
// (`column_max`, `width` floats) and, with kRows, the first of those rows holding it
// (`column_row`, offsets from the window's first row); contiguous, vectorised. Returns the
// window's first row.
template <bool kRows>
int64_t ColumnMaxima(const float *x, const PoolShape &s, int64_t i, float *column_max,
                     int32_t *column_row) {
  int64_t r0, r1;
  WindowRange(i, s.height, &r0, &r1);
  std::memcpy(column_max, x + r0 * s.width, sizeof(float) * s.width);
  if (kRows) std::fill(column_row, column_row + s.width, 0);
  for (int64_t r = r0 + 1; r < r1; ++r) {
    const float *row = x + r * s.width;
    const int32_t offset = static_cast<int32_t>(r - r0);
#pragma omp simd
    for (int64_t c = 0; c < s.width; ++c) {
      const bool take = Replaces(row[c], column_max[c]);
      column_max[c] = take ? row[c] : column_max[c];
      if (kRows) column_row[c] = take ? offset : column_row[c];
    }
  }
  return r0;
}

inline float MaxKeepNan(float m, float v) { return Replaces(v, m) ? v : m; }

// One plane: the column maxima of each output row, then the maximum over each window's
// columns. `column_max` holds `width` floats.
void PoolPlane(const float *x, float *y, const PoolShape &s, float *column_max) {
  for (int64_t i = 0; i < s.out_height; ++i) {
    ColumnMaxima<false>(x, s, i, column_max, nullptr);
    float *out = y + i * s.out_width;
    // Windows j in [1, last_inside] cover columns 2j-1 .. 2j+1, all inside the map.
    const int64_t last_inside = std::min<int64_t>(s.out_width - 1, (s.width - 2) / 2);
#pragma omp simd
    for (int64_t j = 1; j <= last_inside; ++j) {
      const float *w = column_max + 2 * j - 1;
      out[j] = MaxKeepNan(MaxKeepNan(w[0], w[1]), w[2]);
    }
    // The border windows (the first; the last ones when the map's width is odd or small).
    auto border_window = [&](int64_t j) {
      int64_t c0, c1;
      WindowRange(j, s.width, &c0, &c1);
      float m = column_max[c0];
      for (int64_t c = c0 + 1; c < c1; ++c) m = MaxKeepNan(m, column_max[c]);
      out[j] = m;
    };
    border_window(0);
    for (int64_t j = std::max<int64_t>(last_inside + 1, 1); j < s.out_width; ++j) {
      border_window(j);
    }
  }
}

int Forward(int nparam, void **params, int *ndims, int64_t **shapes) {
  PoolShape s;
  if (!ReadShape(nparam, ndims, shapes, false, &s)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
#pragma omp parallel
  {
    std::vector<float> column_max(static_cast<size_t>(s.width));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < s.planes; ++p) {
      PoolPlane(x + p * s.height * s.width, y + p * s.out_height * s.out_width, s,
                column_max.data());
    }
  }
  return 0;
}

// One plane's gradient: per window, of its columns holding the window's maximum the one whose
// maximum sits at the smallest row (then the leftmost) -- the window's first maximum in
// row-major order.
void PoolPlaneGrad(const float *x, const float *dy, float *dx, const PoolShape &s,
                   float *column_max, int32_t *column_row) {
  std::memset(dx, 0, sizeof(float) * s.height * s.width);
  for (int64_t i = 0; i < s.out_height; ++i) {
    const int64_t r0 = ColumnMaxima<true>(x, s, i, column_max, column_row);
    for (int64_t j = 0; j < s.out_width; ++j) {
      int64_t c0, c1;
      WindowRange(j, s.width, &c0, &c1);
      int64_t best = c0;
      for (int64_t c = c0 + 1; c < c1; ++c) {
        const float v = column_max[c], m = column_max[best];
        const bool same = v == m || (v != v && m != m);
        if (Replaces(v, m) || (same && column_row[c] < column_row[best])) best = c;
      }
      dx[(r0 + column_row[best]) * s.width + best] += dy[i * s.out_width + j];
    }
  }
}

int Backward(int nparam, void **params, int *ndims, int64_t **shapes) {
  PoolShape s;
  if (!ReadShape(nparam, ndims, shapes, true, &s)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t in_size = s.height * s.width, out_size = s.out_height * s.out_width;
#pragma omp parallel
  {
    std::vector<float> column_max(static_cast<size_t>(s.width));
    std::vector<int32_t> column_row(static_cast<size_t>(s.width));
#pragma omp for schedule(static)
    for (int64_t p = 0; p < s.planes; ++p) {
      PoolPlaneGrad(x + p * in_size, dy + p * out_size, dx + p * in_size, s, column_max.data(),
                    column_row.data());
    }
  }
  return 0;
}

}  // namespace

AOT_ENTRY_FLOAT32(MaxPool3x3Stride2, Forward)
AOT_ENTRY_FLOAT32(MaxPool3x3Stride2Grad, Backward)
