"""Max pooling of the ResNet stem (3x3, stride 2, padding 1): MindSpore's or the C++ kernel.

``impl="kernel"`` (chosen with ``hardware.conv_impl=winograd``) runs it on
``kernels/cpu/max_pool.cc``: MindSpore 2.10's CPU MaxPool took 87.5 ms forward and 120 ms
forward + backward for the stem's (2, 64, 256, 256) map at 512² (measured). Both hold no
parameters and compute the same values; the gradient goes to each window's first maximum.

Input float32 (N, C, H, W) -> output float32 (N, C, (H - 1) // 2 + 1, (W - 1) // 2 + 1).
"""
from __future__ import annotations

import functools

from mindspore import Tensor, nn, ops

from instaboost.models.layers.conv import conv_output_size
from instaboost.models.layers.native_kernels import adjoint_pair_op

POOL_IMPLS = ("mindspore", "kernel")
KERNEL, STRIDE, PADDING = 3, 2, 1


def _pooled(size: int) -> int:
    return conv_output_size(size, KERNEL, STRIDE, PADDING)


@functools.lru_cache(maxsize=None)
def _max_pool_op() -> ops.Custom:
    """The differentiable AOT op of ``kernels/cpu/max_pool.cc``."""
    return adjoint_pair_op("max_pool", "MaxPool3x3Stride2", "MaxPool3x3Stride2Grad",
                           lambda x: (x[0], x[1], _pooled(x[2]), _pooled(x[3])))


class KernelMaxPool3x3(nn.Cell):
    """3x3 / stride 2 / padding 1 max pooling on the C++ kernel."""

    def __init__(self):
        super().__init__()
        self.pool = _max_pool_op()

    def construct(self, x: Tensor) -> Tensor:
        return self.pool(x)


def build_stem_max_pool(impl: str = "mindspore") -> nn.Cell:
    """3x3 max pooling with stride 2 and padding 1; ``impl`` "mindspore" or "kernel"."""
    if impl not in POOL_IMPLS:
        raise ValueError(f"pool impl must be one of {POOL_IMPLS}, got {impl!r}")
    if impl == "kernel":
        return KernelMaxPool3x3()
    return nn.MaxPool2d(KERNEL, STRIDE, pad_mode="pad", padding=PADDING)
