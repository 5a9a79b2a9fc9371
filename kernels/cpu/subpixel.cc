// 2x2 sub-pixel layout operations for the CPU (float32), each with its adjoint, as MindSpore AOT
// custom-operator entry points: the interleave (depth-to-space) of the mask head's
// deconvolution, and the stride-2 subsampling of the strided 1x1 convolutions.
//
// Why: the mask head's 2x2 stride-2 transposed convolution is one matrix product to the four
// sub-pixel maps P[n][o][a][b] (each H x W) followed by this interleave,
//   Y[n][o][2i + a][2j + b] = P[n][o][a][b][i][j],
// a pure permutation. Expressed with MindSpore ops it is a 6-D transpose or a gather of
// W-float rows (14 floats for the mask head), which copy at well under 1 GB/s on the CPU
// backend (0.15-0.45 s per training step measured); here it is one pass over memory.
//
// The subsampling x[:, :, ::2, ::2] feeds the 1x1 stride-2 convolutions of the ResNet's
// downsampling branches. MindSpore's StridedSlice returns a view that is copied element by
// element before the matmul kernel gets it, and its gradient is as slow: 11.5 ms forward and
// about 25 ms backward for a (2, 256, 128, 128) map (measured), one pass over memory here.
//
// Entry points (params: inputs, then output):
//   Interleave2x2        (P (N, 4*O, H, W))  -> Y (N, O, 2H, 2W)
//   Interleave2x2Adjoint (dY (N, O, 2H, 2W)) -> dP (N, 4*O, H, W)   (the inverse)
//   Subsample2x2         (x (N, C, H, W))    -> xs (N, C, ceil(H/2), ceil(W/2)) = x[..., ::2, ::2]
//   Subsample2x2Adjoint  (x, dxs)            -> dx (N, C, H, W): dxs at even (row, column), 0
//                                               elsewhere (x only for its shape, not read)
// P's channels are ordered (o, a, b): the product's output rows as they come, 4-D so that no
// reshape stands between the two (MindSpore copies a reshaped view before a custom op).
#include <cstdint>
#include <cstring>

#include "aot_entry.h"

namespace {

constexpr int kFactor = 2;

// Planes (N * O) and the sub-pixel map size H x W; false for a wrong shape.
bool ReadShapes(int nparam, int *ndims, int64_t **shapes, bool adjoint, int64_t *planes,
                int64_t *height, int64_t *width) {
  if (nparam != 2) return false;
  const int maps = adjoint ? 1 : 0, image = adjoint ? 0 : 1;
  if (ndims[maps] != 4 || ndims[image] != 4) return false;
  const int64_t *m = shapes[maps], *y = shapes[image];
  if (m[0] != y[0] || m[1] != kFactor * kFactor * y[1] || y[2] != kFactor * m[2] ||
      y[3] != kFactor * m[3]) {
    return false;
  }
  *planes = y[0] * y[1];
  *height = m[2];
  *width = m[3];
  return true;
}

// Copies between one plane's sub-pixel maps (2, 2, H, W) and its image (2H, 2W).
template <bool kToImage>
void Permute(float *maps, float *image, int64_t height, int64_t width) {
  const int64_t map_size = height * width, image_width = kFactor * width;
  for (int64_t i = 0; i < height; ++i) {
    for (int a = 0; a < kFactor; ++a) {
      float *row = image + (kFactor * i + a) * image_width;
      float *left = maps + (a * kFactor) * map_size + i * width;   // b = 0
      float *right = left + map_size;                               // b = 1
      for (int64_t j = 0; j < width; ++j) {
        if (kToImage) {
          row[2 * j] = left[j];
          row[2 * j + 1] = right[j];
        } else {
          left[j] = row[2 * j];
          right[j] = row[2 * j + 1];
        }
      }
    }
  }
}

template <bool kToImage>
int Run(int nparam, void **params, int *ndims, int64_t **shapes) {
  int64_t planes, height, width;
  if (!ReadShapes(nparam, ndims, shapes, !kToImage, &planes, &height, &width)) return 1;
  float *maps = static_cast<float *>(params[kToImage ? 0 : 1]);
  float *image = static_cast<float *>(params[kToImage ? 1 : 0]);
  const int64_t plane_size = kFactor * kFactor * height * width;
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    Permute<kToImage>(maps + plane * plane_size, image + plane * plane_size, height, width);
  }
  return 0;
}

// Planes (N * C), full and subsampled sizes of Subsample2x2 (adjoint: its x, dxs, dx); false
// for a wrong shape.
bool ReadSubsampleShapes(int nparam, int *ndims, int64_t **shapes, bool adjoint,
                         int64_t *planes, int64_t full[2], int64_t half[2]) {
  if (nparam != (adjoint ? 3 : 2)) return false;
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] != 4) return false;
  }
  const int64_t *x = shapes[0], *xs = shapes[1];
  for (int d = 0; d < 2; ++d) {
    full[d] = x[2 + d];
    half[d] = (full[d] + 1) / kFactor;
    if (xs[2 + d] != half[d] || xs[d] != x[d]) return false;
  }
  if (adjoint) {
    for (int d = 0; d < 4; ++d) {
      if (shapes[2][d] != x[d]) return false;
    }
  }
  *planes = x[0] * x[1];
  return true;
}

template <bool kAdjoint>
int Subsample(int nparam, void **params, int *ndims, int64_t **shapes) {
  int64_t planes, full[2], half[2];
  if (!ReadSubsampleShapes(nparam, ndims, shapes, kAdjoint, &planes, full, half)) {
    return 1;
  }
  const int64_t full_size = full[0] * full[1], half_size = half[0] * half[1];
#pragma omp parallel for schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    if (!kAdjoint) {
      const float *x = static_cast<const float *>(params[0]) + plane * full_size;
      float *xs = static_cast<float *>(params[1]) + plane * half_size;
      for (int64_t i = 0; i < half[0]; ++i) {
        const float *row = x + kFactor * i * full[1];
        for (int64_t j = 0; j < half[1]; ++j) xs[i * half[1] + j] = row[kFactor * j];
      }
    } else {
      const float *dxs = static_cast<const float *>(params[1]) + plane * half_size;
      float *dx = static_cast<float *>(params[2]) + plane * full_size;
      std::memset(dx, 0, sizeof(float) * full_size);
      for (int64_t i = 0; i < half[0]; ++i) {
        float *row = dx + kFactor * i * full[1];
        for (int64_t j = 0; j < half[1]; ++j) row[kFactor * j] = dxs[i * half[1] + j];
      }
    }
  }
  return 0;
}

}  // namespace

AOT_ENTRY_FLOAT32(Interleave2x2, Run<true>)
AOT_ENTRY_FLOAT32(Interleave2x2Adjoint, Run<false>)
AOT_ENTRY_FLOAT32(Subsample2x2, Subsample<false>)
AOT_ENTRY_FLOAT32(Subsample2x2Adjoint, Subsample<true>)
