// Training-mode batch normalization over (N, C, spatial...) float32 tensors, optionally fused
// with a residual add and a ReLU, and its exact backward, as MindSpore AOT custom operators.
//
// Why: a ResNet-50's 53 batch norms at 512², batch 2 normalise about 0.5 GB of activations per
// step, and MindSpore's CPU BatchNorm, BatchNormGrad, ReLU, ReluGrad and add kernels each make
// their own passes over memory: the backbone's norms cost about 0.8 s of a 4.6 s step
// (measured by replacing them with the identity). Here each channel's values (N planes of
// H*W, 128 KB per map at 128², batch 2) are processed while they sit in the core's L2 cache:
// the forward reads x from memory once and writes y once; the backward reads x, dy (and y)
// once and writes dx (and the residual gradient) once.
//
// Entry points (params: inputs, then outputs; x, y, dy, dx: (N, C, ...); per channel: (C,)):
//   BatchNormTrain        (x, gamma, beta, running_mean, running_var, settings)
//                           -> y = bn(x), mean, var, new_running_mean, new_running_var
//   BatchNormReluTrain    (same inputs) -> y = max(bn(x), 0), and the same four
//   BatchNormAddReluTrain (x, residual, gamma, ...) -> y = max(bn(x) + residual, 0), the same
//   BatchNormTrainGrad        (x, dy, mean, var, gamma, settings)    -> dx, dgamma, dbeta
//   BatchNormReluTrainGrad    (x, dy, y, mean, var, gamma, settings) -> dx, dgamma, dbeta
//   BatchNormAddReluTrainGrad (x, dy, y, mean, var, gamma, settings) -> dx, dresidual, dgamma,
//                                                                       dbeta
// settings = (eps, momentum) float32. bn(x) = (x - mean) / sqrt(var + eps) * gamma + beta with
// the batch's mean and biased variance over N and the spatial axes (what MindSpore's BatchNorm
// uses in training). The running statistics are updated as MindSpore's BatchNorm updates them:
// new = (1 - momentum) * old + momentum * batch, with the unbiased batch variance (returned as
// new tensors for the caller to assign: one call instead of eight small operators per norm, 73
// ms per 512² step measured). The ReLU's gradient passes where y > 0.
// Sums are accumulated in float over blocks of kSumBlock values (vectorised) and in double
// across blocks; the variance is the mean squared deviation from the mean (two passes, not
// E[x²] - mean²).
#include <algorithm>
#include <initializer_list>
#include <cmath>
#include <cstdint>

#include "aot_entry.h"
#include "shapes.h"

namespace {

enum class Epilogue { kNone, kRelu, kAddRelu };

// Values per float partial sum: a double accumulator per value keeps the loop scalar (measured
// 4x slower than the memory traffic); float partials of 1024 values lose < 1e-6 relative.
constexpr int64_t kSumBlock = 1024;

// A (N, C, spatial...) tensor's layout: channel c of image n starts at (n * C + c) * plane.
struct Layout {
  int64_t images, channels, plane;
  int64_t Offset(int64_t n, int64_t c) const { return (n * channels + c) * plane; }
  int64_t PerChannel() const { return images * plane; }
};

bool ReadLayout(int ndim, const int64_t *shape, Layout *layout) {
  if (ndim < 2) return false;
  layout->images = shape[0];
  layout->channels = shape[1];
  layout->plane = tensor_shape::Product(shape, 2, ndim);
  return true;
}

// Whether the parameters' shapes are those of one batch norm over x (parameter 0): `like_x`
// are x's shape, `per_channel` are (C,), `settings` is (eps, momentum). A wrong call must fail
// here, not read or write past a tensor (the kernel reads the layout of x only).
bool ShapesMatch(int *ndims, int64_t **shapes, const Layout &layout,
                 std::initializer_list<int> like_x, std::initializer_list<int> per_channel,
                 int settings) {
  for (int i : like_x) {
    if (!tensor_shape::SameShape(ndims, shapes, 0, i)) return false;
  }
  for (int i : per_channel) {
    if (!tensor_shape::IsVector(ndims, shapes, i, layout.channels)) return false;
  }
  return tensor_shape::IsVector(ndims, shapes, settings, 2);
}

float InverseStd(float var, float eps) { return 1.0f / std::sqrt(var + eps); }

// max(v, 0) that keeps a NaN (a diverging step must reach the gradient check) and inlines
// (std::fmax is a libm call under strict floating-point semantics).
inline float Relu(float v) { return v < 0.0f ? 0.0f : v; }

// Sum of term(v) over the values v of channel c: float partial sums of kSumBlock values
// (vectorised), added up in double.
template <class Term>
double ChannelSum(const float *x, const Layout &layout, int64_t c, Term term) {
  double total = 0.0;
  for (int64_t n = 0; n < layout.images; ++n) {
    const float *xs = x + layout.Offset(n, c);
    for (int64_t start = 0; start < layout.plane; start += kSumBlock) {
      const int64_t end = std::min(layout.plane, start + kSumBlock);
      float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
      for (int64_t i = start; i < end; ++i) partial += term(xs[i]);
      total += partial;
    }
  }
  return total;
}

template <Epilogue E>
int ForwardImpl(int nparam, void **params, int *ndims, int64_t **shapes) {
  const bool add = E == Epilogue::kAddRelu;
  const int inputs = add ? 7 : 6;
  if (nparam != inputs + 5) return 1;
  Layout layout;
  if (!ReadLayout(ndims[0], shapes[0], &layout)) return 1;
  // x [residual] gamma beta running_mean running_var settings | y mean var new_mean new_var
  const int o = add ? 1 : 0;
  if (!ShapesMatch(ndims, shapes, layout,
                   add ? std::initializer_list<int>{1, 7} : std::initializer_list<int>{6},
                   {1 + o, 2 + o, 3 + o, 4 + o, 7 + o, 8 + o, 9 + o, 10 + o}, 5 + o)) {
    return 1;
  }
  int p = 0;
  const float *x = static_cast<const float *>(params[p++]);
  const float *residual = add ? static_cast<const float *>(params[p++]) : nullptr;
  const float *gamma = static_cast<const float *>(params[p++]);
  const float *beta = static_cast<const float *>(params[p++]);
  const float *running_mean = static_cast<const float *>(params[p++]);
  const float *running_var = static_cast<const float *>(params[p++]);
  const float *settings = static_cast<const float *>(params[p++]);
  const float eps = settings[0], momentum = settings[1];
  float *y = static_cast<float *>(params[p++]);
  float *mean_out = static_cast<float *>(params[p++]);
  float *var_out = static_cast<float *>(params[p++]);
  float *new_running_mean = static_cast<float *>(params[p++]);
  float *new_running_var = static_cast<float *>(params[p++]);
  const int64_t count = layout.PerChannel();
  if (count == 0) return 1;
  const float unbiased =
      static_cast<float>(count) / static_cast<float>(std::max<int64_t>(count - 1, 1));

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < layout.channels; ++c) {
    const float mean = static_cast<float>(ChannelSum(x, layout, c, [](float v) { return v; }) /
                                          count);
    const double squares = ChannelSum(x, layout, c, [mean](float v) {
      const float d = v - mean;
      return d * d;
    });
    const float var = static_cast<float>(squares / count);
    const float scale = gamma[c] * InverseStd(var, eps);
    const float shift = beta[c];
    for (int64_t n = 0; n < layout.images; ++n) {
      const int64_t offset = layout.Offset(n, c);
      const float *xs = x + offset;
      float *ys = y + offset;
      if (E == Epilogue::kNone) {
#pragma omp simd
        for (int64_t i = 0; i < layout.plane; ++i) ys[i] = (xs[i] - mean) * scale + shift;
      } else if (E == Epilogue::kRelu) {
#pragma omp simd
        for (int64_t i = 0; i < layout.plane; ++i) {
          ys[i] = Relu((xs[i] - mean) * scale + shift);
        }
      } else {
        const float *rs = residual + offset;
#pragma omp simd
        for (int64_t i = 0; i < layout.plane; ++i) {
          ys[i] = Relu((xs[i] - mean) * scale + shift + rs[i]);
        }
      }
    }
    mean_out[c] = mean;
    var_out[c] = var;
    new_running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
    new_running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (var * unbiased);
  }
  return 0;
}

// With g = dy (times the ReLU's mask y > 0), xc = x - mean, s = 1 / sqrt(var + eps):
//   dbeta = sum g, dgamma = s * sum g * xc,
//   dx = gamma * s * (g - dbeta / M - xc * s * dgamma / M)   (M values per channel).
template <Epilogue E>
int BackwardImpl(int nparam, void **params, int *ndims, int64_t **shapes) {
  const bool masked = E != Epilogue::kNone;
  const bool add = E == Epilogue::kAddRelu;
  const int inputs = masked ? 7 : 6;
  if (nparam != inputs + (add ? 4 : 3)) return 1;
  Layout layout;
  if (!ReadLayout(ndims[0], shapes[0], &layout)) return 1;
  // x dy [y] mean var gamma settings | dx [dresidual] dgamma dbeta
  const int m = masked ? 1 : 0, r = add ? 1 : 0;
  // (The lists are arguments of the call: their arrays live until it returns.)
  if (!ShapesMatch(ndims, shapes, layout,
                   add ? std::initializer_list<int>{1, 2, 7, 8}
                       : (masked ? std::initializer_list<int>{1, 2, 7}
                                 : std::initializer_list<int>{1, 6}),
                   {2 + m, 3 + m, 4 + m, 7 + m + r, 8 + m + r}, 5 + m)) {
    return 1;
  }
  int p = 0;
  const float *x = static_cast<const float *>(params[p++]);
  const float *dy = static_cast<const float *>(params[p++]);
  const float *y = masked ? static_cast<const float *>(params[p++]) : nullptr;
  const float *mean = static_cast<const float *>(params[p++]);
  const float *var = static_cast<const float *>(params[p++]);
  const float *gamma = static_cast<const float *>(params[p++]);
  const float eps = static_cast<const float *>(params[p++])[0];   // settings: (eps, momentum)
  float *dx = static_cast<float *>(params[p++]);
  // The masked gradient g: the residual's gradient with the add, else written into dx first.
  float *g_out = add ? static_cast<float *>(params[p++]) : dx;
  float *dgamma = static_cast<float *>(params[p++]);
  float *dbeta = static_cast<float *>(params[p++]);
  const int64_t count = layout.PerChannel();
  if (count == 0) return 1;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c = 0; c < layout.channels; ++c) {
    const float m = mean[c];
    double sum_g = 0.0, sum_gx = 0.0;
    for (int64_t n = 0; n < layout.images; ++n) {
      const int64_t offset = layout.Offset(n, c);
      const float *xs = x + offset;
      const float *dys = dy + offset;
      const float *ys = masked ? y + offset : nullptr;
      float *gs = masked ? g_out + offset : nullptr;
      for (int64_t start = 0; start < layout.plane; start += kSumBlock) {
        const int64_t end = std::min(layout.plane, start + kSumBlock);
        float partial_g = 0.0f, partial_gx = 0.0f;
        if (masked) {
#pragma omp simd reduction(+ : partial_g, partial_gx)
          for (int64_t i = start; i < end; ++i) {
            const float g = ys[i] > 0.0f ? dys[i] : 0.0f;
            gs[i] = g;
            partial_g += g;
            partial_gx += g * (xs[i] - m);
          }
        } else {
#pragma omp simd reduction(+ : partial_g, partial_gx)
          for (int64_t i = start; i < end; ++i) {
            partial_g += dys[i];
            partial_gx += dys[i] * (xs[i] - m);
          }
        }
        sum_g += partial_g;
        sum_gx += partial_gx;
      }
    }
    const float s = InverseStd(var[c], eps);
    const float beta_grad = static_cast<float>(sum_g);
    const float gamma_grad = static_cast<float>(sum_gx) * s;
    const float scale = gamma[c] * s;
    const float mean_g = beta_grad / count;
    const float slope = s * gamma_grad / count;
    for (int64_t n = 0; n < layout.images; ++n) {
      const int64_t offset = layout.Offset(n, c);
      const float *xs = x + offset;
      // Masked: g was stored above (in dx itself, or in the residual gradient).
      const float *gs = masked ? g_out + offset : dy + offset;
      float *dxs = dx + offset;
#pragma omp simd
      for (int64_t i = 0; i < layout.plane; ++i) {
        dxs[i] = scale * (gs[i] - mean_g - (xs[i] - m) * slope);
      }
    }
    dgamma[c] = gamma_grad;
    dbeta[c] = beta_grad;
  }
  return 0;
}

}  // namespace

AOT_ENTRY_FLOAT32(BatchNormTrain, ForwardImpl<Epilogue::kNone>)
AOT_ENTRY_FLOAT32(BatchNormReluTrain, ForwardImpl<Epilogue::kRelu>)
AOT_ENTRY_FLOAT32(BatchNormAddReluTrain, ForwardImpl<Epilogue::kAddRelu>)
AOT_ENTRY_FLOAT32(BatchNormTrainGrad, BackwardImpl<Epilogue::kNone>)
AOT_ENTRY_FLOAT32(BatchNormReluTrainGrad, BackwardImpl<Epilogue::kRelu>)
AOT_ENTRY_FLOAT32(BatchNormAddReluTrainGrad, BackwardImpl<Epilogue::kAddRelu>)
