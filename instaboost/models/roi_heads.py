"""Standard RoI heads of Mask R-CNN: proposal sampling, box branch and mask branch.

Shape shorthand: B images, G padded GT slots, P proposals per image, N = G + P candidates per
image (GTs are prepended when ``add_gt_as_proposals``), R sampled RoIs per image, Q positive RoI
slots for the mask branch, K foreground classes, D detections per image, M GT mask side, T mask
size (28).

Naming: ``*_valid`` bool masks mark real entries of fixed-size arrays; ``gt_inds`` follow the
assigner convention (-1 ignore, 0 negative, g + 1 matched to GT slot g); labels are 0 for
background and 1..K for classes.

Training (``forward_train``): assign + sample candidates (fixed R), RoIAlign 7x7, box losses;
the first Q sampled slots (the sampler puts positives first) feed the mask branch: RoIAlign 14x14,
mask logits, mask targets from the box-cropped GT masks.

Inference (``forward_test``): class-specific decoding of every proposal, class-wise
``score_thr``, every (proposal, class) candidate above it (a fixed ``test_nms_pre`` best with
``trim_empty_slots`` off), one batched class-aware NMS (boxes
offset by ``label * (image side + 1)`` so classes never overlap), then the ``max_per_img`` best
(D fixed, ``det_valid`` marks real detections) and the mask of each detection's class.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.models.assigner import MaxIoUAssigner, assign_gt_candidates_to_themselves
from instaboost.models.bbox_head import Shared2FCBBoxHead
from instaboost.models.box_coder import DeltaXYWHBoxCoder
from instaboost.models.layers.nms import SortedNms
from instaboost.models.mask_head import FCNMaskHead, build_mask_targets
from instaboost.models.roi_extractor import RoIExtractor
from instaboost.models.rpn import MASKED_SCORE, image_hw
from instaboost.models.sampler import RandomSampler
from instaboost.structures.boxes import batched_gather, index_range

# With `trim_empty_slots`, the mask branch runs on the first n slots only, n = the largest count of
# real entries in the batch rounded up to this bucket, so few distinct shapes ever occur.
ACTIVE_SLOT_BUCKET = 8
# Static shapes only (``trim_empty_slots`` off): the cap on (proposal, class) candidates entering
# the class-aware NMS at test time. A cap loses objects: the near-duplicate proposals of confident
# objects can fill it before NMS. With ``trim_empty_slots`` on (every run of run.py) there is none:
# every candidate above score_thr enters, as in mmdetection's multiclass_nms.
DEFAULT_TEST_NMS_PRE = 1000


def _most_per_image(flags: Tensor) -> int:
    """The largest count of True in a row of `flags` (B, S) bool, read back to the host."""
    return int(flags.astype(ms.int32).sum(axis=1).max().asnumpy())


def bucketed_slots(needed: int, slots: int) -> int:
    """Slots to compute when ``needed`` of ``slots`` hold real entries: ``needed`` rounded up to
    ACTIVE_SLOT_BUCKET (at least one bucket), at most ``slots``."""
    return min(slots, max(ACTIVE_SLOT_BUCKET, -(-needed // ACTIVE_SLOT_BUCKET) * ACTIVE_SLOT_BUCKET))


class Detections(NamedTuple):
    """Fixed-size detections: boxes (B, D, 4), scores (B, D), labels int32 (B, D) 1..K,
    valid bool (B, D), masks float32 (B, D, T, T) probabilities of the predicted class."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor
    masks: Tensor


def rois_from_boxes(boxes: Tensor) -> Tensor:
    """(B, R, 4) per-image boxes -> (B * R, 5) RoIs [batch_index, x1, y1, x2, y2]."""
    batch, num = boxes.shape[0], boxes.shape[1]
    index = ops.broadcast_to(index_range(0, batch, np.float32).reshape(batch, 1, 1),
                             (batch, num, 1))
    return ops.concat([index, boxes], axis=2).reshape(batch * num, 5)


class StandardRoIHeads(nn.Cell):
    """Box + mask RoI heads.

    Args:
        bbox_roi_extractor, bbox_head, bbox_coder: box branch (coder with the box head's stds).
        mask_roi_extractor, mask_head: mask branch.
        assigner, sampler: RoI target machinery (``sampler.add_gt_as_proposals`` is honoured).
        mask_max_pos: Q, positive RoIs per image used by the mask loss.
        score_thr, iou_threshold, max_per_img: test-time post-processing (D = max_per_img).
        test_nms_pre: cap on candidates before the class-aware NMS, with ``trim_empty_slots``
            off only (static shapes); with it on, every candidate above ``score_thr`` enters.
        mask_sampling_ratio: RoIAlign samples per bin side when building mask targets.
        trim_empty_slots: run the mask branch only on the leading slots that hold real entries
            (positives come first in training, valid detections first at test). Measured on CPU
            at 256 px: the 4-conv mask head on 128 fixed slots per image is ~80% of a training
            step, while real images have far fewer positives. Results are identical (the trimmed
            slots are masked out of the loss and the outputs); the shapes then depend on the data,
            so graph mode (jit) needs it off.
        nms_impl: "mindspore" or "kernel" (``SortedNms``) for the test-time NMS.
    """

    def __init__(self, *, bbox_roi_extractor: RoIExtractor, bbox_head: Shared2FCBBoxHead,
                 bbox_coder: DeltaXYWHBoxCoder, mask_roi_extractor: RoIExtractor,
                 mask_head: FCNMaskHead, assigner: MaxIoUAssigner, sampler: RandomSampler,
                 mask_max_pos: int, score_thr: float, iou_threshold: float, max_per_img: int,
                 test_nms_pre: int = DEFAULT_TEST_NMS_PRE, mask_sampling_ratio: int = 2,
                 trim_empty_slots: bool = False, nms_impl: str = "mindspore"):
        super().__init__()
        if mask_max_pos <= 0 or max_per_img <= 0:
            raise ValueError(f"mask_max_pos ({mask_max_pos}) and max_per_img ({max_per_img}) "
                             "must be positive")
        self.bbox_roi_extractor = bbox_roi_extractor
        self.bbox_head = bbox_head
        self.bbox_coder = bbox_coder
        self.mask_roi_extractor = mask_roi_extractor
        # The mask targets' crops run on the RoIAlign kernel when the features' RoIAlign does.
        self._mask_target_impl = "kernel" if mask_roi_extractor.impl == "kernel" else "gather"
        self.mask_head = mask_head
        self.assigner = assigner
        self.sampler = sampler
        self.mask_max_pos = int(mask_max_pos)
        self.score_thr = float(score_thr)
        self.iou_threshold = float(iou_threshold)
        self.max_per_img = int(max_per_img)
        self.test_nms_pre = int(test_nms_pre)
        self.mask_sampling_ratio = int(mask_sampling_ratio)
        self.trim_empty_slots = bool(trim_empty_slots)
        self.num_classes = bbox_head.num_classes
        self._nms = SortedNms(self.iou_threshold, impl=nms_impl)

    def _active_slots(self, flags: Tensor) -> int:
        """Leading slots of `flags` (B, S) bool to compute: S, or with `trim_empty_slots` the
        largest per-image count of True rounded up to ACTIVE_SLOT_BUCKET (the True come first)."""
        slots = flags.shape[1]
        if not self.trim_empty_slots:
            return slots
        return bucketed_slots(_most_per_image(flags), slots)

    def _candidate_count(self, cand_valid: Tensor) -> int:
        """(proposal, class) candidates to keep for the class-aware NMS, of `cand_valid` (B, C):
        with `trim_empty_slots`, every valid one of the image that has most (rounded up to a power
        of two, at least max_per_img, so that few distinct shapes occur); else `test_nms_pre`."""
        total = cand_valid.shape[1]
        if not self.trim_empty_slots:
            return min(self.test_nms_pre, total)
        count = _most_per_image(cand_valid)
        return min(total, max(self.max_per_img, 1 << max(count - 1, 0).bit_length()))

    # ------------------------------------------------------------------ training
    def forward_train(self, features: Sequence[Tensor], img_meta: Tensor, proposals: Tensor,
                      proposal_valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                      gt_masks: Tensor, gt_valid: Tensor, gt_crowd: Tensor) -> dict[str, Tensor]:
        """Box and mask losses.

        features: FPN maps; proposals (B, P, 4) + proposal_valid (B, P); GT tensors per the
        batch contract. Returns {"loss_cls", "loss_bbox", "loss_mask"} float32 scalars.
        """
        candidates, candidate_valid = proposals, proposal_valid
        if self.sampler.add_gt_as_proposals:
            gt_target = ops.logical_and(gt_valid, ops.logical_not(gt_crowd))
            candidates = ops.concat([gt_boxes, proposals], axis=1)
            candidate_valid = ops.concat([gt_target, proposal_valid], axis=1)
        candidates = ops.stop_gradient(candidates)
        assign = self.assigner.assign(candidates, candidate_valid, gt_boxes, gt_valid, gt_crowd)
        if self.sampler.add_gt_as_proposals:
            assign = assign_gt_candidates_to_themselves(assign, gt_target)
        sample = self.sampler.sample(assign.gt_inds)  # (B, R)
        num_rois = sample.inds.shape[1]

        roi_boxes = batched_gather(candidates, sample.inds)  # (B, R, 4)
        matched = ops.relu(ops.gather_elements(assign.gt_inds, 1, sample.inds) - 1)  # (B, R)
        labels = ops.where(sample.positive, ops.gather_elements(gt_labels, 1, matched), 0)
        bbox_targets = ops.stop_gradient(
            self.bbox_coder.encode(roi_boxes, batched_gather(gt_boxes, matched)))

        roi_feats = self.bbox_roi_extractor(features, rois_from_boxes(roi_boxes))
        cls_logits, deltas = self.bbox_head(roi_feats)
        bbox_losses = self.bbox_head.loss(cls_logits, deltas, labels.reshape(-1),
                                          bbox_targets.reshape(-1, 4), sample.valid.reshape(-1),
                                          sample.positive.reshape(-1))

        num_pos_slots = self._active_slots(sample.positive[:, :min(self.mask_max_pos, num_rois)])
        pos_boxes = roi_boxes[:, :num_pos_slots]
        pos_valid = sample.positive[:, :num_pos_slots]
        pos_gt = matched[:, :num_pos_slots]
        pos_labels = labels[:, :num_pos_slots].reshape(-1)
        mask_targets = build_mask_targets(pos_boxes, pos_gt, gt_boxes, gt_masks,
                                          mask_size=self.mask_head.mask_size,
                                          sampling_ratio=self.mask_sampling_ratio,
                                          roi_align_impl=self._mask_target_impl)
        mask_feats = self.mask_roi_extractor(features, rois_from_boxes(pos_boxes))
        class_logits = self.mask_head(mask_feats, pos_labels)
        loss_mask = self.mask_head.loss(class_logits, mask_targets, pos_valid.reshape(-1))
        return {"loss_cls": bbox_losses.loss_cls, "loss_bbox": bbox_losses.loss_bbox,
                "loss_mask": loss_mask}

    # ------------------------------------------------------------------ inference
    def forward_test(self, features: Sequence[Tensor], img_meta: Tensor, proposals: Tensor,
                     proposal_valid: Tensor) -> Detections:
        """Detections with masks for every image (see the module docstring)."""
        batch, num_props = proposals.shape[0], proposals.shape[1]
        num_classes = self.num_classes
        cls_logits, deltas = self.bbox_head(
            self.bbox_roi_extractor(features, rois_from_boxes(proposals)))
        scores = ops.softmax(cls_logits, axis=-1)[:, 1:].reshape(batch, num_props * num_classes)
        num_reg = deltas.shape[1]
        prop_rep = ops.broadcast_to(proposals.reshape(batch, num_props, 1, 4),
                                    (batch, num_props, num_reg, 4))
        img_h, img_w = image_hw(img_meta)
        boxes = self.bbox_coder.decode(prop_rep, deltas.reshape(batch, num_props, num_reg, 4),
                                       max_shape=(img_h.reshape(batch, 1, 1),
                                                  img_w.reshape(batch, 1, 1)))
        boxes = ops.broadcast_to(boxes, (batch, num_props, num_classes, 4)).reshape(
            batch, num_props * num_classes, 4)
        cand_valid = ops.logical_and(
            scores > self.score_thr,
            ops.broadcast_to(proposal_valid.reshape(batch, num_props, 1),
                             (batch, num_props, num_classes)).reshape(batch, -1))

        num_cand = self._candidate_count(cand_valid)
        cand_scores, cand_idx = ops.topk(ops.where(cand_valid, scores, MASKED_SCORE), num_cand)
        cand_boxes = batched_gather(boxes, cand_idx)
        cand_labels = cand_idx % num_classes + 1
        cand_valid = cand_scores > MASKED_SCORE

        # Class-aware NMS in one call: boxes are clipped to the image, so shifting class c by
        # c * (image side + 1) puts every class in its own region of the plane.
        offset = ops.maximum(img_h, img_w) + 1.0  # (B, 1)
        shifted = cand_boxes + (cand_labels.astype(ms.float32) * offset).reshape(
            batch, num_cand, 1)
        keep = ops.logical_and(self._nms(shifted), cand_valid)

        if num_cand < self.max_per_img:  # tiny models/tests: pad to the fixed D
            pad = self.max_per_img - num_cand
            filler = ops.full((batch, pad), MASKED_SCORE, dtype=ms.float32)
            cand_scores = ops.concat([cand_scores, filler], axis=1)
            cand_boxes = ops.concat([cand_boxes, ops.zeros((batch, pad, 4), ms.float32)], axis=1)
            cand_labels = ops.concat([cand_labels, ops.ones((batch, pad), cand_labels.dtype)],
                                     axis=1)
            keep = ops.concat([keep, ops.zeros((batch, pad), ms.bool_)], axis=1)
        det_scores, det_idx = ops.topk(ops.where(keep, cand_scores, MASKED_SCORE),
                                       self.max_per_img)
        det_valid = det_scores > MASKED_SCORE
        det_boxes = batched_gather(cand_boxes, det_idx)
        det_labels = ops.gather_elements(cand_labels, 1, det_idx).astype(ms.int32)
        det_scores = ops.where(det_valid, det_scores, 0.0)
        det_boxes = ops.where(det_valid.reshape(batch, -1, 1), det_boxes, 0.0)

        slots = self._active_slots(det_valid)
        mask_feats = self.mask_roi_extractor(features, rois_from_boxes(det_boxes[:, :slots]))
        mask_probs = ops.sigmoid(self.mask_head(mask_feats, det_labels[:, :slots].reshape(-1)))
        mask_size = self.mask_head.mask_size
        det_masks = mask_probs.reshape(batch, slots, mask_size, mask_size)
        if slots < self.max_per_img:
            det_masks = ops.concat([det_masks, ops.zeros((batch, self.max_per_img - slots, mask_size, mask_size),
                                                         ms.float32)], axis=1)
        det_masks = ops.where(det_valid.reshape(batch, -1, 1, 1), det_masks, 0.0)
        return Detections(det_boxes, det_scores, det_labels, det_valid, det_masks)
