"""Batch-norm factory: trainable BN, BN with fixed statistics, and frozen BN.

All variants are ``nn.BatchNorm2d`` cells, so they hold the same four parameters under the same
names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``, each float32 (C,)) and a
checkpoint written with one variant loads into any other. They differ only in behaviour:

* ``"bn"``: batch statistics in training mode, running statistics in eval mode; the running
  statistics are updated in training (momentum 0.1 in PyTorch's convention).
* ``"bn"`` with ``norm_eval=True``: running statistics always (mmdetection's ``norm_eval``),
  gamma/beta still trainable.
* ``"frozen_bn"``: a constant per-channel affine map: running statistics always, gamma/beta not
  trainable (``requires_grad=False``). Gradients still flow to the input.

Input and output: float32 (N, C, H, W).
"""
from __future__ import annotations

from mindspore import nn

NORM_KINDS = ("bn", "frozen_bn")
BN_EPS = 1e-5
# MindSpore's momentum is the weight of the old running value (PyTorch momentum 0.1 -> 0.9).
BN_MOMENTUM = 0.9


def build_norm(kind: str, num_features: int, *, norm_eval: bool = False,
               frozen: bool = False) -> nn.BatchNorm2d:
    """Build a 2-D batch norm over ``num_features`` channels.

    Args:
        kind: "bn" (trainable) or "frozen_bn" (constant affine).
        num_features: channel count C.
        norm_eval: with kind "bn", always normalise with the running statistics.
        frozen: force the frozen behaviour (used for frozen backbone stages).

    Returns:
        ``nn.BatchNorm2d`` cell (N, C, H, W) -> (N, C, H, W).
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
    if kind == "frozen_bn" or frozen:
        return nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False,
                              use_batch_statistics=False)
    return nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM,
                          use_batch_statistics=False if norm_eval else None)


def is_frozen_norm(cell: nn.Cell) -> bool:
    """True for a batch norm whose affine parameters are not trainable."""
    return isinstance(cell, nn.BatchNorm2d) and not cell.gamma.requires_grad
