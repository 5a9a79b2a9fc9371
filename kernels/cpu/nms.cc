// Greedy non-maximum suppression of boxes already sorted by descending score, every image of a
// batch in one call, as a MindSpore AOT custom-operator entry point.
//
// Why: MindSpore's NMSWithMask takes one image's (N, 5) boxes-and-scores, re-sorts them, and
// fills the whole N x N suppression matrix before its greedy pass: 10-16 ms for the RPN's 2000
// proposals of one level, about 0.1 s of a 512² train step (10 calls). Here a box is compared
// only with the later boxes while it is itself kept, 16 at a time, in well under a millisecond.
//
// Same decisions as NMSWithMask: areas (x2 - x1) * (y2 - y1) with no +1, box j is suppressed by
// an earlier kept box i when inter / (area_i + area_j - inter) > threshold (strictly), so a NaN
// ratio (degenerate boxes) suppresses nothing. Built with -ffp-contract=off (see nms.py): the
// union must be rounded as a separate subtraction, not fused with the product into an FMA.
//
// Entry point (params: inputs, then the output):
//   SortedNms (boxes (B, N, 4) float32 sorted per image, iou_threshold () float32)
//             -> keep (B, N) bool
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot_entry.h"

namespace {

// Boxes of one image as columns (contiguous per coordinate, so the inner loop vectorises).
struct BoxColumns {
  std::vector<float> x1, y1, x2, y2, area;
  explicit BoxColumns(const float *boxes, int64_t n) : x1(n), y1(n), x2(n), y2(n), area(n) {
    for (int64_t i = 0; i < n; ++i) {
      const float *box = boxes + 4 * i;
      x1[i] = box[0];
      y1[i] = box[1];
      x2[i] = box[2];
      y2[i] = box[3];
      area[i] = (box[2] - box[0]) * (box[3] - box[1]);
    }
  }
};

void SuppressImage(const float *boxes, int64_t n, float threshold, bool *keep) {
  const BoxColumns c(boxes, n);
  std::vector<uint8_t> kept(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    if (!kept[i]) continue;
    const float ix1 = c.x1[i], iy1 = c.y1[i], ix2 = c.x2[i], iy2 = c.y2[i], iarea = c.area[i];
#pragma omp simd
    for (int64_t j = i + 1; j < n; ++j) {
      const float width = std::max(std::min(ix2, c.x2[j]) - std::max(ix1, c.x1[j]), 0.0f);
      const float height = std::max(std::min(iy2, c.y2[j]) - std::max(iy1, c.y1[j]), 0.0f);
      const float inter = width * height;
      const float ratio = inter / ((iarea + c.area[j]) - inter);
      kept[j] &= static_cast<uint8_t>(!(ratio > threshold));
    }
  }
  for (int64_t i = 0; i < n; ++i) keep[i] = kept[i] != 0;
}

int SortedNmsImpl(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 3 || ndims[0] != 3 || shapes[0][2] != 4 || ndims[1] != 0 || ndims[2] != 2) {
    return 1;
  }
  if (std::strcmp(dtypes[0], "float32") != 0 || std::strcmp(dtypes[1], "float32") != 0 ||
      std::strcmp(dtypes[2], "bool") != 0) {
    return 1;
  }
  const int64_t batch = shapes[0][0], n = shapes[0][1];
  const float *boxes = static_cast<const float *>(params[0]);
  const float threshold = static_cast<const float *>(params[1])[0];
  bool *keep = static_cast<bool *>(params[2]);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < batch; ++b) {
    SuppressImage(boxes + b * n * 4, n, threshold, keep + b * n);
  }
  return 0;
}

}  // namespace

AOT_ENTRY(SortedNms, SortedNmsImpl)
