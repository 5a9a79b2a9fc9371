"""DeltaXYWH box coder (R-CNN box parameterisation, mmdetection v2 ``DeltaXYWHBBoxCoder``).

For a source box (anchor / proposal) with centre (px, py) and size (pw, ph) and a target box
(gx, gy, gw, gh)::

    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = log(gw / pw),  dh = log(gh / ph)
    deltas = ((dx, dy, dw, dh) - means) / stds

Widths are ``x2 - x1`` (no +1). Shapes broadcast over leading dimensions: (..., 4) -> (..., 4).
"""
from __future__ import annotations

import math
from typing import Sequence

import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.structures.boxes import clip_boxes

# Largest allowed |dw|, |dh| when decoding: a box may grow or shrink by at most 1000/16 = 62.5x
# per side in one step (mmdetection's wh_ratio_clip = 16 / 1000), which keeps exp() finite.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16.0)
# Lower bound for widths/heights when encoding, so degenerate (padding) boxes give finite deltas.
MIN_BOX_SIZE = 1e-3


class DeltaXYWHBoxCoder(nn.Cell):
    """Encode boxes as normalised deltas relative to reference boxes, and decode them back.

    Args:
        means: 4 target means subtracted after encoding.
        stds: 4 target stds dividing the deltas after encoding.
        scale_clamp: bound on decoded log-size deltas (default ``log(1000/16)``).
    """

    def __init__(self, *, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        super().__init__()
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"means and stds need 4 values, got {means} and {stds}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.scale_clamp = float(scale_clamp)
        self._means = Tensor(self.means, ms.float32)
        self._stds = Tensor(self.stds, ms.float32)

    def construct(self, src_boxes: Tensor, deltas: Tensor) -> Tensor:
        """Same as :meth:`decode` without clipping."""
        return self.decode(src_boxes, deltas)

    def encode(self, src_boxes: Tensor, dst_boxes: Tensor) -> Tensor:
        """Deltas that turn ``src_boxes`` into ``dst_boxes``. (..., 4), (..., 4) -> (..., 4)."""
        pw = ops.maximum(src_boxes[..., 2] - src_boxes[..., 0], MIN_BOX_SIZE)
        ph = ops.maximum(src_boxes[..., 3] - src_boxes[..., 1], MIN_BOX_SIZE)
        px = src_boxes[..., 0] + 0.5 * pw
        py = src_boxes[..., 1] + 0.5 * ph
        gw = ops.maximum(dst_boxes[..., 2] - dst_boxes[..., 0], MIN_BOX_SIZE)
        gh = ops.maximum(dst_boxes[..., 3] - dst_boxes[..., 1], MIN_BOX_SIZE)
        gx = dst_boxes[..., 0] + 0.5 * gw
        gy = dst_boxes[..., 1] + 0.5 * gh
        deltas = ops.stack([(gx - px) / pw, (gy - py) / ph, ops.log(gw / pw), ops.log(gh / ph)],
                           axis=-1)
        return (deltas - self._means) / self._stds

    def decode(self, src_boxes: Tensor, deltas: Tensor, *, max_shape=None) -> Tensor:
        """Apply ``deltas`` to ``src_boxes``. (..., 4), (..., 4) -> (..., 4) float32.

        max_shape: optional (height, width) -- numbers, or tensors broadcastable to
        ``deltas[..., 0]`` -- to clip the decoded boxes to the image.
        """
        deltas = deltas * self._stds + self._means
        pw = src_boxes[..., 2] - src_boxes[..., 0]
        ph = src_boxes[..., 3] - src_boxes[..., 1]
        px = src_boxes[..., 0] + 0.5 * pw
        py = src_boxes[..., 1] + 0.5 * ph
        dw = ops.clamp(deltas[..., 2], -self.scale_clamp, self.scale_clamp)
        dh = ops.clamp(deltas[..., 3], -self.scale_clamp, self.scale_clamp)
        gx = px + pw * deltas[..., 0]
        gy = py + ph * deltas[..., 1]
        gw = pw * ops.exp(dw)
        gh = ph * ops.exp(dh)
        boxes = ops.stack([gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh], axis=-1)
        if max_shape is not None:
            boxes = clip_boxes(boxes, max_shape[0], max_shape[1])
        return boxes

    def extend_repr(self) -> str:
        return f"means={self.means}, stds={self.stds}, scale_clamp={self.scale_clamp:.4f}"
