"""Masked loss helpers shared by the RPN, bbox and mask heads.

All helpers take per-element losses of any shape plus a boolean mask of the same shape (or
broadcastable) and use ``where`` rather than multiplication, so NaN/inf values in masked-out
elements (e.g. padding) cannot leak into the sum. Into its gradient they still can, where the
per-element loss's own derivative is NaN there (0 * NaN): the inputs of masked-out elements must
stay finite, as the heads' do.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is True. Returns a float32 scalar."""
    mask = ops.broadcast_to(mask, values.shape)
    return ops.where(mask, values, 0.0).sum()


def avg_factor(mask: Tensor, per_element: int = 1) -> Tensor:
    """Normaliser ``max(count(mask) * per_element, 1)`` as a float32 scalar (never zero)."""
    count = mask.astype(ms.float32).sum() * float(per_element)
    return ops.maximum(count, 1.0)


def sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Element-wise binary cross-entropy with logits. Same shape as the inputs (float32)."""
    return ops.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def softmax_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-row softmax cross-entropy. logits (N, C) float32, labels (N,) int32 -> (N,)."""
    return ops.cross_entropy(logits, labels.astype(ms.int32), reduction="none")


def l1(pred: Tensor, target: Tensor) -> Tensor:
    """Element-wise absolute error. Same shape as the inputs."""
    return ops.abs(pred - target)
