// Multi-level RoIAlign for the CPU (float32, NCHW feature maps), forward and its exact adjoint,
// as MindSpore AOT custom-operator entry points.
//
// Why: the gather formulation of RoIAlign in MindSpore ops materialises every bilinear tap of
// every bin and channel (for the mask head's 256 RoIs x 14 x 14 bins x 16 taps x 256 channels,
// 0.8 GB) and its backward scatters them back with a segment sum; here each output value reads
// its taps straight from the feature map, and the backward accumulates straight into it.
//
// The sampling grid (which feature rows/columns each bin reads, with which weight) is computed
// by the caller (instaboost/models/roi_extractor.py), so both implementations share one
// definition of RoIAlign's geometry: per RoI n, bin row i and tap a, `y[n][i][a]` is a row of
// the RoI's level map and `wy[n][i][a]` its weight (bilinear weight x 1/sampling_ratio, 0 for
// samples outside the map); likewise `x`, `wx` for columns. Then
//   out[n][c][i][j] = sum_a sum_b wy[n][i][a] * wx[n][j][b] * F_level(n)[batch(n)][c][y][x].
//
// Entry points (params: inputs, then outputs):
//   RoIAlignForward  (F_0..F_{L-1}, level (N), batch (N), y, wy, x, wx (N,S,T))  -> out (N,C,S,S)
//   RoIAlignBackward (dout, level, batch, y, wy, x, wx, F_0..F_{L-1})          -> dF_0..dF_{L-1}
// F_l only give their shapes to the backward pass (MindSpore infers an AOT op's output shapes
// from its input shapes). level/batch/y/x are int32, everything else float32.
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kGridInputs = 6;  // level, batch, y, wy, x, wx

struct Grid {
  int64_t rois, bins, taps;
  const int32_t *level, *batch, *y, *x;
  const float *wy, *wx;
};

struct Level {
  float *data;
  int64_t images, channels, height, width;
};

bool ReadGrid(void **params, int *ndims, int64_t **shapes, const char **dtypes, int first,
              Grid *g) {
  const char *expected[kGridInputs] = {"int32", "int32", "int32", "float32", "int32", "float32"};
  for (int i = 0; i < kGridInputs; ++i) {
    if (std::strcmp(dtypes[first + i], expected[i]) != 0) return false;
  }
  if (ndims[first] != 1 || ndims[first + 1] != 1 || ndims[first + 2] != 3) return false;
  g->rois = shapes[first][0];
  g->bins = shapes[first + 2][1];
  g->taps = shapes[first + 2][2];
  if (shapes[first + 1][0] != g->rois) return false;
  for (int i = 2; i < kGridInputs; ++i) {
    if (ndims[first + i] != 3 || shapes[first + i][0] != g->rois ||
        shapes[first + i][1] != g->bins || shapes[first + i][2] != g->taps) {
      return false;
    }
  }
  g->level = static_cast<const int32_t *>(params[first]);
  g->batch = static_cast<const int32_t *>(params[first + 1]);
  g->y = static_cast<const int32_t *>(params[first + 2]);
  g->wy = static_cast<const float *>(params[first + 3]);
  g->x = static_cast<const int32_t *>(params[first + 4]);
  g->wx = static_cast<const float *>(params[first + 5]);
  return true;
}

bool ReadLevels(void **params, int *ndims, int64_t **shapes, const char **dtypes, int first,
                int count, std::vector<Level> *levels) {
  for (int l = 0; l < count; ++l) {
    const int i = first + l;
    if (ndims[i] != 4 || std::strcmp(dtypes[i], "float32") != 0) return false;
    levels->push_back({static_cast<float *>(params[i]), shapes[i][0], shapes[i][1], shapes[i][2],
                       shapes[i][3]});
    if (shapes[i][1] != (*levels)[0].channels) return false;
  }
  return true;
}

// Every grid entry must address its level map; checked once so the loops need no bounds tests.
bool GridInside(const Grid &g, const std::vector<Level> &levels) {
  for (int64_t n = 0; n < g.rois; ++n) {
    if (g.level[n] < 0 || g.level[n] >= static_cast<int32_t>(levels.size())) return false;
    const Level &map = levels[g.level[n]];
    if (g.batch[n] < 0 || g.batch[n] >= map.images) return false;
    for (int64_t k = n * g.bins * g.taps; k < (n + 1) * g.bins * g.taps; ++k) {
      if (g.y[k] < 0 || g.y[k] >= map.height || g.x[k] < 0 || g.x[k] >= map.width) return false;
    }
  }
  return true;
}

int Forward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  const int num_levels = nparam - kGridInputs - 1;
  std::vector<Level> levels;
  Grid g;
  if (num_levels < 1 || !ReadLevels(params, ndims, shapes, dtypes, 0, num_levels, &levels) ||
      !ReadGrid(params, ndims, shapes, dtypes, num_levels, &g)) {
    return 1;
  }
  if (!GridInside(g, levels)) return 3;
  const int64_t channels = levels[0].channels;
  float *out = static_cast<float *>(params[nparam - 1]);
  const int64_t bins = g.bins, taps = g.taps;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < g.rois * channels; ++item) {
    const int64_t n = item / channels, c = item % channels;
    const Level &map = levels[g.level[n]];
    const float *plane = map.data + (g.batch[n] * channels + c) * map.height * map.width;
    const int32_t *ys = g.y + n * bins * taps, *xs = g.x + n * bins * taps;
    const float *wys = g.wy + n * bins * taps, *wxs = g.wx + n * bins * taps;
    float *dst = out + item * bins * bins;
    for (int64_t i = 0; i < bins; ++i) {
      for (int64_t j = 0; j < bins; ++j) {
        float acc = 0.0f;
        for (int64_t a = 0; a < taps; ++a) {
          const float *row = plane + ys[i * taps + a] * map.width;
          float along_x = 0.0f;
          for (int64_t b = 0; b < taps; ++b) along_x += wxs[j * taps + b] * row[xs[j * taps + b]];
          acc += wys[i * taps + a] * along_x;
        }
        dst[i * bins + j] = acc;
      }
    }
  }
  return 0;
}

int Backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if ((nparam - 1 - kGridInputs) % 2 != 0) return 1;
  const int num_levels = (nparam - 1 - kGridInputs) / 2;
  const int first_grad = 1 + kGridInputs + num_levels;
  std::vector<Level> grads;
  Grid g;
  if (num_levels < 1 || ndims[0] != 4 || std::strcmp(dtypes[0], "float32") != 0 ||
      !ReadGrid(params, ndims, shapes, dtypes, 1, &g) ||
      !ReadLevels(params, ndims, shapes, dtypes, first_grad, num_levels, &grads)) {
    return 1;
  }
  if (!GridInside(g, grads)) return 3;
  const float *dout = static_cast<const float *>(params[0]);
  const int64_t channels = grads[0].channels, bins = g.bins, taps = g.taps;
  if (shapes[0][0] != g.rois || shapes[0][1] != channels || shapes[0][2] != bins) return 1;
  // Threads own channels: RoIs of one channel accumulate into that channel's planes only.
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < channels; ++c) {
    for (const Level &map : grads) {
      for (int64_t image = 0; image < map.images; ++image) {
        std::memset(map.data + (image * channels + c) * map.height * map.width, 0,
                    sizeof(float) * map.height * map.width);
      }
    }
    for (int64_t n = 0; n < g.rois; ++n) {
      const Level &map = grads[g.level[n]];
      float *plane = map.data + (g.batch[n] * channels + c) * map.height * map.width;
      const int32_t *ys = g.y + n * bins * taps, *xs = g.x + n * bins * taps;
      const float *wys = g.wy + n * bins * taps, *wxs = g.wx + n * bins * taps;
      const float *src = dout + (n * channels + c) * bins * bins;
      for (int64_t i = 0; i < bins; ++i) {
        for (int64_t a = 0; a < taps; ++a) {
          const float wy = wys[i * taps + a];
          if (wy == 0.0f) continue;
          float *row = plane + ys[i * taps + a] * map.width;
          for (int64_t j = 0; j < bins; ++j) {
            const float grad = wy * src[i * bins + j];
            for (int64_t b = 0; b < taps; ++b) row[xs[j * taps + b]] += wxs[j * taps + b] * grad;
          }
        }
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" int RoIAlignForward(int nparam, void **params, int *ndims, int64_t **shapes,
                               const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Forward(nparam, params, ndims, shapes, dtypes);
}

extern "C" int RoIAlignBackward(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Backward(nparam, params, ndims, shapes, dtypes);
}
