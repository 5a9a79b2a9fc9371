// One step of SGD with momentum and weight decay over every trained parameter in one call, as a
// MindSpore AOT custom-operator entry point: the update of instaboost/engine/optimizer.py.
//
// Why: MindSpore's nn.Momentum runs a weight-decay multiply, an add and an ApplyMomentum per
// parameter, about 600 operators for the 201 tensors (44 M values) of the R50-FPN Mask R-CNN:
// 145 ms per step on the 2-core project machine, compiled with ms.jit as well (139 ms). Here
// every value is read and written once, both threads on it: 33-36 ms.
//
// The same arithmetic as nn.Momentum with a weight decay (MindSpore's _apply_decay, then
// ApplyMomentum without Nesterov), each operation rounded on its own (built with
// -ffp-contract=off):
//   g' = p * weight_decay + g;   m = m * momentum + g';   p = p - lr * m
// The parameters and the momentum buffers are updated in place: MindSpore passes an AOT
// operator the memory of its input tensors, and the Parameters are those tensors.
//
// Entry point (params: inputs, then the output):
//   SgdMomentumUpdate (lr (), momentum (), weight_decay (), p_0..p_{n-1}, m_0..m_{n-1},
//                      g_0..g_{n-1}, all float32; m_i and g_i of p_i's shape) -> done () bool
// Returns non-zero for another dtype or mismatched shapes, before anything is written.
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot_entry.h"
#include "shapes.h"
#include "tensor_chunks.h"

namespace {

constexpr int kScalars = 3;                 // lr, momentum, weight_decay
constexpr int64_t kChunkValues = 1 << 15;   // values per unit of work (128 KB per operand)

int SgdMomentumUpdateImpl(int nparam, void **params, int *ndims, int64_t **shapes,
                          const char **dtypes) {
  if (nparam < kScalars + 1 || (nparam - kScalars - 1) % 3 != 0) return 1;
  const int n = (nparam - kScalars - 1) / 3;
  for (int i = 0; i < kScalars; ++i) {
    if (ndims[i] != 0 || std::strcmp(dtypes[i], "float32") != 0) return 1;
  }
  if (std::strcmp(dtypes[nparam - 1], "bool") != 0) return 1;
  std::vector<int64_t> counts(n);
  for (int i = 0; i < n; ++i) {
    const int p = kScalars + i, m = p + n, g = p + 2 * n;
    for (int t : {p, m, g}) {
      if (std::strcmp(dtypes[t], "float32") != 0 || !tensor_shape::SameShape(ndims, shapes, p, t)) {
        return 1;
      }
    }
    counts[i] = tensor_shape::Product(shapes[p], 0, ndims[p]);
  }
  const std::vector<tensor_chunks::Chunk> chunks = tensor_chunks::Split(counts, kChunkValues);
  const float lr = *static_cast<const float *>(params[0]);
  const float momentum = *static_cast<const float *>(params[1]);
  const float weight_decay = *static_cast<const float *>(params[2]);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t c = 0; c < num_chunks; ++c) {
    const tensor_chunks::Chunk &chunk = chunks[c];
    float *param = static_cast<float *>(params[kScalars + chunk.tensor]) + chunk.start;
    float *moment = static_cast<float *>(params[kScalars + n + chunk.tensor]) + chunk.start;
    const float *grad =
        static_cast<const float *>(params[kScalars + 2 * n + chunk.tensor]) + chunk.start;
#pragma omp simd
    for (int64_t k = 0; k < chunk.count; ++k) {
      const float decayed = param[k] * weight_decay + grad[k];
      const float accum = moment[k] * momentum + decayed;
      moment[k] = accum;
      param[k] = param[k] - lr * accum;
    }
  }
  *static_cast<bool *>(params[nparam - 1]) = true;
  return 0;
}

}  // namespace

AOT_ENTRY(SgdMomentumUpdate, SgdMomentumUpdateImpl)
