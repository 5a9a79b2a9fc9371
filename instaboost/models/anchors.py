"""Anchor generator for the RPN (mmdetection v2 convention).

Shape shorthand: L FPN levels, Hl/Wl the feature size of level l, A_l = Hl * Wl * num_base_anchors
anchors of level l, A = sum_l A_l.

Base anchors of level l have ``base_size = stride_l``, centred at (0, 0) (centre offset 0); for
each aspect ratio r (h/w) and scale s: ``w = stride * s / sqrt(r)``, ``h = stride * s * sqrt(r)``
(ratio-major order). They are shifted to every feature position ``(stride * x, stride * y)``.
Flattened order is ``(y, x, anchor)``, i.e. anchor index ``(y * Wl + x) * num_base_anchors + a``,
which matches an NCHW head output permuted to NHWC and reshaped.

Anchors depend only on the (fixed) feature sizes, so they are computed with NumPy once per shape
and cached.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class AnchorGenerator:
    """Grid anchors for several feature levels.

    Args:
        strides: stride of each level in image pixels, e.g. (4, 8, 16, 32, 64).
        ratios: aspect ratios h / w, e.g. (0.5, 1.0, 2.0).
        scales: anchor sizes in units of the level's stride, e.g. (8,).
    """

    def __init__(self, *, strides: Sequence[int], ratios: Sequence[float],
                 scales: Sequence[float]):
        if not strides or not ratios or not scales:
            raise ValueError("AnchorGenerator needs non-empty strides, ratios and scales")
        self.strides = tuple(int(s) for s in strides)
        self.ratios = tuple(float(r) for r in ratios)
        self.scales = tuple(float(s) for s in scales)
        self._cache: dict[tuple, tuple[np.ndarray, ...]] = {}

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature position (same on every level)."""
        return len(self.ratios) * len(self.scales)

    def base_anchors(self, level: int) -> np.ndarray:
        """Base anchors of one level centred at (0, 0). -> float32 (num_base_anchors, 4) xyxy."""
        stride = float(self.strides[level])
        h_ratios = np.sqrt(np.asarray(self.ratios, dtype=np.float64))
        w_ratios = 1.0 / h_ratios
        scales = np.asarray(self.scales, dtype=np.float64)
        widths = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        heights = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return np.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights],
                        axis=-1).astype(np.float32)

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, ...]:
        """Anchors of every level. featmap_sizes: [(H_l, W_l)] per level.

        Returns a tuple of float32 arrays (A_l, 4), cached per ``featmap_sizes``.
        """
        key = tuple((int(h), int(w)) for h, w in featmap_sizes)
        if len(key) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature sizes, got {len(key)}")
        if key not in self._cache:
            levels = []
            for level, (height, width) in enumerate(key):
                stride = float(self.strides[level])
                shift_x = np.arange(width, dtype=np.float32) * stride
                shift_y = np.arange(height, dtype=np.float32) * stride
                xx, yy = np.meshgrid(shift_x, shift_y)  # (H, W), row-major over y then x
                shifts = np.stack([xx, yy, xx, yy], axis=-1).reshape(-1, 1, 4)
                anchors = shifts + self.base_anchors(level)[None, :, :]
                levels.append(anchors.reshape(-1, 4).astype(np.float32))
            self._cache[key] = tuple(levels)
        return self._cache[key]

    def __repr__(self) -> str:
        return (f"AnchorGenerator(strides={self.strides}, ratios={self.ratios}, "
                f"scales={self.scales})")
