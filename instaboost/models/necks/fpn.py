"""Feature Pyramid Network (Lin et al. 2017), mmdetection layout, NCHW float32.

Lateral 1x1 convolutions bring C2..C5 to ``out_channels``; a top-down path adds the nearest-
upsampled coarser map; a 3x3 convolution smooths every level; extra levels beyond the inputs are
max-pool(kernel 1, stride 2) of the last output (P6 from P5, no extra convolutions).
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn, ops

from instaboost.models.layers.conv import build_conv2d, subsample
from instaboost.models.layers.native_kernels import aot_op, uses_cpu_kernels

UPSAMPLE_FACTOR = 2
EXTRA_LEVEL_STRIDE = 2


class NearestUpsample2x(nn.Cell):
    """Nearest-neighbour 2x upsampling (N, C, H, W) -> (N, C, 2H, 2W), float32.

    MindSpore's CPU resize kernels take ~0.25 s forward+backward for a 8 MB map; here the forward
    is two index gathers (rows of W floats, then single columns) and the backward is the exact
    adjoint, a 2x2 sum-pool (average pool times 4).
    """

    def __init__(self):
        super().__init__()
        self.sum_pool = nn.AvgPool2d(UPSAMPLE_FACTOR, UPSAMPLE_FACTOR)

    def construct(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        cols = Tensor(np.repeat(np.arange(w, dtype=np.int32), UPSAMPLE_FACTOR))
        rows = Tensor(np.repeat(np.arange(h, dtype=np.int32), UPSAMPLE_FACTOR))
        y = ops.gather(x.reshape(n * c * h, w), cols, 1).reshape(n * c, h, UPSAMPLE_FACTOR * w)
        y = ops.gather(y, rows, 1)
        return y.reshape(n, c, UPSAMPLE_FACTOR * h, UPSAMPLE_FACTOR * w)

    def bprop(self, x: Tensor, out: Tensor, dout: Tensor):
        return (self.sum_pool(dout) * float(UPSAMPLE_FACTOR * UPSAMPLE_FACTOR),)


def is_exact_2x(x: Tensor, size: Sequence[int]) -> bool:
    """Whether ``size`` (height, width) is exactly twice the map size of NCHW ``x``."""
    return tuple(size) == (x.shape[2] * UPSAMPLE_FACTOR, x.shape[3] * UPSAMPLE_FACTOR)


def upsample_nearest_to(x: Tensor, size: Tuple[int, int], upsample2x: nn.Cell) -> Tensor:
    """Nearest upsampling of (N, C, h, w) to (N, C, *size); exact 2x takes the fast path."""
    if is_exact_2x(x, size):
        return upsample2x(x)
    return ops.interpolate(x, size=tuple(size), mode="nearest")


@functools.lru_cache(maxsize=None)
def _upsample_add_op() -> ops.Custom:
    """Differentiable AOT op ``fine + upsample2x(coarse)`` of ``kernels/cpu/upsample.cc`` (one
    pass over memory; its gradient passes dy to ``fine`` and sum-pools it for ``coarse``)."""
    sum_pool = aot_op("upsample", "SumPool2x2",
                      out_shape=lambda dy: (dy[0], dy[1], dy[2] // UPSAMPLE_FACTOR,
                                            dy[3] // UPSAMPLE_FACTOR),
                      out_dtype=lambda dy: dy)

    def bprop(fine, coarse, out, dout):
        return dout, sum_pool(dout)

    return aot_op("upsample", "NearestUp2xAdd", out_shape=lambda fine, _: tuple(fine),
                  out_dtype=lambda fine, _: fine, bprop=bprop)


class FPN(nn.Cell):
    """Feature pyramid over backbone maps.

    Args:
        in_channels: channels of the backbone maps, finest first.
        out_channels: channels of every output level.
        num_outs: number of outputs (>= len(in_channels)); extra levels are stride-2
            subsamplings of the last one.
        conv_impl: "native", "unfold" or "winograd" (see `build_conv2d`); with "winograd" the
            top-down merges of exact 2x sizes run on the C++ kernel of `_upsample_add_op`.

    Input: tuple of float32 (N, in_channels[i], H_i, W_i), each level half the previous size.
    Output: tuple of ``num_outs`` float32 maps (N, out_channels, H_i, W_i) (P2..P6 for a ResNet).
    """

    def __init__(self, *, in_channels: Sequence[int] = (256, 512, 1024, 2048),
                 out_channels: int = 256, num_outs: int = 5, conv_impl: str = "unfold"):
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be >= number of inputs "
                             f"({len(in_channels)})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.CellList([
            build_conv2d(c, out_channels, 1, has_bias=True, impl=conv_impl) for c in in_channels])
        self.fpn_convs = nn.CellList([
            build_conv2d(out_channels, out_channels, 3, padding=1, has_bias=True, impl=conv_impl)
            for _ in in_channels])
        self.upsample = NearestUpsample2x()
        self.use_kernel = uses_cpu_kernels(conv_impl)
        if self.use_kernel:
            _upsample_add_op()   # built now: a missing compiler fails where the model is made

    def merge_top_down(self, fine: Tensor, coarse: Tensor) -> Tensor:
        """``fine`` plus the nearest upsampling of the coarser level ``coarse`` to its size."""
        if self.use_kernel and is_exact_2x(coarse, fine.shape[2:]):
            return _upsample_add_op()(fine, coarse)
        return fine + upsample_nearest_to(coarse, fine.shape[2:], self.upsample)

    def construct(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} inputs, got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = self.merge_top_down(laterals[i - 1], laterals[i])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        for _ in range(self.num_outs - len(outs)):
            # max-pool with kernel 1, stride 2 == stride-2 subsampling (see `subsample` for why
            # neither a stepped slice view nor max_pool2d is used).
            outs.append(subsample(outs[-1], (EXTRA_LEVEL_STRIDE, EXTRA_LEVEL_STRIDE)))
        return tuple(outs)
