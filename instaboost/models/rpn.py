"""Region proposal network: dense head, anchor targets/losses and proposal generation.

Shape shorthand: B images, L levels (5, P2..P6), A_l anchors of level l, A = sum_l A_l,
R sampled anchors per image, P proposals per image, G padded GT slots.

Naming: ``cls_logits`` list of L tensors (B, A_l) float32 (one sigmoid objectness logit per
anchor); ``bbox_deltas`` list of L tensors (B, A_l, 4); ``proposals`` (B, P, 4) xyxy pixels;
``proposal_valid`` (B, P) bool; ``img_meta`` (B, 5) [image_id, orig_h, orig_w, resized_h,
resized_w].

Proposal generation (mmdetection v2 RPNHead, fixed shapes): per level take the ``nms_pre``
highest-scoring anchors, decode and clip to the resized image, mask boxes not larger than
``min_bbox_size``, NMS per level (levels do not suppress each other), then keep the
``max_per_img`` best over all levels. P = min(max_per_img, sum_l min(nms_pre, A_l)) is static;
slots without a surviving box have ``proposal_valid == False``. Proposals are gradient-stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from instaboost.models.anchors import AnchorGenerator
from instaboost.models.assigner import MaxIoUAssigner
from instaboost.models.box_coder import DeltaXYWHBoxCoder
from instaboost.models.layers.conv import build_conv2d
from instaboost.models.layers.nms import SortedNms
from instaboost.models.losses import avg_factor, l1, masked_sum, sigmoid_bce
from instaboost.models.sampler import RandomSampler
from instaboost.structures.boxes import batched_gather, boxes_wh

# mmdetection initialises every RPN conv with N(0, 0.01).
RPN_INIT_STD = 0.01
# Score given to boxes that must not be selected; sigmoid scores are in [0, 1].
MASKED_SCORE = -1.0
# img_meta columns holding the resized (un-padded) image size.
META_RESIZED_H = 3
META_RESIZED_W = 4


@dataclass(frozen=True)
class ProposalConfig:
    """Proposal generation settings (train_cfg.rpn_proposal / test_cfg.rpn)."""

    nms_pre: int
    max_per_img: int
    iou_threshold: float
    min_bbox_size: float = 0.0


def normal_init_(cell: nn.Cell, std: float) -> None:
    """N(0, std) weights and zero biases for every parameter of ``cell``."""
    for param in cell.get_parameters():
        if param.name.endswith("bias"):
            param.set_data(initializer("zeros", param.shape, param.dtype))
        else:
            param.set_data(initializer(Normal(std), param.shape, param.dtype))


def image_hw(img_meta: Tensor) -> tuple[Tensor, Tensor]:
    """Resized image height and width, each float32 (B, 1)."""
    return img_meta[:, META_RESIZED_H:META_RESIZED_H + 1], img_meta[:, META_RESIZED_W:]


class RPNHead(nn.Cell):
    """RPN: shared 3x3 conv + ReLU, 1x1 objectness conv and 1x1 regression conv per level.

    Args:
        in_channels: FPN channels.
        feat_channels: width of the 3x3 conv.
        anchor_generator, box_coder, assigner, sampler: RPN target machinery.
        train_proposal: proposal settings while training; test_proposal: at inference.
        loss_cls_weight, loss_bbox_weight: loss multipliers.
        conv_impl: convolution implementation for ``build_conv2d``.
        nms_impl: "mindspore" or "kernel" (``SortedNms``) for the proposals' NMS.
    """

    def __init__(self, *, in_channels: int, feat_channels: int, anchor_generator: AnchorGenerator,
                 box_coder: DeltaXYWHBoxCoder, assigner: MaxIoUAssigner, sampler: RandomSampler,
                 train_proposal: ProposalConfig, test_proposal: ProposalConfig,
                 loss_cls_weight: float = 1.0, loss_bbox_weight: float = 1.0,
                 conv_impl: str = "native", nms_impl: str = "mindspore"):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.box_coder = box_coder
        self.assigner = assigner
        self.sampler = sampler
        self.train_proposal = train_proposal
        self.test_proposal = test_proposal
        self.loss_cls_weight = float(loss_cls_weight)
        self.loss_bbox_weight = float(loss_bbox_weight)
        num_anchors = anchor_generator.num_base_anchors
        self.num_anchors = num_anchors
        self.rpn_conv = build_conv2d(in_channels, feat_channels, 3, padding=1, has_bias=True,
                                     impl=conv_impl, activation="relu")
        self.rpn_cls = build_conv2d(feat_channels, num_anchors, 1, has_bias=True, impl=conv_impl)
        self.rpn_reg = build_conv2d(feat_channels, num_anchors * 4, 1, has_bias=True,
                                    impl=conv_impl)
        for cell in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            normal_init_(cell, RPN_INIT_STD)
        self._nms_train = SortedNms(train_proposal.iou_threshold, impl=nms_impl)
        self._nms_test = SortedNms(test_proposal.iou_threshold, impl=nms_impl)

    # ------------------------------------------------------------------ dense predictions
    def construct(self, features: Sequence[Tensor]):
        """Same as :meth:`predict`."""
        return self.predict(features)

    def predict(self, features: Sequence[Tensor]):
        """features: L maps (B, C, H_l, W_l) -> (cls_logits [L x (B, A_l)],
        bbox_deltas [L x (B, A_l, 4)]), anchors ordered (y, x, anchor) as in AnchorGenerator."""
        cls_logits, bbox_deltas = [], []
        for feat in features:
            batch = feat.shape[0]
            x = self.rpn_conv(feat)                   # with its ReLU (activation="relu")
            cls_logits.append(self.rpn_cls(x).transpose(0, 2, 3, 1).reshape(batch, -1))
            bbox_deltas.append(self.rpn_reg(x).transpose(0, 2, 3, 1).reshape(batch, -1, 4))
        return cls_logits, bbox_deltas

    def anchors(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Anchors of every level, L tensors float32 (A_l, 4) (cached per feature shapes)."""
        sizes = [(f.shape[2], f.shape[3]) for f in features]
        return [Tensor(a) for a in self.anchor_generator.grid_anchors(sizes)]

    # ------------------------------------------------------------------ training targets
    def loss(self, cls_logits: Sequence[Tensor], bbox_deltas: Sequence[Tensor],
             anchors: Sequence[Tensor], img_meta: Tensor, gt_boxes: Tensor, gt_valid: Tensor,
             gt_crowd: Tensor) -> dict[str, Tensor]:
        """Objectness BCE over sampled anchors + L1 on positive anchors' deltas.

        Both are divided by the number of sampled anchors in the batch (mmdetection's
        avg_factor). Anchors whose centre lies in the batch padding (outside the resized image)
        are ignored. Returns {"loss_rpn_cls", "loss_rpn_bbox"} float32 scalars.
        """
        logits = ops.concat(list(cls_logits), axis=1)  # (B, A)
        deltas = ops.concat(list(bbox_deltas), axis=1)  # (B, A, 4)
        all_anchors = ops.concat(list(anchors), axis=0)  # (A, 4)
        batch, num_anchors = logits.shape
        img_h, img_w = image_hw(img_meta)
        centre_x = 0.5 * (all_anchors[:, 0] + all_anchors[:, 2])
        centre_y = 0.5 * (all_anchors[:, 1] + all_anchors[:, 3])
        anchor_valid = ops.logical_and(centre_x.reshape(1, -1) < img_w,
                                       centre_y.reshape(1, -1) < img_h)  # (B, A)
        anchors_b = ops.broadcast_to(all_anchors.reshape(1, num_anchors, 4),
                                     (batch, num_anchors, 4))
        assign = self.assigner.assign(anchors_b, anchor_valid, gt_boxes, gt_valid, gt_crowd)
        sample = self.sampler.sample(assign.gt_inds)

        sampled_logits = ops.gather_elements(logits, 1, sample.inds)  # (B, R)
        sampled_deltas = batched_gather(deltas, sample.inds)  # (B, R, 4)
        sampled_anchors = ops.gather(all_anchors, sample.inds.reshape(-1), 0).reshape(
            batch, -1, 4)
        matched = ops.relu(ops.gather_elements(assign.gt_inds, 1, sample.inds) - 1)
        targets = ops.stop_gradient(
            self.box_coder.encode(sampled_anchors, batched_gather(gt_boxes, matched)))
        labels = sample.positive.astype(ms.float32)

        norm = avg_factor(sample.valid)
        loss_cls = masked_sum(sigmoid_bce(sampled_logits, labels), sample.valid) / norm
        loss_bbox = masked_sum(l1(sampled_deltas, targets), sample.positive.reshape(batch, -1, 1))
        return {"loss_rpn_cls": loss_cls * self.loss_cls_weight,
                "loss_rpn_bbox": loss_bbox / norm * self.loss_bbox_weight}

    # ------------------------------------------------------------------ proposals
    def get_proposals(self, cls_logits: Sequence[Tensor], bbox_deltas: Sequence[Tensor],
                      anchors: Sequence[Tensor], img_meta: Tensor, *, training: bool):
        """Proposals of every image (see the module docstring).

        Returns (proposals float32 (B, P, 4), proposal_valid bool (B, P),
        proposal_scores float32 (B, P)), all gradient-stopped.
        """
        cfg = self.train_proposal if training else self.test_proposal
        nms = self._nms_train if training else self._nms_test
        img_h, img_w = image_hw(img_meta)
        level_boxes, level_scores, level_keep = [], [], []
        for logits, deltas, level_anchors in zip(cls_logits, bbox_deltas, anchors):
            logits = ops.stop_gradient(logits)
            deltas = ops.stop_gradient(deltas)
            batch, num_level = logits.shape
            k = min(cfg.nms_pre, num_level)
            scores, top_idx = ops.topk(ops.sigmoid(logits), k)
            top_anchors = ops.gather(level_anchors, top_idx.reshape(-1), 0).reshape(batch, k, 4)
            boxes = self.box_coder.decode(top_anchors, batched_gather(deltas, top_idx),
                                          max_shape=(img_h, img_w))
            width, height = boxes_wh(boxes)
            big_enough = ops.logical_and(width > cfg.min_bbox_size, height > cfg.min_bbox_size)
            scores, order = ops.topk(ops.where(big_enough, scores, MASKED_SCORE), k)
            boxes = batched_gather(boxes, order)
            big_enough = scores > MASKED_SCORE
            keep = nms(boxes)
            level_boxes.append(boxes)
            level_scores.append(scores)
            level_keep.append(ops.logical_and(keep, big_enough))
        boxes = ops.concat(level_boxes, axis=1)
        scores = ops.concat(level_scores, axis=1)
        keep = ops.concat(level_keep, axis=1)
        num_out = min(cfg.max_per_img, boxes.shape[1])
        top_scores, top_idx = ops.topk(ops.where(keep, scores, MASKED_SCORE), num_out)
        proposals = batched_gather(boxes, top_idx)
        valid = top_scores > MASKED_SCORE
        return (ops.stop_gradient(proposals), valid, ops.stop_gradient(top_scores))

    def num_proposals(self, featmap_sizes: Sequence[tuple[int, int]], *, training: bool) -> int:
        """Static P for the given feature sizes."""
        cfg = self.train_proposal if training else self.test_proposal
        per_level = [min(cfg.nms_pre, h * w * self.num_anchors) for h, w in featmap_sizes]
        return min(cfg.max_per_img, int(np.sum(per_level)))

    # ------------------------------------------------------------------ entry points
    def forward_train(self, features: Sequence[Tensor], img_meta: Tensor, gt_boxes: Tensor,
                      gt_valid: Tensor, gt_crowd: Tensor):
        """Returns (losses dict, proposals (B, P, 4), proposal_valid (B, P))."""
        cls_logits, bbox_deltas = self.predict(features)
        anchors = self.anchors(features)
        losses = self.loss(cls_logits, bbox_deltas, anchors, img_meta, gt_boxes, gt_valid,
                           gt_crowd)
        proposals, valid, _ = self.get_proposals(cls_logits, bbox_deltas, anchors, img_meta,
                                                 training=True)
        return losses, proposals, valid

    def forward_test(self, features: Sequence[Tensor], img_meta: Tensor):
        """Returns (proposals (B, P, 4), proposal_valid (B, P), proposal_scores (B, P))."""
        cls_logits, bbox_deltas = self.predict(features)
        anchors = self.anchors(features)
        return self.get_proposals(cls_logits, bbox_deltas, anchors, img_meta, training=False)
