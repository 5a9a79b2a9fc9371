// Max-IoU assignment of candidate boxes (anchors, proposals) to ground-truth boxes, every image of
// a batch in one call, as a MindSpore AOT custom-operator entry point. The rules are those of
// instaboost/models/assigner.py (its module docstring), which also holds the MindSpore version.
//
// Why: written with MindSpore's operators the assignment is some thirty broadcast operations on
// (B, N, G) tensors; the RPN's, with the 65,472 anchors of a 512^2 image, took 134 ms for two
// images of 8 objects on the 2-core project machine and 500 ms with 30 objects (it grows with the
// objects). Here each candidate-GT pair is read once per pass, in a few milliseconds.
//
// Same decisions as assigner.py, bit for bit: the intersection, areas, union and ratios are the
// same float32 operations in the same order (built with -ffp-contract=off, see assigner.py, so
// no product is fused into a sum), the first GT of equal IoUs is a candidate's argmax, and the
// last GT whose best IoU a candidate reaches wins its low-quality match.
//
// Entry point (params: inputs, then outputs):
//   MaxIoUAssign (boxes (B, N, 4) float32, candidate_valid (B, N) bool, gt_boxes (B, G, 4)
//                 float32, gt_valid (B, G) bool, gt_crowd (B, G) bool, rules (5,) float32:
//                 pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality (0 or 1),
//                 ignore_iof_thr (<= 0: no crowd ignoring))
//                -> gt_inds (B, N) int32 (-1 ignored, 0 negative, g + 1 positive for slot g),
//                   max_iou (B, N) float32 (-1 where no target GT or invalid candidate)
// G >= 1 (assigner.py answers G = 0 itself). Returns non-zero for wrong dtypes or shapes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "aot_entry.h"

namespace {

constexpr float kAreaEps = 1e-6f;      // boxes.py AREA_EPS
constexpr float kInvalidIou = -1.0f;   // assigner.py INVALID_IOU
constexpr float kIouTieEps = 1e-6f;    // assigner.py IOU_TIE_EPS

struct Rules {
  float pos_iou_thr, neg_iou_thr, min_pos_iou;
  bool match_low_quality;
  float ignore_iof_thr;
};

inline float Relu(float x) { return x > 0.0f ? x : 0.0f; }

inline float Area(const float *box) { return Relu(box[2] - box[0]) * Relu(box[3] - box[1]); }

// boxes.py pairwise_intersection: min(a2, b2) - max(a1, b1) as (a2 - a1) - relu(a2 - b2) -
// relu(b1 - a1), per axis, clamped at zero.
inline float Intersection(const float *a, const float *b) {
  const float width = Relu(((a[2] - a[0]) - Relu(a[2] - b[2])) - Relu(b[0] - a[0]));
  const float height = Relu(((a[3] - a[1]) - Relu(a[3] - b[3])) - Relu(b[1] - a[1]));
  return width * height;
}

// The IoU of candidate `a` (area `area_a`) with GT `b` (area `area_b`), as pairwise_iou_iof.
inline float Iou(const float *a, float area_a, const float *b, float area_b) {
  const float inter = Intersection(a, b);
  return inter / std::max((area_a + area_b) - inter, kAreaEps);
}

void AssignImage(const float *boxes, const bool *candidate_valid, int64_t n, const float *gt_boxes,
                 const bool *gt_valid, const bool *gt_crowd, int64_t g, const Rules &rules,
                 int32_t *gt_inds, float *max_iou) {
  std::vector<uint8_t> target(g), crowd(g);
  std::vector<float> gt_area(g), gt_max(g, kInvalidIou);
  for (int64_t j = 0; j < g; ++j) {
    target[j] = gt_valid[j] && !gt_crowd[j];
    crowd[j] = gt_valid[j] && gt_crowd[j];
    gt_area[j] = Area(gt_boxes + 4 * j);
  }
  const bool crowd_ignoring = rules.ignore_iof_thr > 0.0f;

  // Pass 1: each candidate's best target GT (IoU of unusable pairs: kInvalidIou), its label by
  // the thresholds, crowd ignoring, and each GT's best IoU over all candidates.
  for (int64_t i = 0; i < n; ++i) {
    const float *box = boxes + 4 * i;
    const float area = Area(box);
    float best = kInvalidIou;
    int64_t best_j = 0;
    bool in_crowd = false;
    for (int64_t j = 0; j < g; ++j) {
      const float *gt = gt_boxes + 4 * j;
      float iou = kInvalidIou;
      if (candidate_valid[i] && target[j]) iou = Iou(box, area, gt, gt_area[j]);
      if (iou > best) {
        best = iou;
        best_j = j;
      }
      gt_max[j] = std::max(gt_max[j], iou);
      if (crowd_ignoring && crowd[j]) {
        in_crowd |= Intersection(box, gt) / std::max(area, kAreaEps) > rules.ignore_iof_thr;
      }
    }
    int32_t label = best >= rules.pos_iou_thr ? static_cast<int32_t>(best_j) + 1
                    : Relu(best) < rules.neg_iou_thr ? 0 : -1;
    // Crowd ignoring: of the candidates that are not positive here; pass 2 overrides it for a
    // low-quality match, as assigner.py applies it after those matches.
    if (in_crowd && label <= 0) label = -1;
    gt_inds[i] = candidate_valid[i] ? label : -1;
    max_iou[i] = best;
  }
  if (!rules.match_low_quality) return;

  // Pass 2: every valid candidate reaching a usable GT's best IoU (within kIouTieEps) becomes
  // that GT's positive; the last such GT wins.
  std::vector<uint8_t> gt_ok(g);
  std::vector<float> reach(g);
  bool any_ok = false;
  for (int64_t j = 0; j < g; ++j) {
    gt_ok[j] = target[j] && gt_max[j] >= rules.min_pos_iou;
    reach[j] = gt_max[j] - kIouTieEps;
    any_ok |= gt_ok[j] != 0;
  }
  if (!any_ok) return;
  for (int64_t i = 0; i < n; ++i) {
    if (!candidate_valid[i]) continue;
    const float *box = boxes + 4 * i;
    const float area = Area(box);
    for (int64_t j = g - 1; j >= 0; --j) {
      if (gt_ok[j] && Iou(box, area, gt_boxes + 4 * j, gt_area[j]) >= reach[j]) {
        gt_inds[i] = static_cast<int32_t>(j) + 1;
        break;
      }
    }
  }
}

bool Is(const char *dtype, const char *name) { return std::strcmp(dtype, name) == 0; }

int MaxIoUAssignImpl(int nparam, void **params, int *ndims, int64_t **shapes,
                     const char **dtypes) {
  if (nparam != 8 || ndims[0] != 3 || shapes[0][2] != 4 || ndims[2] != 3 || shapes[2][2] != 4) {
    return 1;
  }
  const int64_t batch = shapes[0][0], n = shapes[0][1], g = shapes[2][1];
  if (shapes[2][0] != batch || g < 1) return 1;
  for (int i : {1, 6, 7}) {  // (B, N): candidate_valid, gt_inds, max_iou
    if (ndims[i] != 2 || shapes[i][0] != batch || shapes[i][1] != n) return 1;
  }
  for (int i : {3, 4}) {     // (B, G): gt_valid, gt_crowd
    if (ndims[i] != 2 || shapes[i][0] != batch || shapes[i][1] != g) return 1;
  }
  if (ndims[5] != 1 || shapes[5][0] != 5) return 1;
  if (!Is(dtypes[0], "float32") || !Is(dtypes[1], "bool") || !Is(dtypes[2], "float32") ||
      !Is(dtypes[3], "bool") || !Is(dtypes[4], "bool") || !Is(dtypes[5], "float32") ||
      !Is(dtypes[6], "int32") || !Is(dtypes[7], "float32")) {
    return 1;
  }
  const float *values = static_cast<const float *>(params[5]);
  const Rules rules{values[0], values[1], values[2], values[3] != 0.0f, values[4]};
  const float *boxes = static_cast<const float *>(params[0]);
  const bool *candidate_valid = static_cast<const bool *>(params[1]);
  const float *gt_boxes = static_cast<const float *>(params[2]);
  const bool *gt_valid = static_cast<const bool *>(params[3]);
  const bool *gt_crowd = static_cast<const bool *>(params[4]);
  int32_t *gt_inds = static_cast<int32_t *>(params[6]);
  float *max_iou = static_cast<float *>(params[7]);
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < batch; ++b) {
    AssignImage(boxes + b * n * 4, candidate_valid + b * n, n, gt_boxes + b * g * 4,
                gt_valid + b * g, gt_crowd + b * g, g, rules, gt_inds + b * n, max_iou + b * n);
  }
  return 0;
}

}  // namespace

AOT_ENTRY(MaxIoUAssign, MaxIoUAssignImpl)
