// Winograd F(4 x 4, 3 x 3) and F(6 x 6, 3 x 3) transforms for 3x3 convolutions with stride 1
// and padding 1 (float32, NCHW), as MindSpore AOT custom-operator entry points for the CPU.
//
// Why: on MindSpore 2.10's CPU backend a convolution is only as fast as its matrix products
// (about 150-200 GFLOP/s on the 2-core project machine); Winograd's minimal filtering F(m, 3)
// turns the 9 multiplies per output pixel and channel pair of a 3x3 convolution into (m+2)^2
// per m x m output tile: 36 per 16 pixels with F4, 64 per 36 with F6 (winograd.py picks the
// tiling per shape). The products between transformed inputs and transformed weights run on
// gemm.cc; these kernels do the memory-bound rest in one pass each, which MindSpore's
// elementwise ops and copies cannot do fast enough.
//
// Transformed tensors ("tile tensors") are split into chunks of at most `chunk_tiles` tiles,
// one MindSpore tensor per chunk, each laid out (points = a*a, channels, tiles_in_chunk), one
// batched product per chunk: separate tensors avoid concatenating hundreds of MB (MindSpore's
// BatchMatMul, which ran the products first, also slowed down above a few thousand columns).
// Tile t of the whole batch (t = (canvas * tiles_y + ty) * tiles_x + tx) lives in chunk
// t / chunk_tiles at column t % chunk_tiles; every chunk but the last is full.
//
// Canvases: small maps waste products on tiles that overhang them (a 14x14 RoI of the mask head
// is 16 tiles covering 16x16 outputs, 31% more than its 196 pixels). Such images are laid side
// by side on one canvas per channel, `columns` across and as many rows as needed, one zero
// pixel between neighbours: that pixel is the padding of both, so the convolution of the canvas
// is the convolution of every image, and the tiles cover the canvas instead of each image (14x14
// RoIs, three across: 13.8 F4 tiles each; two across: 6.25 F6 tiles, 400 products instead of
// 576). `ChooseCanvas` takes the layout with the fewest tiles,
// separate images (one canvas each) unless a shared canvas has strictly fewer; winograd.py
// computes the same layout to size the tile tensors, and MakeGeometry rejects a mismatch.
//
// Entry points (params: inputs, then outputs, as MindSpore passes them), the same six for F6
// (WinogradF6Input, ...), a = m + 2:
//   WinogradF4Input   (x (N,C,H,W))                -> V_0..V_{k-1} (a*a, C, tiles_k)
//   WinogradF4Output  (x, M_0..M_{k-1} (a*a,O,.))  -> y (N, O, H, W)
//   WinogradF4InputAdjoint  (x, dV_0..dV_{k-1})    -> dx (N, C, H, W)   (adjoint of Input)
//   WinogradF4OutputAdjoint (dy (N, O, H, W))      -> dM_0..dM_{k-1}    (adjoint of Output)
//   WinogradF4Weight        (g (O, C, 3, 3))       -> U (a*a, O, C)     (U = G g G^T)
//   WinogradF4WeightAdjoint (dU (a*a, O, C))       -> dg (O, C, 3, 3)   (adjoint of Weight)
// Image sizes come from the NCHW tensor's shape, the chunking from the chunk shapes. The
// convolution input x passed to Output and InputAdjoint is not read: MindSpore caches an AOT
// op's output shape by its input shapes, and without x a 4x4 and a 2x2 map (one tile each)
// would share the tile tensors' shapes and get the same output shape.
// Matrices: Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), the
// Cook-Toom construction on the interpolation points named at each tiling (F6's checked in
// tests/models/test_conv.py against the direct convolution, as F4's).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot_entry.h"

namespace {

// Tiles transformed together: the transforms run over this innermost axis in SIMD registers.
constexpr int kLanes = 16;

template <int R, int C>
struct Mat {
  float v[R][C];
};

template <int R, int C>
constexpr Mat<C, R> Transpose(const Mat<R, C> &m) {
  Mat<C, R> t{};
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < C; ++j) t.v[j][i] = m.v[i][j];
  }
  return t;
}

template <class M>
struct Transposed {  // the adjoint of the transform M
  static constexpr auto m = Transpose(M::m);
};

// F(m x m, 3 x 3): an m x m output tile from an a x a input tile, a = m + 2, with a*a products.
// Per tile: V = BT d BT^T (input), U = G g G^T (weight), Y = AT M AT^T (output).
template <int M>
struct Tiling {
  static constexpr int kOut = M;               // m: output tile side
  static constexpr int kIn = M + 2;            // a: input tile side (padding 1, kernel 3)
  static constexpr int kPoints = kIn * kIn;
};

// Interpolation points 0, 1, -1, 2, -2 and infinity.
struct F4 : Tiling<4> {
  struct BT {
    static constexpr Mat<kIn, kIn> m = {{{4, 0, -5, 0, 1, 0},
                                         {0, -4, -4, 1, 1, 0},
                                         {0, 4, -4, -1, 1, 0},
                                         {0, -2, -1, 2, 1, 0},
                                         {0, 2, -1, -2, 1, 0},
                                         {0, 4, 0, -5, 0, 1}}};
  };
  struct AT {
    static constexpr Mat<kOut, kIn> m = {{{1, 1, 1, 1, 1, 0},
                                          {0, 1, -1, 2, -2, 0},
                                          {0, 1, 1, 4, 4, 0},
                                          {0, 1, -1, 8, -8, 1}}};
  };
  struct G {
    static constexpr Mat<kIn, 3> m = {{{1.0f / 4, 0, 0},
                                       {-1.0f / 6, -1.0f / 6, -1.0f / 6},
                                       {-1.0f / 6, 1.0f / 6, -1.0f / 6},
                                       {1.0f / 24, 1.0f / 12, 1.0f / 6},
                                       {1.0f / 24, -1.0f / 12, 1.0f / 6},
                                       {0, 0, 1}}};
  };
};

// Interpolation points 0, 1, -1, 2, -2, 1/2, -1/2 and infinity (2.25 -> 1.78 products per
// output pixel; its transforms amplify float32 rounding more than F4's, see winograd.py).
struct F6 : Tiling<6> {
  struct BT {
    static constexpr Mat<kIn, kIn> m = {{{1, 0, -21.0f / 4, 0, 21.0f / 4, 0, -1, 0},
                                         {0, 1, 1, -17.0f / 4, -17.0f / 4, 1, 1, 0},
                                         {0, -1, 1, 17.0f / 4, -17.0f / 4, -1, 1, 0},
                                         {0, 2, 4, -5.0f / 2, -5, 1.0f / 2, 1, 0},
                                         {0, -2, 4, 5.0f / 2, -5, -1.0f / 2, 1, 0},
                                         {0, 1.0f / 2, 1.0f / 4, -5.0f / 2, -5.0f / 4, 2, 1, 0},
                                         {0, -1.0f / 2, 1.0f / 4, 5.0f / 2, -5.0f / 4, -2, 1, 0},
                                         {0, -1, 0, 21.0f / 4, 0, -21.0f / 4, 0, 1}}};
  };
  struct AT {
    static constexpr Mat<kOut, kIn> m = {
        {{1, 1, 1, 1, 1, 1, 1, 0},
         {0, 1, -1, 1.0f / 2, -1.0f / 2, 2, -2, 0},
         {0, 1, 1, 1.0f / 4, 1.0f / 4, 4, 4, 0},
         {0, 1, -1, 1.0f / 8, -1.0f / 8, 8, -8, 0},
         {0, 1, 1, 1.0f / 16, 1.0f / 16, 16, 16, 0},
         {0, 1, -1, 1.0f / 32, -1.0f / 32, 32, -32, 1}}};
  };
  struct G {
    static constexpr Mat<kIn, 3> m = {{{1, 0, 0},
                                       {-2.0f / 9, -2.0f / 9, -2.0f / 9},
                                       {-2.0f / 9, 2.0f / 9, -2.0f / 9},
                                       {32.0f / 45, 16.0f / 45, 8.0f / 45},
                                       {32.0f / 45, -16.0f / 45, 8.0f / 45},
                                       {1.0f / 90, 1.0f / 45, 2.0f / 45},
                                       {1.0f / 90, -1.0f / 45, 2.0f / 45},
                                       {0, 0, 1}}};
  };
};

// out = L in R^T for every lane, L (R1 x K1), R (R2 x K2) compile-time constants: the loops
// unroll over the constants, so zero coefficients cost nothing, and the lane loop vectorises.
template <class L, class R, int R1, int K1, int R2, int K2>
inline void Transform2D(const float (&in)[K1][K2][kLanes], float (&out)[R1][R2][kLanes]) {
  constexpr auto &l = L::m.v;
  constexpr auto &r = R::m.v;
  float half[R1][K2][kLanes];
#pragma GCC unroll 8
  for (int i = 0; i < R1; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < K2; ++j) {
      float acc[kLanes] = {};
#pragma GCC unroll 8
      for (int k = 0; k < K1; ++k) {
        if (l[i][k] != 0.0f) {
          for (int lane = 0; lane < kLanes; ++lane) acc[lane] += l[i][k] * in[k][j][lane];
        }
      }
      std::memcpy(half[i][j], acc, sizeof(acc));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R1; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < R2; ++j) {
      float acc[kLanes] = {};
#pragma GCC unroll 8
      for (int k = 0; k < K2; ++k) {
        if (r[j][k] != 0.0f) {
          for (int lane = 0; lane < kLanes; ++lane) acc[lane] += half[i][k][lane] * r[j][k];
        }
      }
      std::memcpy(out[i][j], acc, sizeof(acc));
    }
  }
}

// Most images across one canvas (bounds the canvas buffers of the transforms).
constexpr int64_t kMaxCanvasColumns = 8;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the images of a batch lie on canvases (see the file comment).
struct Canvas {
  int64_t columns = 1, rows = 1;  // image slots across and down one canvas
  int64_t count = 0;              // canvases
  int64_t tiles_y = 0, tiles_x = 0;
  int64_t Tiles() const { return count * tiles_y * tiles_x; }
};

// `tile`: the output tile side m.
Canvas ChooseCanvas(int64_t images, int64_t height, int64_t width, int64_t tile) {
  Canvas best;  // separate images
  best.count = images;
  best.tiles_y = CeilDiv(height, tile);
  best.tiles_x = CeilDiv(width, tile);
  for (int64_t columns = 1; columns <= std::min(images, kMaxCanvasColumns); ++columns) {
    Canvas shared;
    shared.columns = columns;
    shared.rows = CeilDiv(images, columns);
    shared.count = 1;
    shared.tiles_y = CeilDiv(shared.rows * (height + 1) - 1, tile);
    shared.tiles_x = CeilDiv(columns * (width + 1) - 1, tile);
    if (shared.Tiles() < best.Tiles()) best = shared;
  }
  return best;
}

// Geometry of one call: the NCHW tensor, its canvases and the chunked tile tensors.
struct Geometry {
  int64_t images, channels, height, width;
  int64_t tile;                  // output tile side m
  Canvas canvas;
  int64_t chunk_tiles;
  std::vector<float *> chunks;   // base pointer of each chunk
  std::vector<int64_t> widths;   // tiles in each chunk

  // Output rows and columns of one canvas, whole tiles.
  int64_t TiledRows() const { return canvas.tiles_y * tile; }
  int64_t TiledColumns() const { return canvas.tiles_x * tile; }
  // The (image, channel) plane of an NCHW tensor.
  int64_t Plane(int64_t image, int64_t channel) const {
    return (image * channels + channel) * height * width;
  }
  // Calls place(image, top, left) for every image of canvas `index`, with its top-left output
  // pixel on the canvas.
  template <class Place>
  void ForEachImage(int64_t index, Place place) const {
    const int64_t slots = canvas.columns * canvas.rows;
    const int64_t last = std::min(images, (index + 1) * slots);
    for (int64_t image = index * slots; image < last; ++image) {
      const int64_t slot = image - index * slots;
      place(image, slot / canvas.columns * (height + 1), slot % canvas.columns * (width + 1));
    }
  }
};

// Reads the geometry of F(W::kOut, 3) from MindSpore's params; false on malformed shapes.
template <class W>
bool MakeGeometry(int nparam, void **params, int *ndims, int64_t **shapes, int image_index,
                  int first_chunk, int num_chunks, Geometry *g) {
  if (num_chunks < 1 || image_index >= nparam || first_chunk + num_chunks > nparam) return false;
  if (ndims[image_index] != 4) return false;
  const int64_t *s = shapes[image_index];
  g->images = s[0];
  g->channels = s[1];
  g->height = s[2];
  g->width = s[3];
  g->tile = W::kOut;
  g->canvas = ChooseCanvas(g->images, g->height, g->width, W::kOut);
  int64_t total = 0;
  for (int k = 0; k < num_chunks; ++k) {
    const int index = first_chunk + k;
    if (ndims[index] != 3 || shapes[index][0] != W::kPoints || shapes[index][1] != g->channels) {
      return false;
    }
    g->chunks.push_back(static_cast<float *>(params[index]));
    g->widths.push_back(shapes[index][2]);
    total += shapes[index][2];
  }
  // Every chunk but the last holds chunk_tiles tiles, the last at most as many: tile t lies in
  // chunk t / chunk_tiles, which must exist.
  g->chunk_tiles = g->widths[0];
  for (int k = 0; k + 1 < num_chunks; ++k) {
    if (g->widths[k] != g->chunk_tiles) return false;
  }
  if (g->chunk_tiles < 1 || g->widths.back() > g->chunk_tiles) return false;
  return total == g->canvas.Tiles();
}

// Up to kLanes consecutive tiles of one plane that lie in one chunk: their columns are
// contiguous there. `offset[lane]` is the top-left of each tile in a plane buffer whose rows are
// `row` floats long and whose tiles start every g.tile pixels (unused lanes repeat the last tile).
struct Block {
  float *column;      // chunk column of the first tile, point 0
  int64_t point_stride;
  int count;
  int64_t offset[kLanes];
};

// Calls visit(block) for every block of the plane (canvas, channel), in tile order. Tile
// positions are stepped, not divided out per lane: 16 integer divisions per block cost about
// as much as its transform.
template <class Visit>
void ForEachBlock(const Geometry &g, int64_t canvas, int64_t channel, int64_t row,
                  Visit visit) {
  const int64_t tiles_x = g.canvas.tiles_x;
  const int64_t plane_tiles = g.canvas.tiles_y * tiles_x;
  int64_t k = canvas * plane_tiles / g.chunk_tiles;              // chunk of the block's tile 0
  int64_t col = canvas * plane_tiles - k * g.chunk_tiles;        // its column in that chunk
  int64_t ty = 0, tx = 0;                                        // its tile row and column
  Block b;
  for (int64_t q0 = 0; q0 < plane_tiles; q0 += b.count) {
    b.count = static_cast<int>(std::min<int64_t>({kLanes, plane_tiles - q0, g.widths[k] - col}));
    b.column = g.chunks[k] + channel * g.widths[k] + col;
    b.point_stride = g.channels * g.widths[k];
    int64_t y = ty, x = tx;
    for (int lane = 0; lane < kLanes; ++lane) {
      b.offset[lane] = (y * row + x) * g.tile;
      if (lane + 1 < b.count && ++x == tiles_x) {  // unused lanes repeat the last tile
        x = 0;
        ++y;
      }
    }
    visit(b);
    tx += b.count;                                   // advance past the block
    while (tx >= tiles_x) {
      tx -= tiles_x;
      ++ty;
    }
    col += b.count;
    if (col == g.widths[k]) {
      ++k;
      col = 0;
    }
  }
}

// Loads the block's tile columns of all points (unused lanes repeat the last tile).
template <class W>
inline void LoadColumns(const Block &b, float (&out)[W::kIn][W::kIn][kLanes]) {
  constexpr int kIn = W::kIn;
  for (int p = 0; p < W::kPoints; ++p) {
    const float *src = b.column + p * b.point_stride;
    if (b.count == kLanes) {
      std::memcpy(out[p / kIn][p % kIn], src, sizeof(float) * kLanes);
    } else {
      for (int lane = 0; lane < kLanes; ++lane) {
        out[p / kIn][p % kIn][lane] = src[std::min(lane, b.count - 1)];
      }
    }
  }
}

template <class W>
int InputTransform(int nparam, void **params, int *ndims, int64_t **shapes) {
  constexpr int kIn = W::kIn, kPoints = W::kPoints;
  Geometry g;
  if (!MakeGeometry<W>(nparam, params, ndims, shapes, 0, 1, nparam - 1, &g)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int64_t row = g.TiledColumns() + 2, rows = g.TiledRows() + 2;
  const int64_t planes = g.canvas.count * g.channels;
#pragma omp parallel
  {
    std::vector<float> padded(rows * row);  // the canvas with its zero border and tile overhang
    float d[kIn][kIn][kLanes], v[kIn][kIn][kLanes];
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t canvas = plane / g.channels, channel = plane % g.channels;
      std::fill(padded.begin(), padded.end(), 0.0f);
      g.ForEachImage(canvas, [&](int64_t image, int64_t top, int64_t left) {
        const float *src = x + g.Plane(image, channel);
        for (int64_t y = 0; y < g.height; ++y) {
          std::memcpy(&padded[(top + y + 1) * row + left + 1], src + y * g.width,
                      sizeof(float) * g.width);
        }
      });
      ForEachBlock(g, canvas, channel, row, [&](const Block &b) {
        for (int i = 0; i < kIn; ++i) {
          for (int j = 0; j < kIn; ++j) {
            for (int lane = 0; lane < kLanes; ++lane) {
              d[i][j][lane] = padded[b.offset[lane] + i * row + j];
            }
          }
        }
        Transform2D<typename W::BT, typename W::BT>(d, v);
        for (int p = 0; p < kPoints; ++p) {
          float *dst = b.column + p * b.point_stride;
          for (int lane = 0; lane < b.count; ++lane) dst[lane] = v[p / kIn][p % kIn][lane];
        }
      });
    }
  }
  return 0;
}

template <class W>
int OutputTransform(int nparam, void **params, int *ndims, int64_t **shapes) {
  constexpr int kIn = W::kIn, kOut = W::kOut;
  Geometry g;
  const int image_index = nparam - 1;  // params[0] only carries the input's shape (see above)
  if (!MakeGeometry<W>(nparam, params, ndims, shapes, image_index, 1, nparam - 2, &g)) return 1;
  float *y = static_cast<float *>(params[image_index]);
  const int64_t row = g.TiledColumns(), rows = g.TiledRows();
  const int64_t planes = g.canvas.count * g.channels;
#pragma omp parallel
  {
    std::vector<float> tiled(rows * row);  // whole output tiles, cropped when copied out
    float mm[kIn][kIn][kLanes], out[kOut][kOut][kLanes];
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t canvas = plane / g.channels, channel = plane % g.channels;
      ForEachBlock(g, canvas, channel, row, [&](const Block &b) {
        LoadColumns<W>(b, mm);
        Transform2D<typename W::AT, typename W::AT>(mm, out);
        for (int lane = 0; lane < b.count; ++lane) {
          for (int i = 0; i < kOut; ++i) {
            for (int j = 0; j < kOut; ++j) tiled[b.offset[lane] + i * row + j] = out[i][j][lane];
          }
        }
      });
      g.ForEachImage(canvas, [&](int64_t image, int64_t top, int64_t left) {
        float *dst = y + g.Plane(image, channel);
        for (int64_t yy = 0; yy < g.height; ++yy) {
          std::memcpy(dst + yy * g.width, &tiled[(top + yy) * row + left],
                      sizeof(float) * g.width);
        }
      });
    }
  }
  return 0;
}

template <class W>
int InputAdjoint(int nparam, void **params, int *ndims, int64_t **shapes) {
  constexpr int kIn = W::kIn;
  Geometry g;
  const int image_index = nparam - 1;  // params[0] only carries the input's shape (see above)
  if (!MakeGeometry<W>(nparam, params, ndims, shapes, image_index, 1, nparam - 2, &g)) return 1;
  float *dx = static_cast<float *>(params[image_index]);
  const int64_t row = g.TiledColumns() + 2, rows = g.TiledRows() + 2;
  const int64_t planes = g.canvas.count * g.channels;
#pragma omp parallel
  {
    std::vector<float> padded(rows * row);  // gradient of the padded canvas
    float dv[kIn][kIn][kLanes], dd[kIn][kIn][kLanes];
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t canvas = plane / g.channels, channel = plane % g.channels;
      std::fill(padded.begin(), padded.end(), 0.0f);
      ForEachBlock(g, canvas, channel, row, [&](const Block &b) {
        LoadColumns<W>(b, dv);
        Transform2D<Transposed<typename W::BT>, Transposed<typename W::BT>>(dv, dd);
        // Neighbouring tiles overlap by two pixels: accumulate one tile at a time.
        for (int lane = 0; lane < b.count; ++lane) {
          for (int i = 0; i < kIn; ++i) {
            for (int j = 0; j < kIn; ++j) padded[b.offset[lane] + i * row + j] += dd[i][j][lane];
          }
        }
      });
      // The padding and the pixels between images are constants: their gradient is dropped.
      g.ForEachImage(canvas, [&](int64_t image, int64_t top, int64_t left) {
        float *dst = dx + g.Plane(image, channel);
        for (int64_t yy = 0; yy < g.height; ++yy) {
          std::memcpy(dst + yy * g.width, &padded[(top + yy + 1) * row + left + 1],
                      sizeof(float) * g.width);
        }
      });
    }
  }
  return 0;
}

template <class W>
int OutputAdjoint(int nparam, void **params, int *ndims, int64_t **shapes) {
  constexpr int kIn = W::kIn, kOut = W::kOut, kPoints = W::kPoints;
  Geometry g;
  if (!MakeGeometry<W>(nparam, params, ndims, shapes, 0, 1, nparam - 1, &g)) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const int64_t row = g.TiledColumns(), rows = g.TiledRows();
  const int64_t planes = g.canvas.count * g.channels;
#pragma omp parallel
  {
    // dY on whole tiles: outputs cropped from the canvas (at image borders, between images)
    // receive no gradient (zeros).
    std::vector<float> tiled(rows * row);
    float dout[kOut][kOut][kLanes], dm[kIn][kIn][kLanes];
#pragma omp for schedule(static)
    for (int64_t plane = 0; plane < planes; ++plane) {
      const int64_t canvas = plane / g.channels, channel = plane % g.channels;
      std::fill(tiled.begin(), tiled.end(), 0.0f);
      g.ForEachImage(canvas, [&](int64_t image, int64_t top, int64_t left) {
        const float *src = dy + g.Plane(image, channel);
        for (int64_t yy = 0; yy < g.height; ++yy) {
          std::memcpy(&tiled[(top + yy) * row + left], src + yy * g.width,
                      sizeof(float) * g.width);
        }
      });
      ForEachBlock(g, canvas, channel, row, [&](const Block &b) {
        for (int i = 0; i < kOut; ++i) {
          for (int j = 0; j < kOut; ++j) {
            for (int lane = 0; lane < kLanes; ++lane) {
              dout[i][j][lane] = tiled[b.offset[lane] + i * row + j];
            }
          }
        }
        Transform2D<Transposed<typename W::AT>, Transposed<typename W::AT>>(dout, dm);
        for (int p = 0; p < kPoints; ++p) {
          float *dst = b.column + p * b.point_stride;
          for (int lane = 0; lane < b.count; ++lane) dst[lane] = dm[p / kIn][p % kIn][lane];
        }
      });
    }
  }
  return 0;
}

// U (36, O, C) = G g G^T for every filter of g (O, C, 3, 3); with `adjoint`, dg = G^T dU G.
// Lanes are kLanes consecutive (o, c) filters: a point's values are then contiguous in U.
// (MindSpore's MatMul of the (36, 9) transform by (O*C, 9)^T ran 11 ms for a 512x512 weight,
// and the RPN head transforms its one weight once per pyramid level.)
template <class W, bool kAdjoint>
int WeightTransform(int nparam, void **params, int *ndims, int64_t **shapes) {
  constexpr int kIn = W::kIn, kPoints = W::kPoints, kTaps = 9;
  const int filters_index = kAdjoint ? 1 : 0, points_index = kAdjoint ? 0 : 1;
  if (nparam != 2 || ndims[filters_index] != 4 || ndims[points_index] != 3) return 1;
  const int64_t *f = shapes[filters_index], *u = shapes[points_index];
  if (f[2] != 3 || f[3] != 3 || u[0] != kPoints || u[1] != f[0] || u[2] != f[1]) return 1;
  float *filters = static_cast<float *>(params[filters_index]);
  float *points = static_cast<float *>(params[points_index]);
  const int64_t count = f[0] * f[1];
#pragma omp parallel
  {
    float g[3][3][kLanes], v[kIn][kIn][kLanes];
#pragma omp for schedule(static)
    for (int64_t first = 0; first < count; first += kLanes) {
      const int lanes = static_cast<int>(std::min<int64_t>(kLanes, count - first));
      if (!kAdjoint) {
        for (int k = 0; k < kTaps; ++k) {
          for (int lane = 0; lane < kLanes; ++lane) {
            g[k / 3][k % 3][lane] = filters[(first + std::min(lane, lanes - 1)) * kTaps + k];
          }
        }
        Transform2D<typename W::G, typename W::G>(g, v);
        for (int p = 0; p < kPoints; ++p) {
          std::memcpy(points + p * count + first, v[p / kIn][p % kIn], sizeof(float) * lanes);
        }
      } else {
        for (int p = 0; p < kPoints; ++p) {
          for (int lane = 0; lane < kLanes; ++lane) {
            v[p / kIn][p % kIn][lane] = points[p * count + first + std::min(lane, lanes - 1)];
          }
        }
        Transform2D<Transposed<typename W::G>, Transposed<typename W::G>>(v, g);
        for (int lane = 0; lane < lanes; ++lane) {
          for (int k = 0; k < kTaps; ++k) {
            filters[(first + lane) * kTaps + k] = g[k / 3][k % 3][lane];
          }
        }
      }
    }
  }
  return 0;
}

}  // namespace

// One set of entry points per tiling: WinogradF4* and WinogradF6*.
#define WINOGRAD_ENTRY_POINTS(TILING)                                                     \
  AOT_ENTRY_FLOAT32(Winograd##TILING##Input, InputTransform<TILING>)                       \
  AOT_ENTRY_FLOAT32(Winograd##TILING##Output, OutputTransform<TILING>)                     \
  AOT_ENTRY_FLOAT32(Winograd##TILING##InputAdjoint, InputAdjoint<TILING>)                  \
  AOT_ENTRY_FLOAT32(Winograd##TILING##OutputAdjoint, OutputAdjoint<TILING>)                \
  AOT_ENTRY_FLOAT32(Winograd##TILING##Weight, (WeightTransform<TILING, false>))            \
  AOT_ENTRY_FLOAT32(Winograd##TILING##WeightAdjoint, (WeightTransform<TILING, true>))

WINOGRAD_ENTRY_POINTS(F4)
WINOGRAD_ENTRY_POINTS(F6)
