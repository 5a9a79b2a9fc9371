"""Mask R-CNN meta-architecture: backbone -> FPN -> RPN -> RoI heads.

Shape shorthand:
    B  images per batch                 Hp, Wp  padded image size (fixed per call)
    G  padded GT slots (``num_gts``)    M       GT mask side (``gt_mask_size``)
    A  anchors per image (all levels)   P       proposals per image (fixed)
    R  sampled RoIs per image           K       foreground classes (labels 1..K, 0 background)
    D  detections per image (``test_cfg.rcnn.max_per_img``)

Inputs follow the batch contract (docs in CONTRACTS.md):
    image float32 (B, 3, Hp, Wp); img_meta float32 (B, 5) [image_id, orig_h, orig_w, resized_h,
    resized_w]; gt_boxes float32 (B, G, 4) xyxy resized pixels; gt_labels int32 (B, G);
    gt_masks uint8 (B, G, M, M) box-cropped masks; gt_valid bool (B, G); gt_crowd bool (B, G).

Every intermediate shape is static for a given (B, Hp, Wp, G) (with ``trim_empty_slots`` off):
masks and fixed-k ``top_k`` replace boolean indexing, and the only Python loops run over B, FPN
levels or heads. The train step still runs in PyNative mode: MindSpore 2.10's graph compiler
failed on the whole step with every convolution path (README, Known limits).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from instaboost.models.roi_heads import Detections, StandardRoIHeads, bucketed_slots
from instaboost.models.rpn import RPNHead

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")
IMG_META_COLUMNS = 5


class MaskRCNN(nn.Cell):
    """Two-stage instance segmentation model.

    Args:
        backbone: Cell, image (B, 3, Hp, Wp) -> tuple of feature maps (C2..C5).
        neck: Cell, backbone features -> tuple of FPN maps (P2..P6).
        rpn_head: :class:`RPNHead` (objectness, anchor losses, proposals).
        roi_heads: :class:`StandardRoIHeads` (box and mask branches).

    ``construct`` is ``forward_train``; inference uses ``forward_test``.
    """

    loss_names = LOSS_NAMES

    def __init__(self, *, backbone: nn.Cell, neck: nn.Cell, rpn_head: RPNHead,
                 roi_heads: StandardRoIHeads):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_heads = roi_heads

    def extract_features(self, image: Tensor) -> tuple:
        """image (B, 3, Hp, Wp) -> FPN maps, each (B, C, Hp / s, Wp / s)."""
        return tuple(self.neck(self.backbone(image)))

    def construct(self, image, img_meta, gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd):
        return self.forward_train(image, img_meta, gt_boxes, gt_labels, gt_masks, gt_valid,
                                  gt_crowd)

    def forward_train(self, image: Tensor, img_meta: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                      gt_masks: Tensor, gt_valid: Tensor, gt_crowd: Tensor) -> dict[str, Tensor]:
        """Training losses: dict of float32 scalars keyed by ``LOSS_NAMES``."""
        _check_batch(image, img_meta, gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd)
        if self.roi_heads.trim_empty_slots:
            gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd = _drop_trailing_empty_slots(
                gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd)
        features = self.extract_features(image)
        rpn_losses, proposals, proposal_valid = self.rpn_head.forward_train(
            features, img_meta, gt_boxes, gt_valid, gt_crowd)
        roi_losses = self.roi_heads.forward_train(features, img_meta, proposals, proposal_valid,
                                                  gt_boxes, gt_labels, gt_masks, gt_valid,
                                                  gt_crowd)
        losses = dict(rpn_losses)
        losses.update(roi_losses)
        return {name: losses[name] for name in LOSS_NAMES}

    def forward_test(self, image: Tensor, img_meta: Tensor):
        """Inference.

        Returns (det_boxes float32 (B, D, 4) xyxy resized-image pixels, det_scores float32
        (B, D), det_labels int32 (B, D) in 1..K, det_valid bool (B, D), det_masks float32
        (B, D, 28, 28) probabilities of the predicted class inside each box). Entries with
        ``det_valid == False`` have zero boxes, scores and masks, labels of any class, and must
        be ignored.
        """
        if image.ndim != 4 or img_meta.shape != (image.shape[0], IMG_META_COLUMNS):
            raise ValueError(f"expected image (B, 3, H, W) and img_meta (B, {IMG_META_COLUMNS}), "
                             f"got {image.shape} and {img_meta.shape}")
        features = self.extract_features(image)
        proposals, proposal_valid, _ = self.rpn_head.forward_test(features, img_meta)
        dets: Detections = self.roi_heads.forward_test(features, img_meta, proposals,
                                                       proposal_valid)
        return dets.boxes, dets.scores, dets.labels, dets.valid, dets.masks


def _drop_trailing_empty_slots(gt_boxes: Tensor, gt_labels: Tensor, gt_masks: Tensor,
                               gt_valid: Tensor, gt_crowd: Tensor) -> tuple:
    """GT tensors cut to the slots up to the last valid GT of the batch, bucketed like the mask
    branch's slots (`bucketed_slots`; PyNative only: the shapes then vary).

    num_gts is sized for the most crowded image (100 by default), real images have a few GTs,
    and every assigner computes IoUs against all slots: (B, anchors, G) for the RPN. Empty slots
    are invalid and ignored by every loss, so only the samplers' random draws change.
    """
    slots = gt_valid.shape[1]
    used = np.flatnonzero(gt_valid.asnumpy().any(axis=0))
    needed = int(used[-1]) + 1 if used.size else 0
    keep = bucketed_slots(needed, slots)
    if keep == slots:
        return gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd
    return tuple(t[:, :keep] for t in (gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd))


def _check_batch(image, img_meta, gt_boxes, gt_labels, gt_masks, gt_valid, gt_crowd) -> None:
    """Static shape/dtype checks of a training batch against the batch contract."""
    batch = image.shape[0]
    num_gts = gt_boxes.shape[1]
    expected = {
        "image": (image.shape, (batch, 3) + tuple(image.shape[2:])),
        "img_meta": (img_meta.shape, (batch, IMG_META_COLUMNS)),
        "gt_boxes": (gt_boxes.shape, (batch, num_gts, 4)),
        "gt_labels": (gt_labels.shape, (batch, num_gts)),
        "gt_valid": (gt_valid.shape, (batch, num_gts)),
        "gt_crowd": (gt_crowd.shape, (batch, num_gts)),
    }
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"{name}: expected shape {want}, got {tuple(got)}")
    if gt_masks.ndim != 4 or tuple(gt_masks.shape[:2]) != (batch, num_gts) \
            or gt_masks.shape[2] != gt_masks.shape[3]:
        raise ValueError(f"gt_masks: expected (B, G, M, M) with B={batch}, G={num_gts}, "
                         f"got {tuple(gt_masks.shape)}")
    if gt_valid.dtype != ms.bool_ or gt_crowd.dtype != ms.bool_:
        raise ValueError(f"gt_valid/gt_crowd must be bool, got {gt_valid.dtype}/{gt_crowd.dtype}")
