// Single-precision matrix product C = op(A) * op(B) for the CPU (float32, row-major, batched),
// as MindSpore AOT custom-operator entry points.
//
// Why: a training step of the R50-FPN Mask R-CNN on the CPU is mostly matrix products (about
// 450 GFLOP per step at 512^2, batch 2), and MindSpore 2.10's CPU MatMul/BatchMatMul run them at
// 60-180 GFLOP/s depending on the shape: the 1x1 convolutions of the early ResNet stages (64 or
// 128 input channels, 16k columns) at 60-90. This kernel keeps every shape near the machine's
// fused-multiply-add rate (about 190 GFLOP/s on the 2-core project machine, 95 per core).
//
// Method (Goto / BLIS): the K axis is cut into blocks of kKC and N into panels of kNC; each
// (K block, N panel) of op(B) is packed into kNR-wide slivers, each (kMC x kKC) block of op(A)
// into kMR-tall slivers, both k-major and zero-padded, so the transposition of either operand
// costs nothing in the inner loop. The micro-kernel keeps a kMR x kNR tile of C in 24 AVX-512
// registers over a whole K block (2 loads of B, 12 broadcasts of A, 24 FMAs per k) and adds
// the tile to C (writes it for the first K block), with masked stores at the edges. Built for
// a CPU without AVX-512, the same blocking runs a plain C++ micro-kernel (auto-vectorised).
// Threads (OpenMP) run whole batch items when the batch splits evenly between them; otherwise
// they work on one item at a time together (see GemmItem).
//
// Entry points (params: A, B, then C), named after the transpositions op(A), op(B):
//   MatMulNN (A (.., M, K), B (.., K, N)) -> C (.., M, N)
//   MatMulNT (A (.., M, K), B (.., N, K)) -> C (.., M, N)
//   MatMulTN (A (.., K, M), B (.., K, N)) -> C (.., M, N)
// A and B are 2-D or 3-D (leading batch axis); a 2-D operand is shared by every batch item of
// the other one; with two 3-D operands the batch sizes must match. C is 3-D when either operand
// is. Returns non-zero for a wrong dtype or inconsistent shapes.
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kMR = 12;    // rows of the register tile
constexpr int kNR = 32;    // columns of the register tile (two 16-float vectors)
constexpr int kKC = 192;   // K block: one B sliver (kKC x kNR, 24 KB) stays in the 32 KB L1
constexpr int kMC = 144;   // rows of a packed A block (110 KB, in L2)
constexpr int kNC = 3072;  // columns of a packed B panel (2.3 MB)
constexpr int kAlign = 64;

// Packs rows [0, mc) x columns [0, kc) of op(A) into kMR-row slivers: out[s][k][i].
// a points at op(A)[0][0]; without transposition op(A)[m][k] = a[m * lda + k], with it
// a[k * lda + m].
void PackA(const float *a, int64_t lda, bool trans, int mc, int kc, float *out) {
  for (int ir = 0; ir < mc; ir += kMR) {
    const int mr = std::min(kMR, mc - ir);
    float *dst = out + static_cast<int64_t>(ir) * kc;
    if (!trans) {
      for (int i = 0; i < mr; ++i) {
        const float *src = a + static_cast<int64_t>(ir + i) * lda;
        for (int k = 0; k < kc; ++k) dst[k * kMR + i] = src[k];
      }
    } else {
      for (int k = 0; k < kc; ++k) {
        const float *src = a + static_cast<int64_t>(k) * lda + ir;
        for (int i = 0; i < mr; ++i) dst[k * kMR + i] = src[i];
      }
    }
    for (int i = mr; i < kMR; ++i) {
      for (int k = 0; k < kc; ++k) dst[k * kMR + i] = 0.0f;
    }
  }
}

#if defined(__AVX512F__)
__mmask16 LaneMask(int lanes) {
  if (lanes >= 16) return static_cast<__mmask16>(0xFFFF);
  if (lanes <= 0) return 0;
  return static_cast<__mmask16>((1u << lanes) - 1);
}

// Packs columns [0, nr) x rows [0, kc) of op(B) into one kNR-wide sliver: dst[k][j].
// Without transposition op(B)[k][n] = b[k * ldb + n], with it b[n * ldb + k].
void PackBSliver(const float *b, int64_t ldb, bool trans, int nr, int kc, float *dst) {
  if (!trans) {
    const __mmask16 low = LaneMask(nr), high = LaneMask(nr - 16);
    for (int k = 0; k < kc; ++k) {
      const float *src = b + static_cast<int64_t>(k) * ldb;
      _mm512_store_ps(dst + k * kNR, _mm512_maskz_loadu_ps(low, src));
      _mm512_store_ps(dst + k * kNR + 16, _mm512_maskz_loadu_ps(high, src + 16));
    }
    return;
  }
  for (int j = 0; j < nr; ++j) {
    const float *src = b + static_cast<int64_t>(j) * ldb;
    for (int k = 0; k < kc; ++k) dst[k * kNR + j] = src[k];
  }
  for (int j = nr; j < kNR; ++j) {
    for (int k = 0; k < kc; ++k) dst[k * kNR + j] = 0.0f;
  }
}

// C[0:mr][0:nr] (+)= A sliver (kc x kMR) * B sliver (kc x kNR).
void MicroKernel(int kc, const float *__restrict a, const float *__restrict b, float *c,
                 int64_t ldc, int mr, int nr, bool accumulate) {
  __m512 acc[kMR][2];
  for (int i = 0; i < kMR; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = _mm512_setzero_ps();
  }
  for (int k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
    a += kMR;
    b += kNR;
  }
  const __mmask16 low = LaneMask(nr), high = LaneMask(nr - 16);
  for (int i = 0; i < mr; ++i) {
    float *row = c + static_cast<int64_t>(i) * ldc;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(low, row));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(high, row + 16));
    }
    _mm512_mask_storeu_ps(row, low, v0);
    _mm512_mask_storeu_ps(row + 16, high, v1);
  }
}

#else  // no AVX-512: portable C++

// Packs columns [0, nr) x rows [0, kc) of op(B) into one kNR-wide sliver: dst[k][j].
// Without transposition op(B)[k][n] = b[k * ldb + n], with it b[n * ldb + k].
void PackBSliver(const float *b, int64_t ldb, bool trans, int nr, int kc, float *dst) {
  for (int k = 0; k < kc; ++k) {
    for (int j = 0; j < kNR; ++j) {
      dst[k * kNR + j] = j >= nr ? 0.0f : trans ? b[static_cast<int64_t>(j) * ldb + k]
                                                : b[static_cast<int64_t>(k) * ldb + j];
    }
  }
}

// C[0:mr][0:nr] (+)= A sliver (kc x kMR) * B sliver (kc x kNR); plain loops the compiler
// vectorises for whatever the CPU has.
void MicroKernel(int kc, const float *__restrict a, const float *__restrict b, float *c,
                 int64_t ldc, int mr, int nr, bool accumulate) {
  float acc[kMR][kNR] = {};
  for (int k = 0; k < kc; ++k) {
    for (int i = 0; i < kMR; ++i) {
      const float ai = a[i];
      for (int j = 0; j < kNR; ++j) acc[i][j] += ai * b[j];
    }
    a += kMR;
    b += kNR;
  }
  for (int i = 0; i < mr; ++i) {
    float *row = c + static_cast<int64_t>(i) * ldc;
    for (int j = 0; j < nr; ++j) row[j] = accumulate ? row[j] + acc[i][j] : acc[i][j];
  }
}

#endif  // __AVX512F__

struct Problem {
  int64_t batch, m, n, k;
  bool trans_a, trans_b;
  const float *a, *b;
  int64_t stride_a, stride_b;  // floats between batch items (0: shared 2-D operand)
  float *c;
};

// Rows [0, mc) of A block `ic` times slivers [first, last) of the packed B panel, into C.
void BlockTimesSlivers(const Problem &p, const float *a, int64_t lda, float *c, int64_t ic,
                       int mc, int64_t pc, int kc, int64_t jc, int first, int last,
                       const float *b_pack, float *a_pack) {
  const float *src = p.trans_a ? a + pc * lda + ic : a + ic * lda + pc;
  PackA(src, lda, p.trans_a, mc, kc, a_pack);
  for (int s = first; s < last; ++s) {
    const int64_t j = jc + static_cast<int64_t>(s) * kNR;
    const int nr = static_cast<int>(std::min<int64_t>(kNR, p.n - j));
    for (int ir = 0; ir < mc; ir += kMR) {
      MicroKernel(kc, a_pack + static_cast<int64_t>(ir) * kc,
                  b_pack + static_cast<int64_t>(s) * kc * kNR, c + (ic + ir) * p.n + j, p.n,
                  std::min(kMR, mc - ir), nr, pc > 0);
    }
  }
}

// Block sizes of one problem. Equal blocks: K = 256 runs as 2 x 128 rather than 192 + 64 (a
// short K block costs a full read-modify-write of C), M = 256 as 132 + 124, not 144 + 112.
struct Blocking {
  int kc, mc;
  int64_t panel_cols;
  explicit Blocking(const Problem &p) {
    const int64_t k_blocks = (p.k + kKC - 1) / kKC, m_blocks = (p.m + kMC - 1) / kMC;
    kc = static_cast<int>((p.k + k_blocks - 1) / k_blocks);
    mc = static_cast<int>(((p.m + m_blocks - 1) / m_blocks + kMR - 1) / kMR * kMR);
    panel_cols = std::min<int64_t>(kNC, (p.n + kNR - 1) / kNR * kNR);
  }
};

// Packing buffers of the calling thread, kept for the thread's lifetime: allocating them per
// call (2.4 MB for B) gave fresh pages, hence page faults, on every product, and this VM's
// host reclaims freed pages within seconds, which makes them cost about 1.5 s per GB.
class PackBuffers {
 public:
  ~PackBuffers() {
    for (float *buffer : buffers_) std::free(buffer);
  }
  float *Get(int which, int64_t floats) {
    if (floats > capacity_[which]) {
      std::free(buffers_[which]);
      const size_t bytes = (sizeof(float) * floats + kAlign - 1) / kAlign * kAlign;
      buffers_[which] = static_cast<float *>(std::aligned_alloc(kAlign, bytes));
      capacity_[which] = floats;
    }
    return buffers_[which];
  }

 private:
  float *buffers_[2] = {nullptr, nullptr};
  int64_t capacity_[2] = {0, 0};
};

constexpr int kBufferA = 0, kBufferB = 1;

float *PackBuffer(int which, int64_t floats) {
  thread_local PackBuffers buffers;
  return buffers.Get(which, floats);
}

// C of batch item `item`. With `shared`, all threads of the enclosing parallel region compute
// it together: they pack the B panel in parts and split its slivers (each packs every A block
// for itself); a panel of a few slivers is split by rows of A instead. Without, the calling
// thread computes it alone.
void GemmItem(const Problem &p, const Blocking &blk, int64_t item, bool shared, float *a_pack,
              float *b_pack) {
  const int64_t lda = p.trans_a ? p.m : p.k, ldb = p.trans_b ? p.k : p.n;
  const int threads = shared ? omp_get_num_threads() : 1;
  const int thread = shared ? omp_get_thread_num() : 0;
  const float *a = p.a + item * p.stride_a, *b = p.b + item * p.stride_b;
  float *c = p.c + item * p.m * p.n;
  for (int64_t jc = 0; jc < p.n; jc += kNC) {
    const int nc = static_cast<int>(std::min<int64_t>(kNC, p.n - jc));
    const int slivers = (nc + kNR - 1) / kNR;
    for (int64_t pc = 0; pc < p.k; pc += blk.kc) {
      const int kc = static_cast<int>(std::min<int64_t>(blk.kc, p.k - pc));
      for (int s = thread * slivers / threads; s < (thread + 1) * slivers / threads; ++s) {
        const int64_t j = jc + static_cast<int64_t>(s) * kNR;
        const float *src = p.trans_b ? b + j * ldb + pc : b + pc * ldb + j;
        PackBSliver(src, ldb, p.trans_b, static_cast<int>(std::min<int64_t>(kNR, p.n - j)), kc,
                    b_pack + static_cast<int64_t>(s) * kc * kNR);
      }
      if (shared) {
#pragma omp barrier
      }
      if (slivers >= 2 * threads) {
        const int first = thread * slivers / threads;
        const int last = (thread + 1) * slivers / threads;
        for (int64_t ic = 0; ic < p.m; ic += blk.mc) {
          const int mc = static_cast<int>(std::min<int64_t>(blk.mc, p.m - ic));
          BlockTimesSlivers(p, a, lda, c, ic, mc, pc, kc, jc, first, last, b_pack, a_pack);
        }
      } else {
        const int64_t mc_narrow = std::min<int64_t>(
            blk.mc, ((p.m + threads - 1) / threads + kMR - 1) / kMR * kMR);
        const int64_t blocks = (p.m + mc_narrow - 1) / mc_narrow;
        for (int64_t block = thread * blocks / threads; block < (thread + 1) * blocks / threads;
             ++block) {
          const int64_t ic = block * mc_narrow;
          const int mc = static_cast<int>(std::min<int64_t>(mc_narrow, p.m - ic));
          BlockTimesSlivers(p, a, lda, c, ic, mc, pc, kc, jc, 0, slivers, b_pack, a_pack);
        }
      }
      if (shared) {
#pragma omp barrier
      }
    }
  }
}

void Gemm(const Problem &p) {
  if (p.k == 0) {
    std::memset(p.c, 0, sizeof(float) * p.batch * p.m * p.n);
    return;
  }
  const Blocking blk(p);
  const int threads = omp_get_max_threads();
  // Batch items split evenly between the threads: each thread runs whole items, with no
  // barrier at all (the shared scheme synchronises twice per K block; with many small items,
  // e.g. the mask head's RoIs, threads spent a quarter of the step waiting there).
  if (p.batch % threads == 0 || p.batch >= 4 * threads) {
#pragma omp parallel
    {
      float *a_pack = PackBuffer(kBufferA, static_cast<int64_t>(kKC) * kMC);
      float *b_pack = PackBuffer(kBufferB, kKC * blk.panel_cols);
#pragma omp for schedule(static)
      for (int64_t item = 0; item < p.batch; ++item) {
        GemmItem(p, blk, item, false, a_pack, b_pack);
      }
    }
    return;
  }
  // The calling thread's B buffer is the shared panel (its own share of the work packs A only).
  float *b_pack = PackBuffer(kBufferB, kKC * blk.panel_cols);
#pragma omp parallel
  {
    float *a_pack = PackBuffer(kBufferA, static_cast<int64_t>(kKC) * kMC);
    for (int64_t item = 0; item < p.batch; ++item) GemmItem(p, blk, item, true, a_pack, b_pack);
  }
}

// Reads the AOT parameters into a Problem; false for a wrong dtype or inconsistent shapes.
bool ReadProblem(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                 bool trans_a, bool trans_b, Problem *p) {
  if (nparam != 3) return false;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  }
  const int da = ndims[0], db = ndims[1], dc = ndims[2];
  if (da < 2 || da > 3 || db < 2 || db > 3 || dc != std::max(da, db)) return false;
  const int64_t *sa = shapes[0] + (da - 2), *sb = shapes[1] + (db - 2), *sc = shapes[2];
  const int64_t batch_a = da == 3 ? shapes[0][0] : 1, batch_b = db == 3 ? shapes[1][0] : 1;
  if (da == 3 && db == 3 && batch_a != batch_b) return false;
  p->batch = std::max(batch_a, batch_b);
  p->trans_a = trans_a;
  p->trans_b = trans_b;
  p->m = trans_a ? sa[1] : sa[0];
  p->k = trans_a ? sa[0] : sa[1];
  p->n = trans_b ? sb[0] : sb[1];
  if ((trans_b ? sb[1] : sb[0]) != p->k) return false;
  if (dc == 3 && (sc[0] != p->batch || sc[1] != p->m || sc[2] != p->n)) return false;
  if (dc == 2 && (sc[0] != p->m || sc[1] != p->n)) return false;
  p->a = static_cast<const float *>(params[0]);
  p->b = static_cast<const float *>(params[1]);
  p->c = static_cast<float *>(params[2]);
  p->stride_a = da == 3 ? sa[0] * sa[1] : 0;
  p->stride_b = db == 3 ? sb[0] * sb[1] : 0;
  return true;
}

int Run(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
        bool trans_a, bool trans_b) {
  Problem p;
  if (!ReadProblem(nparam, params, ndims, shapes, dtypes, trans_a, trans_b, &p)) return 1;
  Gemm(p);
  return 0;
}

}  // namespace

extern "C" int MatMulNN(int nparam, void **params, int *ndims, int64_t **shapes,
                        const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Run(nparam, params, ndims, shapes, dtypes, false, false);
}

extern "C" int MatMulNT(int nparam, void **params, int *ndims, int64_t **shapes,
                        const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Run(nparam, params, ndims, shapes, dtypes, false, true);
}

extern "C" int MatMulTN(int nparam, void **params, int *ndims, int64_t **shapes,
                        const char **dtypes, void *stream, void *extra) {
  (void)stream;
  (void)extra;
  return Run(nparam, params, ndims, shapes, dtypes, true, false);
}
