// Patch matrices of a 2-D convolution (im2col) and their adjoint (col2im) for the CPU, as
// MindSpore AOT custom-operator entry points (float32 NCHW, groups 1).
//
// Why: the unfold convolutions that Winograd does not cover (the 7x7 stem, the stride-2 3x3
// convolutions, 3x3 convolutions on maps too small for Winograd) built their patch matrices
// from MindSpore operators: a transposed row table, a row gather of C floats per tap, and in
// the backward an unsorted segment sum and a transpose back, plus the contiguous copies that
// MindSpore makes of the views in between. At 512^2, batch 2, those layers took 0.55 s of a
// 4.0 s train step for 0.17 s of products. Here one pass writes the patch matrix in the
// layout the matmul kernel reads, and one pass sums its gradient back onto the image.
//
// Layout: rows are (channel, tap_y, tap_x), the order of a weight (O, C, kh, kw) read as the
// matrix (O, C*kh*kw); columns are output pixels. So Y[n] (O, Ho*Wo) = W · cols[n] is the NCHW
// output as it is (no transposition of weight or output), dW = sum_n dY[n] · cols[n]^T and
// dcols[n] = W^T · dY[n].
//
// Entry points:
//   Im2Col (x (N, C, H, W), geometry)                   -> cols (N, C*kh*kw, Ho, Wo)
//   Col2Im (x (N, C, H, W), dcols (N, C*kh*kw, Ho, Wo), geometry) -> dx (N, C, H, W)
// cols[n][(c*kh + i)*kw + j][oy][ox] = x[n][c][oy*sh - ph + i][ox*sw - pw + j], 0 in the padding;
// Col2Im is its adjoint. The geometry is a float32 tensor's *shape*,
// (kh, kw, sh, sw, ph + 1, pw + 1) (its values are not read), and Col2Im reads x for its shape only: MindSpore infers an AOT
// op's output shape from its input shapes alone and caches it by entry point and input
// shapes, across operator instances, so the inputs' shapes must determine the output's (a
// geometry in a tensor's values gave one convolution the cached shape of another).
// Returns 1 for a wrong dtype or inconsistent shapes, 2 for an invalid geometry.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "aot_entry.h"
#include "shapes.h"

namespace {

struct Geometry {
  int64_t n, c, h, w;          // input
  int64_t kh, kw, sh, sw, ph, pw;
  int64_t oh, ow;              // output
  int64_t Rows() const { return c * kh * kw; }
};

// Reads the input shape and the geometry tensor's shape; false for an invalid geometry.
bool ReadGeometry(const int64_t *x_shape, int geometry_ndim, const int64_t *geometry,
                  Geometry *g) {
  if (geometry_ndim != 6) return false;
  g->n = x_shape[0];
  g->c = x_shape[1];
  g->h = x_shape[2];
  g->w = x_shape[3];
  g->kh = geometry[0];
  g->kw = geometry[1];
  g->sh = geometry[2];
  g->sw = geometry[3];
  g->ph = geometry[4] - 1;
  g->pw = geometry[5] - 1;
  if (g->kh < 1 || g->kw < 1 || g->sh < 1 || g->sw < 1 || g->ph < 0 || g->pw < 0 ||
      g->h + 2 * g->ph < g->kh || g->w + 2 * g->pw < g->kw) {
    return false;
  }
  g->oh = (g->h + 2 * g->ph - g->kh) / g->sh + 1;
  g->ow = (g->w + 2 * g->pw - g->kw) / g->sw + 1;
  return true;
}

bool MatchesCols(const Geometry &g, int ndim, const int64_t *shape) {
  return ndim == 4 && shape[0] == g.n && shape[1] == g.Rows() && shape[2] == g.oh &&
         shape[3] == g.ow;
}

// Output columns [first, last) of tap offset `offset` (= tap - pad) that read inside a line of
// `size` pixels at `stride`: first = ceil(-offset / stride), last = ceil((size - offset) / stride).
void InsideRange(int64_t offset, int64_t size, int64_t stride, int64_t outputs, int64_t *first,
                 int64_t *last) {
  const auto ceil_div = [](int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -(-a / b); };
  *first = std::clamp<int64_t>(ceil_div(-offset, stride), 0, outputs);
  *last = std::clamp<int64_t>(ceil_div(size - offset, stride), *first, outputs);
}

int Im2Col(int nparam, void **params, int *ndims, int64_t **shapes) {
  if (nparam != 3 || ndims[0] != 4) return 1;
  Geometry g;
  if (!ReadGeometry(shapes[0], ndims[1], shapes[1], &g)) return 2;
  if (!MatchesCols(g, ndims[2], shapes[2])) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *cols = static_cast<float *>(params[2]);
  const int64_t rows = g.n * g.Rows(), pixels = g.oh * g.ow;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t j = row % g.kw, i = row / g.kw % g.kh, c = row / (g.kw * g.kh) % g.c;
    const int64_t image = row / g.Rows();
    const float *plane = x + (image * g.c + c) * g.h * g.w;
    float *dst = cols + row * pixels;
    const int64_t shift = j - g.pw;
    int64_t x0, x1;
    InsideRange(shift, g.w, g.sw, g.ow, &x0, &x1);
    for (int64_t oy = 0; oy < g.oh; ++oy, dst += g.ow) {
      const int64_t iy = oy * g.sh - g.ph + i;
      if (iy < 0 || iy >= g.h) {
        std::memset(dst, 0, sizeof(float) * g.ow);
        continue;
      }
      const float *line = plane + iy * g.w;   // column ox reads line[ox * sw + shift]
      std::memset(dst, 0, sizeof(float) * x0);
      if (g.sw == 1) {
        std::memcpy(dst + x0, line + x0 + shift, sizeof(float) * (x1 - x0));
      } else {
        for (int64_t ox = x0; ox < x1; ++ox) dst[ox] = line[ox * g.sw + shift];
      }
      std::memset(dst + x1, 0, sizeof(float) * (g.ow - x1));
    }
  }
  return 0;
}

int Col2Im(int nparam, void **params, int *ndims, int64_t **shapes) {
  if (nparam != 4 || ndims[0] != 4 || !tensor_shape::SameShape(ndims, shapes, 0, 3)) return 1;
  Geometry g;
  if (!ReadGeometry(shapes[0], ndims[2], shapes[2], &g)) return 2;
  if (!MatchesCols(g, ndims[1], shapes[1])) return 1;
  const float *dcols = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t planes = g.n * g.c, pixels = g.oh * g.ow, taps = g.kh * g.kw;
  // One plane per task: its taps' rows all add into it, so no two threads share an entry.
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    float *plane = dx + p * g.h * g.w;
    std::memset(plane, 0, sizeof(float) * g.h * g.w);
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int64_t i = tap / g.kw, j = tap % g.kw;
      const float *src = dcols + (p * taps + tap) * pixels;
      const int64_t shift = j - g.pw;
      int64_t x0, x1;
      InsideRange(shift, g.w, g.sw, g.ow, &x0, &x1);
      for (int64_t oy = 0; oy < g.oh; ++oy, src += g.ow) {
        const int64_t iy = oy * g.sh - g.ph + i;
        if (iy < 0 || iy >= g.h) continue;
        float *line = plane + iy * g.w;   // column ox adds to line[ox * sw + shift]
        if (g.sw == 1) {
#pragma omp simd
          for (int64_t ox = x0; ox < x1; ++ox) line[ox + shift] += src[ox];
        } else {
          for (int64_t ox = x0; ox < x1; ++ox) line[ox * g.sw + shift] += src[ox];
        }
      }
    }
  }
  return 0;
}

}  // namespace

AOT_ENTRY_FLOAT32(Im2Col, Im2Col)
AOT_ENTRY_FLOAT32(Col2Im, Col2Im)
