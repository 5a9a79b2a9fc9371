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
// costs nothing in the inner loop. The micro-kernel keeps a kMR x kNR tile of C in 28 AVX-512
// registers over a whole K block (2 loads of B, 14 broadcasts of A, 28 FMAs per k) and adds
// the tile to C (writes it for the first K block), with masked stores at the edges. Built for
// a CPU without AVX-512, the same blocking runs a plain C++ micro-kernel (auto-vectorised).
// The *Bf16 entry points multiply operands rounded to bfloat16 with float32 sums: on the AMX
// tile unit where the CPU has one and Linux grants it (AmxFormat), else with AVX512_BF16
// (BFloat16Format), else with float32 FMAs.
// Threads (OpenMP) run whole batch items when the batch splits evenly between them; otherwise
// they work on one item at a time together (see GemmItem), or, for a single item with a small
// output and a deep K, each on its own range of K (see GemmSplitK).
//
// Entry points (params: A, B, then C), named after the transpositions op(A), op(B):
//   MatMulNN (A (.., M, K), B (.., K, N)) -> C (.., M, N)
//   MatMulNT (A (.., M, K), B (.., N, K)) -> C (.., M, N)
//   MatMulTN (A (.., K, M), B (.., K, N)) -> C (.., M, N)
// A and B are 2-D or 3-D (leading batch axis); a 2-D operand is shared by every batch item of
// the other one; with two 3-D operands the batch sizes must match. C is 3-D when either operand
// is. A tensor of more than 3 dimensions (d0, d1, d2, ...) is read as the 3-D (d0, d1, d2*...):
// NCHW images are then (N, C, pixels) matrices as they are, because MindSpore copies a reshaped
// view in full before handing it to a custom operator (measured: a 33 MB activation, 2.7 ms).
// Returns non-zero for a wrong dtype or inconsistent shapes.
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "aot_entry.h"
#include "shapes.h"

namespace {

// Rows of the register tile: 14 x 2 accumulators, 2 B vectors and a broadcast use 31 of the
// 32 registers. Against 12 rows, on the 2-core Xeon: 183 -> 205 GFLOP/s per core on a packed
// block in L1, the train step's product shapes 4% faster alone, the 512² step 0.055 s and
// 0.008 s faster in two paired in-process runs (median of 8 pairs, 6 faster; of 10, 7 faster).
constexpr int kMR = 14;
constexpr int kNR = 32;    // columns of the register tile (two 16-lane vectors)
constexpr int kMC = 140;   // rows of a packed A block (in L2), whole register tiles
constexpr int kNC = 3072;  // columns of a packed B panel
constexpr int kAlign = 64;
// Split-K limits: outputs of at most this many floats, at least this much K per thread.
constexpr int64_t kSplitKMaxOutput = 64 * 1024;
constexpr int64_t kSplitKMinDepthPerThread = 4096;

// float32 -> bfloat16 (upper 16 bits), rounded to nearest even; NaN stays NaN.
inline uint32_t Bf16Bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (bits >> 16) | 0x40u;  // quiet NaN
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// x rounded to the nearest bfloat16 value, as a float (what the bf16 products multiply).
inline float RoundToBf16(float x) {
  const uint32_t bits = Bf16Bits(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

#if defined(__AVX512F__)
__mmask16 LaneMask(int lanes) {
  if (lanes >= 16) return static_cast<__mmask16>(0xFFFF);
  if (lanes <= 0) return 0;
  return static_cast<__mmask16>((1u << lanes) - 1);
}

// RoundToBf16 on 16 lanes.
inline __m512 RoundToBf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  // + 0x7FFF, + 1 more where the kept part is odd (ties to even); then drop the low half.
  const __mmask16 odd = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x10000));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF));
  rounded = _mm512_mask_add_epi32(rounded, odd, rounded, _mm512_set1_epi32(1));
  rounded = _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(_mm512_castsi512_ps(rounded), nan, x);
}

// In-register transpose of a 16 x 16 matrix of 32-bit words: r[i] lane j -> r[j] lane i.
// Packing a transposed operand (k contiguous per column) goes through it: 16 columns' runs in,
// 16 k rows (or bfloat16 pairs) of 16 columns out, instead of one scalar store per element.
inline void Transpose16x16(__m512i r[16]) {
  // Masked forms with every lane set: the same instructions, without GCC 12's false
  // 'may be used uninitialized' warnings about the unmasked intrinsics' undefined source.
  constexpr __mmask16 kAll16 = 0xFFFF;
  constexpr __mmask8 kAll8 = 0xFF;
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: 2 x 2 blocks of words
    t[2 * i] = _mm512_maskz_unpacklo_epi32(kAll16, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_epi32(kAll16, r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + q], lane L: column 4L + q, rows 4i .. 4i + 3
    r[4 * i] = _mm512_maskz_unpacklo_epi64(kAll8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_maskz_unpackhi_epi64(kAll8, t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_maskz_unpacklo_epi64(kAll8, t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_maskz_unpackhi_epi64(kAll8, t[4 * i + 1], t[4 * i + 3]);
  }
  for (int q = 0; q < 4; ++q) {  // gather lane L of u[q], u[4+q], u[8+q], u[12+q] into one row
    const __m512i x0 = _mm512_maskz_shuffle_i32x4(kAll16, r[q], r[4 + q], 0x88);
    const __m512i x1 = _mm512_maskz_shuffle_i32x4(kAll16, r[q], r[4 + q], 0xDD);
    const __m512i y0 = _mm512_maskz_shuffle_i32x4(kAll16, r[8 + q], r[12 + q], 0x88);
    const __m512i y1 = _mm512_maskz_shuffle_i32x4(kAll16, r[8 + q], r[12 + q], 0xDD);
    t[q] = _mm512_maskz_shuffle_i32x4(kAll16, x0, y0, 0x88);
    t[8 + q] = _mm512_maskz_shuffle_i32x4(kAll16, x0, y0, 0xDD);
    t[4 + q] = _mm512_maskz_shuffle_i32x4(kAll16, x1, y1, 0x88);
    t[12 + q] = _mm512_maskz_shuffle_i32x4(kAll16, x1, y1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The kMR x kNR register tile of C, in float32 for both micro-kernels.
using Tile = __m512[kMR][2];

inline void ZeroTile(Tile &acc) {
  for (int i = 0; i < kMR; ++i) {
    acc[i][0] = _mm512_setzero_ps();
    acc[i][1] = _mm512_setzero_ps();
  }
}

// Asks for the cache lines of the tile's rows [0, mr) of C while the products run: C rows are
// far apart (a row of the output per register row), the hardware prefetcher does not follow
// them, and the tile's store then waited on up to 24 misses to L3 (the Winograd products'
// C of a batch item, ~1 MB, does not stay in L2 between K blocks). Measured alone on the project
// machine: (64, 256 x 946 x 256) 170 -> 176 GFLOP/s, the 1x1 convolutions' (2, 256 x 16384 x 64)
// 140 -> 160.
inline void PrefetchTile(const float *c, int64_t ldc, int mr) {
  for (int i = 0; i < mr; ++i) {
    const char *row = reinterpret_cast<const char *>(c + static_cast<int64_t>(i) * ldc);
    _mm_prefetch(row, _MM_HINT_T0);
    _mm_prefetch(row + 64, _MM_HINT_T0);
    _mm_prefetch(row + 124, _MM_HINT_T0);   // the row's last float, if it starts mid-line
  }
}

// Adds (or writes) one kNR-wide tile row (v0, v1) to a row of C, lanes `low` and `high` only.
inline void StoreTileRow(__m512 v0, __m512 v1, float *row, __mmask16 low, __mmask16 high,
                         bool accumulate) {
  if (accumulate) {
    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(low, row));
    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(high, row + 16));
  }
  _mm512_mask_storeu_ps(row, low, v0);
  _mm512_mask_storeu_ps(row + 16, high, v1);
}

// Adds (or writes) rows [0, mr) x columns [0, nr) of the tile to C, masked at the right edge.
inline void StoreTile(const Tile &acc, float *c, int64_t ldc, int mr, int nr, bool accumulate) {
  const __mmask16 low = LaneMask(nr), high = LaneMask(nr - 16);
  for (int i = 0; i < mr; ++i) {
    StoreTileRow(acc[i][0], acc[i][1], c + static_cast<int64_t>(i) * ldc, low, high, accumulate);
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Float32Format: packed operands are floats, one per k; the micro-kernel runs 28 FMAs per k.
// With kRound, the packed values are rounded to bfloat16 first: the bf16 products of a CPU
// without AVX512_BF16 (same inputs as the bf16 micro-kernel's, float32 arithmetic after).
template <bool kRound>
struct Float32Format {
  using Packed = float;
  static constexpr int kRows = kMR, kBlockRows = kMC;
  struct ThreadScope {};  // nothing to set up per thread
  static constexpr int kKC = 192;  // K block: one B sliver (kKC x kNR, 24 KB) stays in L1
  static int PackedDepth(int kc) { return kc; }
  static float Value(float x) { return kRound ? RoundToBf16(x) : x; }

  // Rows [0, mc) x columns [0, kc) of op(A) into kMR-row slivers: out[s][k][i]. a points at
  // op(A)[0][0]; without transposition op(A)[m][k] = a[m * lda + k], with it a[k * lda + m].
  static void PackA(const float *a, int64_t lda, bool trans, int mc, int kc, float *out) {
    for (int ir = 0; ir < mc; ir += kMR) {
      const int mr = std::min(kMR, mc - ir);
      float *dst = out + static_cast<int64_t>(ir) * kc;
      if (!trans) {
#if defined(__AVX512F__)
        // A row's k are contiguous: 16 k of every row at a time, transposed in registers.
        __m512i rows[16];
        for (int k0 = 0; k0 < kc; k0 += 16) {
          const int count = std::min(16, kc - k0);
          for (int i = 0; i < 16; ++i) {
            rows[i] = i >= mr ? _mm512_setzero_si512()
                              : _mm512_castps_si512(Value(_mm512_maskz_loadu_ps(
                                    LaneMask(count), a + static_cast<int64_t>(ir + i) * lda + k0)));
          }
          Transpose16x16(rows);
          for (int t = 0; t < count; ++t) {
            _mm512_mask_storeu_epi32(dst + (k0 + t) * kMR, LaneMask(kMR), rows[t]);
          }
        }
        continue;
#else
        for (int i = 0; i < mr; ++i) {
          const float *src = a + static_cast<int64_t>(ir + i) * lda;
          for (int k = 0; k < kc; ++k) dst[k * kMR + i] = Value(src[k]);
        }
#endif
      } else {
#if defined(__AVX512F__)
        // A k's rows are contiguous: one masked load and store per k (zero past mr).
        const __mmask16 rows = LaneMask(mr);
        for (int k = 0; k < kc; ++k) {
          const float *src = a + static_cast<int64_t>(k) * lda + ir;
          _mm512_mask_storeu_ps(dst + k * kMR, LaneMask(kMR),
                                Value(_mm512_maskz_loadu_ps(rows, src)));
        }
        continue;
#else
        for (int k = 0; k < kc; ++k) {
          const float *src = a + static_cast<int64_t>(k) * lda + ir;
          for (int i = 0; i < mr; ++i) dst[k * kMR + i] = Value(src[i]);
        }
#endif
      }
      for (int i = mr; i < kMR; ++i) {
        for (int k = 0; k < kc; ++k) dst[k * kMR + i] = 0.0f;
      }
    }
  }

#if defined(__AVX512F__)
  static __m512 Value(__m512 x) { return kRound ? RoundToBf16(x) : x; }

  // Columns [0, nr) x rows [0, kc) of op(B) into one kNR-wide sliver: dst[k][j]. Without
  // transposition op(B)[k][n] = b[k * ldb + n], with it b[n * ldb + k].
  static void PackBSliver(const float *b, int64_t ldb, bool trans, int nr, int kc, float *dst) {
    if (!trans) {
      const __mmask16 low = LaneMask(nr), high = LaneMask(nr - 16);
      for (int k = 0; k < kc; ++k) {
        const float *src = b + static_cast<int64_t>(k) * ldb;
        _mm512_store_ps(dst + k * kNR, Value(_mm512_maskz_loadu_ps(low, src)));
        _mm512_store_ps(dst + k * kNR + 16, Value(_mm512_maskz_loadu_ps(high, src + 16)));
      }
      return;
    }
    __m512i rows[16];  // a column's k are contiguous: 16 columns x 16 k at a time
    for (int half = 0; half < kNR / 16; ++half) {
      for (int k0 = 0; k0 < kc; k0 += 16) {
        const int count = std::min(16, kc - k0);
        for (int c = 0; c < 16; ++c) {
          const int j = half * 16 + c;
          rows[c] = j >= nr ? _mm512_setzero_si512()
                            : _mm512_castps_si512(Value(_mm512_maskz_loadu_ps(
                                  LaneMask(count), b + static_cast<int64_t>(j) * ldb + k0)));
        }
        Transpose16x16(rows);
        for (int t = 0; t < count; ++t) {
          _mm512_store_si512(dst + (k0 + t) * kNR + half * 16, rows[t]);
        }
      }
    }
  }

  // C[0:mr][0:nr] (+)= A sliver (kc x kMR) * B sliver (kc x kNR).
  static void MicroKernel(int kc, const float *__restrict a, const float *__restrict b,
                          float *c, int64_t ldc, int mr, int nr, bool accumulate) {
    Tile acc;
    ZeroTile(acc);
    PrefetchTile(c, ldc, mr);
    for (int k = 0; k < kc; ++k) {
      const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 14
      for (int i = 0; i < kMR; ++i) {
        const __m512 ai = _mm512_set1_ps(a[i]);
        acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
      }
      a += kMR;
      b += kNR;
    }
    StoreTile(acc, c, ldc, mr, nr, accumulate);
  }
#else  // no AVX-512: portable C++ the compiler vectorises for whatever the CPU has
  static void PackBSliver(const float *b, int64_t ldb, bool trans, int nr, int kc, float *dst) {
    for (int k = 0; k < kc; ++k) {
      for (int j = 0; j < kNR; ++j) {
        dst[k * kNR + j] = j >= nr ? 0.0f
                           : Value(trans ? b[static_cast<int64_t>(j) * ldb + k]
                                         : b[static_cast<int64_t>(k) * ldb + j]);
      }
    }
  }

  static void MicroKernel(int kc, const float *__restrict a, const float *__restrict b,
                          float *c, int64_t ldc, int mr, int nr, bool accumulate) {
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
};

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------------
// BFloat16Format: operands rounded to bfloat16 while packing, k in pairs (one 32-bit word per
// row or column and k pair, the even k in the low half); VDPBF16PS multiplies a pair and adds
// both products to a float32 lane, 32 multiply-adds per instruction against 16 for a float32
// FMA (measured on the project's Zen 4: 234 vs 117 GFLOP/s per core). Accumulation is float32.
struct BFloat16Format {
  using Packed = uint32_t;
  static constexpr int kRows = kMR, kBlockRows = kMC;
  struct ThreadScope {};
  static constexpr int kKC = 384;  // k per block: a B sliver is 192 pairs x 32 x 4 B = 24 KB
  static int PackedDepth(int kc) { return (kc + 1) / 2; }

  // 16 words (x0[j], x1[j]) from two 16-float rows: the pairs of two consecutive k.
  static __m512i InterleavePairs(__m512 x0, __m512 x1) {
    const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                           1, 16, 0);
    return _mm512_permutexvar_epi16(order, halves);
  }

  // Words of the consecutive-k run src[0, count) (count <= 32): pair t is (src[2t], src[2t+1]).
  static __m512i PairsOfRun(const float *src, int count) {
    const __m512 lo = _mm512_maskz_loadu_ps(LaneMask(count), src);
    const __m512 hi = _mm512_maskz_loadu_ps(LaneMask(count - 16), src + 16);
    return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  }

  // A rows into kMR-row slivers of pairs: out[s][p][i], zero-padded (rows and an odd last k).
  static void PackA(const float *a, int64_t lda, bool trans, int mc, int kc, uint32_t *out) {
    const int depth = PackedDepth(kc);
    __m512i words[16];
    for (int ir = 0; ir < mc; ir += kMR) {
      const int mr = std::min(kMR, mc - ir);
      uint32_t *dst = out + static_cast<int64_t>(ir) * depth;
      if (!trans) {  // a row's k are contiguous: 16 pairs of every row at a time, transposed
        for (int k0 = 0; k0 < kc; k0 += 32) {
          for (int i = 0; i < 16; ++i) {
            words[i] = i >= mr ? _mm512_setzero_si512()
                               : PairsOfRun(a + static_cast<int64_t>(ir + i) * lda + k0,
                                            std::min(32, kc - k0));
          }
          Transpose16x16(words);
          const int pairs = std::min(16, depth - k0 / 2);
          for (int t = 0; t < pairs; ++t) {
            _mm512_mask_storeu_epi32(dst + (k0 / 2 + t) * kMR, LaneMask(kMR), words[t]);
          }
        }
      } else {  // a k's rows are contiguous: two k at a time make kMR words
        const __mmask16 rows = LaneMask(mr);
        for (int p = 0; p < depth; ++p) {
          const float *src = a + static_cast<int64_t>(2 * p) * lda + ir;
          const __m512 x0 = _mm512_maskz_loadu_ps(rows, src);
          const __m512 x1 = 2 * p + 1 < kc ? _mm512_maskz_loadu_ps(rows, src + lda)
                                           : _mm512_setzero_ps();
          _mm512_mask_storeu_epi32(dst + p * kMR, LaneMask(kMR), InterleavePairs(x0, x1));
        }
      }
    }
  }

  // Columns [0, nr) of op(B) into one kNR-wide sliver of pairs: dst[p][j], zero-padded.
  static void PackBSliver(const float *b, int64_t ldb, bool trans, int nr, int kc,
                          uint32_t *dst) {
    const int depth = PackedDepth(kc);
    if (!trans) {  // a k's columns are contiguous
      const __mmask16 low = LaneMask(nr), high = LaneMask(nr - 16);
      for (int p = 0; p < depth; ++p) {
        const float *src = b + static_cast<int64_t>(2 * p) * ldb;
        const bool second = 2 * p + 1 < kc;
        const __m512 x00 = _mm512_maskz_loadu_ps(low, src);
        const __m512 x01 = _mm512_maskz_loadu_ps(high, src + 16);
        const __m512 x10 = second ? _mm512_maskz_loadu_ps(low, src + ldb) : _mm512_setzero_ps();
        const __m512 x11 = second ? _mm512_maskz_loadu_ps(high, src + ldb + 16)
                                  : _mm512_setzero_ps();
        _mm512_store_si512(dst + p * kNR, InterleavePairs(x00, x10));
        _mm512_store_si512(dst + p * kNR + 16, InterleavePairs(x01, x11));
      }
      return;
    }
    __m512i words[16];  // a column's k are contiguous: 16 columns x 16 pairs at a time
    for (int half = 0; half < kNR / 16; ++half) {
      for (int k0 = 0; k0 < kc; k0 += 32) {
        for (int c = 0; c < 16; ++c) {
          const int j = half * 16 + c;
          words[c] = j >= nr ? _mm512_setzero_si512()
                             : PairsOfRun(b + static_cast<int64_t>(j) * ldb + k0,
                                          std::min(32, kc - k0));
        }
        Transpose16x16(words);
        const int pairs = std::min(16, depth - k0 / 2);
        for (int t = 0; t < pairs; ++t) {
          _mm512_store_si512(dst + (k0 / 2 + t) * kNR + half * 16, words[t]);
        }
      }
    }
  }

  // C[0:mr][0:nr] (+)= A sliver (depth x kMR pairs) * B sliver (depth x kNR pairs).
  static void MicroKernel(int kc, const uint32_t *__restrict a, const uint32_t *__restrict b,
                          float *c, int64_t ldc, int mr, int nr, bool accumulate) {
    Tile acc;
    ZeroTile(acc);
    PrefetchTile(c, ldc, mr);
    const int depth = PackedDepth(kc);
    for (int p = 0; p < depth; ++p) {
      const __m512bh b0 = reinterpret_cast<__m512bh>(_mm512_load_si512(b));
      const __m512bh b1 = reinterpret_cast<__m512bh>(_mm512_load_si512(b + 16));
#pragma GCC unroll 14
      for (int i = 0; i < kMR; ++i) {
        const __m512bh ai = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(a[i])));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
      }
      a += kMR;
      b += kNR;
    }
    StoreTile(acc, c, ldc, mr, nr, accumulate);
  }
};
using Bf16ProductFormat = BFloat16Format;
#else
using Bf16ProductFormat = Float32Format<true>;  // same rounded inputs, float32 FMAs
#endif

#if defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define INSTABOOST_GEMM_AMX 1
// ---------------------------------------------------------------------------------------------
// AmxFormat: the bfloat16 products on the AMX tile unit (TDPBF16PS: a 16 x 16 float32 tile +=
// 16 rows x 16 pairs times 16 pairs x 16 columns). Same rounded operands and float32
// accumulation as BFloat16Format, which packs B the same way (a pair row of a sliver is 32
// columns of words, two 16-column tiles side by side). A is packed row-major instead, a row's
// pairs contiguous, as a tile row wants them; the depth is padded with zero pairs to whole
// tiles (16 pairs). The register tile is 32 x 32: four C tiles, two A and two B tiles.
// Measured on the 2-core Xeon: the micro-kernel alone 1.3-1.7 TFLOP/s per core, against 182
// for the float32 FMA micro-kernel in the same hour.
struct AmxFormat {
  using Packed = uint32_t;
  static constexpr int kRows = 32, kBlockRows = 128;
  static constexpr int kKC = 512;        // k per block: a B sliver is 256 pairs x 128 B = 32 KB
  static constexpr int kTilePairs = 16;  // pairs in one A tile row (64 bytes)
  static int PackedDepth(int kc) {
    return ((kc + 1) / 2 + kTilePairs - 1) / kTilePairs * kTilePairs;
  }

  // The thread's tile registers, configured for the whole product and released after it: the
  // configuration is per thread, and MindSpore's own kernels may run on the calling thread
  // between two products.
  struct ThreadScope {
    ThreadScope() {
      struct alignas(64) Config {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes_per_row[16];
        uint8_t rows[16];
      } config = {};
      config.palette = 1;
      for (int t = 0; t < 8; ++t) {  // 0-3: C, 4-5: A, 6-7: B; each 16 rows of 64 bytes
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
      }
      _tile_loadconfig(&config);
    }
    ~ThreadScope() { _tile_release(); }
  };

  // A rows into kRows-row slivers, row-major: out[row][pair], PackedDepth(kc) pairs per row,
  // zero pairs after kc and zero rows after mc (a NaN there would reach C through 0 * NaN).
  static void PackA(const float *a, int64_t lda, bool trans, int mc, int kc, uint32_t *out) {
    const int depth = PackedDepth(kc);
    const int rows = (mc + kRows - 1) / kRows * kRows;
    if (!trans) {  // a row's k are contiguous: 32 k make one 64-byte run of pairs
      for (int i = 0; i < rows; ++i) {
        uint32_t *dst = out + static_cast<int64_t>(i) * depth;
        for (int k0 = 0; k0 < 2 * depth; k0 += 2 * kTilePairs) {
          const int count = i < mc ? std::max(0, std::min(2 * kTilePairs, kc - k0)) : 0;
          _mm512_store_si512(dst + k0 / 2,
                             BFloat16Format::PairsOfRun(a + static_cast<int64_t>(i) * lda + k0,
                                                        count));
        }
      }
      return;
    }
    __m512i words[16];  // a k's rows are contiguous: 16 rows x 16 pairs at a time, transposed
    for (int i0 = 0; i0 < rows; i0 += 16) {
      const __mmask16 valid = LaneMask(mc - i0);
      for (int p0 = 0; p0 < depth; p0 += kTilePairs) {
        for (int t = 0; t < kTilePairs; ++t) {
          const int k = 2 * (p0 + t);
          const float *src = a + static_cast<int64_t>(k) * lda + i0;
          const __m512 x0 = k < kc ? _mm512_maskz_loadu_ps(valid, src) : _mm512_setzero_ps();
          const __m512 x1 = k + 1 < kc ? _mm512_maskz_loadu_ps(valid, src + lda)
                                       : _mm512_setzero_ps();
          words[t] = BFloat16Format::InterleavePairs(x0, x1);  // lane j: row i0 + j
        }
        Transpose16x16(words);                                  // words[j] lane t: pair p0 + t
        for (int j = 0; j < 16; ++j) {
          _mm512_store_si512(out + static_cast<int64_t>(i0 + j) * depth + p0, words[j]);
        }
      }
    }
  }

  // As BFloat16Format's, then zero pairs up to the padded depth.
  static void PackBSliver(const float *b, int64_t ldb, bool trans, int nr, int kc,
                          uint32_t *dst) {
    BFloat16Format::PackBSliver(b, ldb, trans, nr, kc, dst);
    const int written = BFloat16Format::PackedDepth(kc);
    std::memset(dst + static_cast<int64_t>(written) * kNR, 0,
                sizeof(uint32_t) * (PackedDepth(kc) - written) * kNR);
  }

  // C[0:mr][0:nr] (+)= A sliver (kRows rows x depth pairs) * B sliver (depth pairs x kNR).
  // A whole 32 x 32 tile of C is loaded and stored by the tile unit; an edge tile goes through
  // a buffer and masked stores.
  static void MicroKernel(int kc, const uint32_t *__restrict a, const uint32_t *__restrict b,
                          float *c, int64_t ldc, int mr, int nr, bool accumulate) {
    const int depth = PackedDepth(kc);
    const bool whole = mr == kRows && nr == kNR;
    const int64_t c_stride = ldc * static_cast<int64_t>(sizeof(float));
    if (whole && accumulate) {
      _tile_loadd(0, c, c_stride);
      _tile_loadd(1, c + 16, c_stride);
      _tile_loadd(2, c + 16 * ldc, c_stride);
      _tile_loadd(3, c + 16 * ldc + 16, c_stride);
    } else {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
    }
    const int64_t a_stride = depth * static_cast<int64_t>(sizeof(uint32_t));
    constexpr int64_t b_stride = kNR * sizeof(uint32_t);
    for (int p = 0; p < depth; p += kTilePairs) {
      _tile_loadd(4, a + p, a_stride);
      _tile_loadd(5, a + 16 * depth + p, a_stride);
      _tile_loadd(6, b + p * kNR, b_stride);
      _tile_loadd(7, b + p * kNR + 16, b_stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if (whole) {
      _tile_stored(0, c, c_stride);
      _tile_stored(1, c + 16, c_stride);
      _tile_stored(2, c + 16 * ldc, c_stride);
      _tile_stored(3, c + 16 * ldc + 16, c_stride);
      return;
    }
    alignas(64) float tile[kRows * kNR];
    constexpr int64_t tile_stride = kNR * sizeof(float);
    _tile_stored(0, tile, tile_stride);
    _tile_stored(1, tile + 16, tile_stride);
    _tile_stored(2, tile + 16 * kNR, tile_stride);
    _tile_stored(3, tile + 16 * kNR + 16, tile_stride);
    const __mmask16 low = LaneMask(nr), high = LaneMask(nr - 16);
    for (int i = 0; i < mr; ++i) {
      StoreTileRow(_mm512_load_ps(tile + i * kNR), _mm512_load_ps(tile + i * kNR + 16),
                   c + static_cast<int64_t>(i) * ldc, low, high, accumulate);
    }
  }
};

// Whether this process may use the tile unit: Linux hands out AMX state only on request
// (arch_prctl ARCH_REQ_XCOMP_PERM, once per process); a kernel that refuses leaves the
// bfloat16 products on AVX-512.
bool AmxPermitted() {
  static const bool permitted = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return permitted;
}
#endif

struct Problem {
  int64_t batch, m, n, k;
  bool trans_a, trans_b;
  const float *a, *b;
  int64_t lda, ldb;            // floats between rows of A and of B as stored
  int64_t stride_a, stride_b;  // floats between batch items (0: shared 2-D operand)
  float *c;
};

// Rows [0, mc) of A block `ic` times slivers [first, last) of the packed B panel, into C.
template <class F>
void BlockTimesSlivers(const Problem &p, const float *a, int64_t lda, float *c, int64_t ic,
                       int mc, int64_t pc, int kc, int64_t jc, int first, int last,
                       const typename F::Packed *b_pack, typename F::Packed *a_pack) {
  const float *src = p.trans_a ? a + pc * lda + ic : a + ic * lda + pc;
  F::PackA(src, lda, p.trans_a, mc, kc, a_pack);
  const int64_t depth = F::PackedDepth(kc);
  for (int s = first; s < last; ++s) {
    const int64_t j = jc + static_cast<int64_t>(s) * kNR;
    const int nr = static_cast<int>(std::min<int64_t>(kNR, p.n - j));
    for (int ir = 0; ir < mc; ir += F::kRows) {
      F::MicroKernel(kc, a_pack + ir * depth, b_pack + s * depth * kNR, c + (ic + ir) * p.n + j,
                     p.n, std::min(F::kRows, mc - ir), nr, pc > 0);
    }
  }
}

// Block sizes of one problem. Equal blocks: K = 256 runs as 2 x 128 rather than 192 + 64 (a
// short K block costs a full read-modify-write of C), M = 300 as 112 + 112 + 76, not
// 140 + 140 + 20.
// K blocks are even, so that only the last one can end in half a bfloat16 pair.
template <class F>
struct Blocking {
  int kc, mc;
  int64_t panel_cols;
  explicit Blocking(const Problem &p) {
    const int64_t max_kc = F::kKC, rows = F::kRows;
    const int64_t k_blocks = (p.k + max_kc - 1) / max_kc;
    const int64_t m_blocks = (p.m + F::kBlockRows - 1) / F::kBlockRows;
    kc = static_cast<int>(((p.k + k_blocks - 1) / k_blocks + 1) / 2 * 2);
    mc = static_cast<int>(((p.m + m_blocks - 1) / m_blocks + rows - 1) / rows * rows);
    panel_cols = std::min<int64_t>(kNC, (p.n + kNR - 1) / kNR * kNR);
  }
};

// Packing buffers of the calling thread, kept for the thread's lifetime: allocating them per
// call (2.4 MB for B) gave fresh pages, hence page faults, on every product, and this VM's
// host reclaims freed pages within seconds, which makes them cost about 1.5 s per GB.
class PackBuffers {
 public:
  ~PackBuffers() {
    for (void *buffer : buffers_) std::free(buffer);
  }
  void *Get(int which, int64_t bytes) {
    if (bytes > capacity_[which]) {
      std::free(buffers_[which]);
      const int64_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
      buffers_[which] = std::aligned_alloc(kAlign, static_cast<size_t>(rounded));
      capacity_[which] = rounded;
    }
    return buffers_[which];
  }

 private:
  void *buffers_[2] = {nullptr, nullptr};
  int64_t capacity_[2] = {0, 0};
};

constexpr int kBufferA = 0, kBufferB = 1;

// The calling thread's packed A block (F::kBlockRows rows) or B panel (`columns`) of format F.
template <class F>
typename F::Packed *PackBuffer(int which, int64_t columns) {
  thread_local PackBuffers buffers;
  const int64_t elements = F::PackedDepth(F::kKC) * columns;
  return static_cast<typename F::Packed *>(
      buffers.Get(which, elements * static_cast<int64_t>(sizeof(typename F::Packed))));
}

// C of batch item `item`. With `shared`, all threads of the enclosing parallel region compute
// it together: they pack the B panel in parts and split its slivers (each packs every A block
// for itself); a panel of a few slivers is split by rows of A instead. Without, the calling
// thread computes it alone.
template <class F>
void GemmItem(const Problem &p, const Blocking<F> &blk, int64_t item, bool shared,
              typename F::Packed *a_pack, typename F::Packed *b_pack) {
  const int64_t lda = p.lda, ldb = p.ldb;
  const int threads = shared ? omp_get_num_threads() : 1;
  const int thread = shared ? omp_get_thread_num() : 0;
  const float *a = p.a + item * p.stride_a, *b = p.b + item * p.stride_b;
  float *c = p.c + item * p.m * p.n;
  for (int64_t jc = 0; jc < p.n; jc += kNC) {
    const int nc = static_cast<int>(std::min<int64_t>(kNC, p.n - jc));
    const int slivers = (nc + kNR - 1) / kNR;
    for (int64_t pc = 0; pc < p.k; pc += blk.kc) {
      const int kc = static_cast<int>(std::min<int64_t>(blk.kc, p.k - pc));
      const int64_t depth = F::PackedDepth(kc);
      for (int s = thread * slivers / threads; s < (thread + 1) * slivers / threads; ++s) {
        const int64_t j = jc + static_cast<int64_t>(s) * kNR;
        const float *src = p.trans_b ? b + j * ldb + pc : b + pc * ldb + j;
        F::PackBSliver(src, ldb, p.trans_b, static_cast<int>(std::min<int64_t>(kNR, p.n - j)),
                       kc, b_pack + s * depth * kNR);
      }
      if (shared) {
#pragma omp barrier
      }
      if (slivers >= 2 * threads) {
        const int first = thread * slivers / threads;
        const int last = (thread + 1) * slivers / threads;
        for (int64_t ic = 0; ic < p.m; ic += blk.mc) {
          const int mc = static_cast<int>(std::min<int64_t>(blk.mc, p.m - ic));
          BlockTimesSlivers<F>(p, a, lda, c, ic, mc, pc, kc, jc, first, last, b_pack, a_pack);
        }
      } else {
        const int64_t mc_narrow = std::min<int64_t>(
            blk.mc, ((p.m + threads - 1) / threads + F::kRows - 1) / F::kRows * F::kRows);
        const int64_t blocks = (p.m + mc_narrow - 1) / mc_narrow;
        for (int64_t block = thread * blocks / threads; block < (thread + 1) * blocks / threads;
             ++block) {
          const int64_t ic = block * mc_narrow;
          const int mc = static_cast<int>(std::min<int64_t>(mc_narrow, p.m - ic));
          BlockTimesSlivers<F>(p, a, lda, c, ic, mc, pc, kc, jc, 0, slivers, b_pack, a_pack);
        }
      }
      if (shared) {
#pragma omp barrier
      }
    }
  }
}

// One item, each thread multiplying its own range of K into its own C, summed at the end. For a
// small output from a deep K (the 7x7 stem's weight gradient: 64 x 147 over 65,536 pixels) the
// shared scheme's two barriers per K block cost more than the products (46 GFLOP/s measured).
template <class F>
void GemmSplitK(const Problem &p, int max_threads) {
  const int64_t size = p.m * p.n;
  std::vector<float> partials(static_cast<size_t>(size) * (max_threads - 1));
#pragma omp parallel num_threads(max_threads)
  {
    [[maybe_unused]] const typename F::ThreadScope scope;
    const int thread = omp_get_thread_num(), threads = omp_get_num_threads();
    // K ranges in whole blocks of the format, so that every thread's blocks stay full.
    const int64_t blocks = (p.k + F::kKC - 1) / F::kKC;
    const int64_t k0 = std::min(p.k, thread * blocks / threads * F::kKC);
    const int64_t k1 = std::min(p.k, (thread + 1) * blocks / threads * F::kKC);
    float *c = thread == 0 ? p.c : partials.data() + (thread - 1) * size;
    if (k1 > k0) {
      Problem part = p;
      part.k = k1 - k0;
      part.a = p.trans_a ? p.a + k0 * p.lda : p.a + k0;
      part.b = p.trans_b ? p.b + k0 : p.b + k0 * p.ldb;
      part.c = c;
      const Blocking<F> blk(part);
      typename F::Packed *a_pack = PackBuffer<F>(kBufferA, F::kBlockRows);
      typename F::Packed *b_pack = PackBuffer<F>(kBufferB, blk.panel_cols);
      GemmItem<F>(part, blk, 0, false, a_pack, b_pack);
    } else {
      std::memset(c, 0, sizeof(float) * size);
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < size; ++i) {
      float sum = p.c[i];
      for (int t = 1; t < threads; ++t) sum += partials[(t - 1) * size + i];
      p.c[i] = sum;
    }
  }
}

template <class F>
void Gemm(const Problem &p) {
  if (p.batch == 0 || p.m == 0 || p.n == 0) return;  // an empty C (e.g. zero RoIs): nothing to do
  if (p.k == 0) {
    std::memset(p.c, 0, sizeof(float) * p.batch * p.m * p.n);
    return;
  }
  const Blocking<F> blk(p);
  const int threads = omp_get_max_threads();
  if (p.batch == 1 && threads > 1 && p.m * p.n <= kSplitKMaxOutput &&
      p.k >= kSplitKMinDepthPerThread * threads) {
    GemmSplitK<F>(p, threads);
    return;
  }
  // Batch items split evenly between the threads: each thread runs whole items, with no
  // barrier at all (the shared scheme synchronises twice per K block; with many small items,
  // e.g. the mask head's RoIs, threads spent a quarter of the step waiting there).
  if (p.batch % threads == 0 || p.batch >= 4 * threads) {
#pragma omp parallel
    {
      [[maybe_unused]] const typename F::ThreadScope scope;
      typename F::Packed *a_pack = PackBuffer<F>(kBufferA, F::kBlockRows);
      typename F::Packed *b_pack = PackBuffer<F>(kBufferB, blk.panel_cols);
#pragma omp for schedule(static)
      for (int64_t item = 0; item < p.batch; ++item) {
        GemmItem<F>(p, blk, item, false, a_pack, b_pack);
      }
    }
    return;
  }
  // The calling thread's B buffer is the shared panel (its own share of the work packs A only).
  typename F::Packed *b_pack = PackBuffer<F>(kBufferB, blk.panel_cols);
#pragma omp parallel
  {
    [[maybe_unused]] const typename F::ThreadScope scope;
    typename F::Packed *a_pack = PackBuffer<F>(kBufferA, F::kBlockRows);
    for (int64_t item = 0; item < p.batch; ++item) {
      GemmItem<F>(p, blk, item, true, a_pack, b_pack);
    }
  }
}

// Reads the AOT parameters into a Problem; false for inconsistent shapes.
bool ReadProblem(int nparam, void **params, int *ndims, int64_t **shapes, bool trans_a,
                 bool trans_b, Problem *p) {
  if (nparam != 3) return false;
  // Each tensor as (batch, rows, columns): 2-D ones as (1, rows, columns), see the header.
  int64_t fa[3] = {}, fb[3] = {}, fc[3] = {};
  const int da = tensor_shape::AsMatrixStack(ndims[0], shapes[0], fa);
  const int db = tensor_shape::AsMatrixStack(ndims[1], shapes[1], fb);
  const int dc = tensor_shape::AsMatrixStack(ndims[2], shapes[2], fc);
  if (da == 0 || db == 0 || dc != std::max(da, db)) return false;
  const int64_t *sa = fa + 1, *sb = fb + 1, *sc = dc == 3 ? fc : fc + 1;
  const int64_t batch_a = fa[0], batch_b = fb[0];
  if (da == 3 && db == 3 && batch_a != batch_b) return false;
  // A 2-D operand is shared: the batch is the 3-D operand's, which may be 0 (no RoIs).
  p->batch = da == 3 ? batch_a : (db == 3 ? batch_b : 1);
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
  p->lda = trans_a ? p->m : p->k;
  p->ldb = trans_b ? p->k : p->n;
  p->stride_a = da == 3 ? sa[0] * sa[1] : 0;
  p->stride_b = db == 3 ? sb[0] * sb[1] : 0;
  return true;
}

template <bool trans_a, bool trans_b, bool bf16>
int Run(int nparam, void **params, int *ndims, int64_t **shapes) {
  Problem p;
  if (!ReadProblem(nparam, params, ndims, shapes, trans_a, trans_b, &p)) return 1;
  if (bf16) {
#if defined(INSTABOOST_GEMM_AMX)
    if (AmxPermitted()) {
      Gemm<AmxFormat>(p);
      return 0;
    }
#endif
    Gemm<Bf16ProductFormat>(p);
  } else {
    Gemm<Float32Format<false>>(p);
  }
  return 0;
}

}  // namespace

AOT_ENTRY_FLOAT32(MatMulNN, (Run<false, false, false>))
AOT_ENTRY_FLOAT32(MatMulNT, (Run<false, true, false>))
AOT_ENTRY_FLOAT32(MatMulTN, (Run<true, false, false>))
AOT_ENTRY_FLOAT32(MatMulNNBf16, (Run<false, false, true>))
AOT_ENTRY_FLOAT32(MatMulNTBf16, (Run<false, true, true>))
AOT_ENTRY_FLOAT32(MatMulTNBf16, (Run<true, false, true>))
