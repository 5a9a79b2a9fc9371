"""Box head: shared two-FC trunk, softmax classifier and class-specific box regressor.

Shape shorthand: N RoIs, C channels, S RoI feature size, K foreground classes.
Label convention: 0 is background, 1..K are classes (the batch contract's convention).

Naming: ``cls_logits`` (N, K + 1) float32, column 0 = background; ``bbox_deltas`` (N, K, 4)
float32 (class k uses row k - 1) or (N, 1, 4) when ``reg_class_agnostic``.
"""
from __future__ import annotations

from typing import NamedTuple

import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import Normal, XavierUniform, Zero, initializer

from instaboost.models.layers.linear import build_dense
from instaboost.models.losses import avg_factor, l1, masked_sum, softmax_ce

# Initialisation (mmdetection v2 ConvFCBBoxHead): Xavier for the FCs, small normals for outputs.
CLS_INIT_STD = 0.01
REG_INIT_STD = 0.001


class BBoxLosses(NamedTuple):
    loss_cls: Tensor
    loss_bbox: Tensor


class Shared2FCBBoxHead(nn.Cell):
    """flatten -> FC -> ReLU -> FC -> ReLU -> (cls FC, reg FC).

    Args:
        in_channels: C of the RoI features.
        roi_feat_size: S (7).
        fc_out_channels: width of the two shared FCs (1024).
        num_classes: K foreground classes.
        reg_class_agnostic: one box per RoI instead of one per class.
        loss_cls_weight, loss_bbox_weight: loss multipliers.
        dense_impl: "mindspore" (``nn.Dense``) or "kernel" (``KernelDense``: the C++ matmul
            kernel, in hardware.matmul_precision; chosen with conv_impl "winograd") for the two
            shared FCs; same parameters either way.
    """

    def __init__(self, *, in_channels: int, roi_feat_size: int, fc_out_channels: int,
                 num_classes: int, reg_class_agnostic: bool = False,
                 loss_cls_weight: float = 1.0, loss_bbox_weight: float = 1.0,
                 dense_impl: str = "mindspore"):
        super().__init__()
        self.num_classes = int(num_classes)
        self.roi_feat_size = int(roi_feat_size)
        self.reg_class_agnostic = bool(reg_class_agnostic)
        self.loss_cls_weight = float(loss_cls_weight)
        self.loss_bbox_weight = float(loss_bbox_weight)
        flat = in_channels * self.roi_feat_size * self.roi_feat_size
        self.fc1 = build_dense(flat, fc_out_channels, impl=dense_impl,
                               weight_init=XavierUniform(), bias_init=Zero())
        self.fc2 = build_dense(fc_out_channels, fc_out_channels, impl=dense_impl,
                               weight_init=XavierUniform(), bias_init=Zero())
        self.fc_cls = nn.Dense(fc_out_channels, self.num_classes + 1,
                               weight_init=initializer(Normal(CLS_INIT_STD),
                                                       [self.num_classes + 1, fc_out_channels]),
                               bias_init=Zero())
        self.num_reg_classes = 1 if self.reg_class_agnostic else self.num_classes
        self.fc_reg = nn.Dense(fc_out_channels, 4 * self.num_reg_classes,
                               weight_init=initializer(Normal(REG_INIT_STD),
                                                       [4 * self.num_reg_classes, fc_out_channels]),
                               bias_init=Zero())
        self.relu = nn.ReLU()

    def construct(self, roi_feats: Tensor):
        """roi_feats (N, C, S, S) -> (cls_logits (N, K + 1), bbox_deltas (N, K or 1, 4))."""
        x = roi_feats.reshape(roi_feats.shape[0], -1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        cls_logits = self.fc_cls(x)
        deltas = self.fc_reg(x).reshape(x.shape[0], self.num_reg_classes, 4)
        return cls_logits, deltas

    def select_class_deltas(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """Deltas of each RoI's class. deltas (N, K or 1, 4), labels int32 (N,) 0..K -> (N, 4).

        Background rows (label 0) return class 1's deltas; callers mask them out.
        """
        if self.reg_class_agnostic:
            return deltas[:, 0, :]
        index = ops.maximum(labels.astype(ms.int32) - 1, 0).reshape(-1, 1, 1)
        index = ops.broadcast_to(index, (deltas.shape[0], 1, 4))
        return ops.gather_elements(deltas, 1, index).reshape(-1, 4)

    def loss(self, cls_logits: Tensor, deltas: Tensor, labels: Tensor, bbox_targets: Tensor,
             valid: Tensor, positive: Tensor) -> BBoxLosses:
        """Softmax CE over sampled RoIs and L1 on the positives' deltas.

        cls_logits (N, K + 1); deltas (N, K or 1, 4); labels int32 (N,); bbox_targets (N, 4)
        normalised deltas; valid / positive bool (N,). Both losses are divided by the number of
        valid sampled RoIs (mmdetection's avg_factor).
        """
        norm = avg_factor(valid)
        loss_cls = masked_sum(softmax_ce(cls_logits, labels), valid) / norm
        pos_deltas = self.select_class_deltas(deltas, labels)
        loss_bbox = masked_sum(l1(pos_deltas, bbox_targets), positive.reshape(-1, 1)) / norm
        return BBoxLosses(loss_cls * self.loss_cls_weight, loss_bbox * self.loss_bbox_weight)

    def extend_repr(self) -> str:
        return (f"num_classes={self.num_classes}, roi_feat_size={self.roi_feat_size}, "
                f"reg_class_agnostic={self.reg_class_agnostic}")

