"""Max-IoU assigner: label each candidate box (anchor or proposal) positive, negative or ignored.

Shape shorthand: B images, N candidates per image, G padded ground-truth (GT) slots per image.

Conventions (mmdetection v2 ``MaxIoUAssigner`` plus crowd handling):
  * ``gt_inds`` int32 (B, N): ``-1`` ignored, ``0`` negative (background), ``g + 1`` positive and
    matched to GT slot ``g``.
  * Only *target* GTs (``gt_valid & ~gt_crowd``) can be matched. Padding slots and crowd regions
    never become targets.
  * With no target GT in an image, every valid candidate is negative (except crowd-ignored ones).
  * Candidates with ``candidate_valid == False`` (padding proposals, anchors in the batch padding)
    are ignored.

Assignment steps, all fixed-shape and batched:
  1. IoU (B, N, G) with non-target columns and invalid candidates set to -1.
  2. Negative: ``max_iou < neg_iou_thr`` (an image without targets counts as max_iou 0).
  3. Positive: ``max_iou >= pos_iou_thr`` -> its argmax GT.
  4. Low-quality matches (``match_low_quality``): for every target GT whose best IoU is
     ``>= min_pos_iou``, all candidates reaching that best IoU become positive for it (the
     highest-index GT wins ties, as mmdetection's sequential loop does).
  5. Crowd ignore: a candidate that is not positive and whose IoF with some crowd region is
     ``> ignore_iof_thr`` becomes ignored (``ignore_iof_thr <= 0`` disables this).

Example (one image, pos 0.5, neg 0.4, min_pos 0.3): IoUs of three candidates with one GT
[0.6, 0.45, 0.2] -> gt_inds [1, -1, 0]; with IoUs [0.35, 0.1, 0.2] the low-quality rule makes the
first candidate positive -> [1, 0, 0].

Implementations (``impl``, chosen like the other layers' by ``hardware.conv_impl``):
  * "mindspore": the steps above as MindSpore operations on (B, N, G) tensors; any device.
  * "kernel": ``kernels/cpu/max_iou_assign.cc``, every image in one CPU call. The RPN's
    assignment, 65,472 anchors per 512² image, took 134 ms for two images of 8 objects with
    MindSpore's operators on the 2-core project machine, and 500 ms with 30 (it grows with the
    objects: COCO images hold up to 90); the kernel reads each pair once per pass. Same
    decisions bit for bit (the same float32 operations in the same order; tested).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.models.layers.native_kernels import SEPARATE_ROUNDING_FLAGS, aot_op
from instaboost.structures.boxes import index_range, pairwise_iou_iof

ASSIGNER_IMPLS = ("mindspore", "kernel")

# IoU value written into non-target GT columns; below every real IoU (>= 0).
INVALID_IOU = -1.0
# Two IoUs closer than this count as equal when finding every candidate that reaches a GT's best
# IoU (low-quality matching), so float noise does not drop tied anchors.
IOU_TIE_EPS = 1e-6


class AssignResult(NamedTuple):
    """gt_inds int32 (B, N) (-1 ignore / 0 negative / g + 1 positive); max_iou float32 (B, N)."""

    gt_inds: Tensor
    max_iou: Tensor


def assign_gt_candidates_to_themselves(result: AssignResult, gt_target: Tensor) -> AssignResult:
    """`result` for candidates whose first G are the GT boxes themselves (the sampler's
    ``add_gt_as_proposals``): each of them that is a target, gt_target (B, G) bool, becomes its
    own GT's positive with IoU 1, as mmdetection's ``AssignResult.add_gt_`` makes them. By IoU
    alone two identical GT boxes both went to the later one (the low-quality rule keeps the last
    GT), and the earlier GT's label lost its own positive."""
    num_gts = gt_target.shape[1]
    own = ops.broadcast_to(index_range(1, num_gts + 1).reshape(1, num_gts), gt_target.shape)
    gt_inds = ops.concat([ops.where(gt_target, own, result.gt_inds[:, :num_gts]),
                          result.gt_inds[:, num_gts:]], axis=1)
    gt_iou = result.max_iou[:, :num_gts]
    max_iou = ops.concat([ops.where(gt_target, ops.ones_like(gt_iou), gt_iou),
                          result.max_iou[:, num_gts:]], axis=1)
    return AssignResult(gt_inds, max_iou)


@functools.lru_cache(maxsize=None)
def _kernel_op() -> ops.Custom:
    def out_shape(boxes, candidate_valid, gt_boxes, gt_valid, gt_crowd, rules):
        return (tuple(boxes[:2]), tuple(boxes[:2]))

    def out_dtype(*dtypes):
        return (ms.int32, ms.float32)

    return aot_op("max_iou_assign", "MaxIoUAssign", out_shape=out_shape, out_dtype=out_dtype,
                  extra_flags=SEPARATE_ROUNDING_FLAGS)


class MaxIoUAssigner(nn.Cell):
    """Assign candidates to padded GTs by IoU (see the module docstring for the rules).

    Args:
        pos_iou_thr: IoU at or above which a candidate is positive.
        neg_iou_thr: IoU below which a candidate is negative.
        min_pos_iou: minimum best IoU of a GT for low-quality matching.
        match_low_quality: give every GT its best-matching candidates even below pos_iou_thr.
        ignore_iof_thr: IoF with a crowd region above which a non-positive candidate is ignored;
            a value <= 0 disables crowd ignoring.
        impl: "mindspore" or "kernel" (see the module docstring).
    """

    def __init__(self, *, pos_iou_thr: float, neg_iou_thr: float, min_pos_iou: float,
                 match_low_quality: bool = True, ignore_iof_thr: float = -1.0,
                 impl: str = "mindspore"):
        super().__init__()
        if neg_iou_thr > pos_iou_thr:
            raise ValueError(f"neg_iou_thr {neg_iou_thr} must be <= pos_iou_thr {pos_iou_thr}")
        if impl not in ASSIGNER_IMPLS:
            raise ValueError(f"assigner impl must be one of {ASSIGNER_IMPLS}, got {impl!r}")
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = float(neg_iou_thr)
        self.min_pos_iou = float(min_pos_iou)
        self.match_low_quality = bool(match_low_quality)
        self.ignore_iof_thr = float(ignore_iof_thr)
        self.impl = impl
        if impl == "kernel":
            self._op = _kernel_op()
            self._rules = Tensor([self.pos_iou_thr, self.neg_iou_thr, self.min_pos_iou,
                                  float(self.match_low_quality), self.ignore_iof_thr], ms.float32)

    def construct(self, boxes, candidate_valid, gt_boxes, gt_valid, gt_crowd):
        """Same as :meth:`assign`."""
        return self.assign(boxes, candidate_valid, gt_boxes, gt_valid, gt_crowd)

    def assign(self, boxes: Tensor, candidate_valid: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
               gt_crowd: Tensor) -> AssignResult:
        """Assign candidates of every image.

        Args:
            boxes: float32 (B, N, 4) candidates, xyxy pixels.
            candidate_valid: bool (B, N); False -> ignored.
            gt_boxes: float32 (B, G, 4); gt_valid, gt_crowd: bool (B, G).
        Returns:
            AssignResult with gt_inds int32 (B, N) and max_iou float32 (B, N).
        """
        batch, num_boxes = boxes.shape[0], boxes.shape[1]
        num_gts = gt_boxes.shape[1]
        if num_gts == 0:
            gt_inds = ops.where(candidate_valid, ops.zeros((batch, num_boxes), ms.int32),
                                ops.full((batch, num_boxes), -1, dtype=ms.int32))
            return AssignResult(gt_inds, ops.zeros((batch, num_boxes), ms.float32))
        if self.impl == "kernel":
            return AssignResult(*self._op(boxes, candidate_valid, gt_boxes, gt_valid, gt_crowd,
                                          self._rules))
        target = ops.logical_and(gt_valid, ops.logical_not(gt_crowd))  # (B, G)
        crowd = ops.logical_and(gt_valid, gt_crowd)
        iou, iof = pairwise_iou_iof(boxes, gt_boxes)  # (B, N, G) each
        usable = ops.logical_and(candidate_valid[:, :, None], target[:, None, :])
        iou = ops.where(usable, iou, INVALID_IOU)
        max_iou, argmax = ops.max(iou, axis=2)  # (B, N)
        argmax = argmax.astype(ms.int32)

        # Images without targets: max_iou is INVALID_IOU; clamping at 0 makes them negative.
        negative = ops.relu(max_iou) < self.neg_iou_thr
        positive = max_iou >= self.pos_iou_thr
        gt_inds = ops.where(positive, argmax + 1, negative.astype(ms.int32) - 1)  # -1 / 0 / g+1

        if self.match_low_quality:
            gt_max_iou = ops.amax(iou, axis=1)  # (B, G)
            gt_ok = ops.logical_and(target, gt_max_iou >= self.min_pos_iou)
            reaches_best = iou >= (gt_max_iou[:, None, :] - IOU_TIE_EPS)
            low_quality = ops.logical_and(reaches_best, gt_ok[:, None, :])  # (B, N, G)
            slot_ids = index_range(1, num_gts + 1).reshape(1, 1, num_gts)
            last_gt = ops.amax(ops.where(low_quality, slot_ids, 0), axis=2)
            gt_inds = ops.where(last_gt > 0, last_gt, gt_inds)

        if self.ignore_iof_thr > 0:
            in_crowd = ops.logical_and(iof > self.ignore_iof_thr, crowd[:, None, :])
            ignored = ops.logical_and(ops.any(in_crowd, axis=2), gt_inds <= 0)
            gt_inds = ops.where(ignored, -1, gt_inds)

        gt_inds = ops.where(candidate_valid, gt_inds, -1)
        return AssignResult(gt_inds, max_iou)

    def extend_repr(self) -> str:
        return (f"pos_iou_thr={self.pos_iou_thr}, neg_iou_thr={self.neg_iou_thr}, "
                f"min_pos_iou={self.min_pos_iou}, match_low_quality={self.match_low_quality}, "
                f"ignore_iof_thr={self.ignore_iof_thr}, impl={self.impl}")
