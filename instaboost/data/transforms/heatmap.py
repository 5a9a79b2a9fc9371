"""Heatmap-guided paste positions for InstaBoost (vectorised form of the reference's
``instaboostfast.pointByHeatmap``).

Method (same as the reference):
1. Work on a grid ``SHRINK`` times smaller than the image (``int(H / SHRINK)`` x
   ``int(W / SHRINK)``, bilinear resize).  The "background" is the image with all instances,
   dilated by ``BACKGROUND_DILATION_PX``, inpainted.
2. For a group, build a trimap around its mask: rings at distance (0, 4], (4, 8], (8, 12] px
   (square dilations) valued 3, 2, 1 (the mask itself is 4), shrink it bilinearly to the grid;
   ring k = grid pixels whose value is exactly k.
3. For every grid position ``q``, translate the rings by ``q - p0`` (``p0``: the group box
   centre on the grid); positions where a ring leaves the grid are invalid.  The heat is
   ``sum_k w_k sum_{p in ring k} ||image(p) - background(p + q - p0)||_2 / 255`` with
   ``w = (0.25, 0.35, 0.4)`` (outer -> inner ring): how well the group's surroundings match
   the background at the new place.
4. Score ``(1 - heat / max_valid_heat) ** 3`` (invalid -> 0), scaled to a maximum of 255,
   resized bilinearly to full resolution.  Candidates: pixels scoring > 200, or > 150 with
   probability 0.4 (or when none is > 200).  The group centre goes to a candidate drawn
   uniformly; no candidate (or no ring pixel) -> no guidance.

The reference evaluates step 3 with a Python loop over grid positions; here it is one
gather over sliding windows (``numpy.lib.stride_tricks.sliding_window_view``), chunked over
ring pixels to bound memory.  The background is inpainted on the grid itself rather than at
full resolution and then shrunk.
"""
from __future__ import annotations

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from instaboost.data.transforms.inpaint import inpaint_any_channels

SHRINK = 10
BACKGROUND_DILATION_PX = 4          # reference: 5x5 kernel, 2 iterations -> 9x9 square
RING_OUTER_EDGES_PX = (4, 8, 12)    # reference: 5x5 kernel, 2/4/6 iterations
RING_WEIGHTS = {1: 0.25, 2: 0.35, 3: 0.4}   # trimap value -> weight (1 = outermost ring)
MASK_TRIMAP_VALUE = 4
MASK_ON = 255                       # so that bilinear shrinking keeps partly covered cells > 0
MAX_PIXEL_VALUE = 255.0
SCORE_EXPONENT = 3
SCORE_SCALE = 255.0
HIGH_SCORE = 200.0
LOW_SCORE = 150.0
LOW_SCORE_PROB = 0.4
GRID_INPAINT_RADIUS = 1
# Upper bound on elements of one gathered (positions x channels x ring pixels) block.
GATHER_CHUNK_ELEMENTS = 1 << 21


def _square(radius: int) -> np.ndarray:
    return np.ones((2 * radius + 1, 2 * radius + 1), dtype=np.uint8)


class HeatmapGuide:
    """Samples heatmap-guided group centres for one image.

    Args:
        image: uint8 (H, W, C) original image.
        union_mask: uint8 (H, W), nonzero where any instance is.
    """

    def __init__(self, image: np.ndarray, union_mask: np.ndarray) -> None:
        self.height, self.width, channels = image.shape
        self.grid_h = int(self.height / SHRINK)
        self.grid_w = int(self.width / SHRINK)
        self.available = self.grid_h > 0 and self.grid_w > 0
        if not self.available:
            return
        grid_size = (self.grid_w, self.grid_h)
        grid_image = cv2.resize(image, grid_size, interpolation=cv2.INTER_LINEAR)
        grid_image = grid_image.reshape(self.grid_h, self.grid_w, channels)
        dilated = cv2.dilate((union_mask != 0).astype(np.uint8) * MASK_ON, _square(BACKGROUND_DILATION_PX))
        grid_hole = (cv2.resize(dilated, grid_size, interpolation=cv2.INTER_LINEAR) > 0).astype(np.uint8)
        if grid_hole.all():
            self.available = False
            return
        grid_background = inpaint_any_channels(grid_image, grid_hole, GRID_INPAINT_RADIUS)
        self.grid_image = grid_image.astype(np.float32)
        self.grid_background = grid_background.astype(np.float32)

    def _grid_trimap(self, box: tuple[int, int, int, int], group_mask: np.ndarray) -> np.ndarray:
        """Trimap of a group shrunk to the grid: uint8 (grid_h, grid_w) in 0..4."""
        x0, y0, x1, y1 = box
        reach = RING_OUTER_EDGES_PX[-1]
        rx0, ry0 = max(0, x0 - reach), max(0, y0 - reach)
        rx1, ry1 = min(self.width, x1 + reach), min(self.height, y1 + reach)
        local = np.zeros((ry1 - ry0, rx1 - rx0), dtype=np.uint8)
        local[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = group_mask
        trimap = np.zeros_like(local)
        for value, radius in zip((3, 2, 1), RING_OUTER_EDGES_PX):
            ring_cover = cv2.dilate(local, _square(radius)) > 0
            trimap[ring_cover & (trimap == 0)] = value
        trimap[local > 0] = MASK_TRIMAP_VALUE
        canvas = np.zeros((self.height, self.width), dtype=np.uint8)
        canvas[ry0:ry1, rx0:rx1] = trimap
        return cv2.resize(canvas, (self.grid_w, self.grid_h), interpolation=cv2.INTER_LINEAR)

    def heat(self, box: tuple[int, int, int, int], group_mask: np.ndarray) -> np.ndarray | None:
        """Heat (appearance distance) per grid position for moving the group's centre there.

        Args:
            box: group box (x0, y0, x1, y1), integer pixels, half-open.
            group_mask: uint8 (y1 - y0, x1 - x0), nonzero on the group's pixels.
        Returns:
            float32 (grid_h, grid_w), -1 where the rings would leave the grid; None when the
            group has no ring pixel on the grid.
        """
        trimap = self._grid_trimap(box, group_mask)
        rows, cols, weights = [], [], []
        for value, weight in RING_WEIGHTS.items():
            r, c = np.nonzero(trimap == value)
            rows.append(r)
            cols.append(c)
            weights.append(np.full(r.shape, weight / MAX_PIXEL_VALUE, dtype=np.float32))
        rows_a = np.concatenate(rows)
        cols_a = np.concatenate(cols)
        if rows_a.size == 0:
            return None
        weights_a = np.concatenate(weights)
        r_min, c_min = int(rows_a.min()), int(cols_a.min())
        win_h = int(rows_a.max()) - r_min + 1
        win_w = int(cols_a.max()) - c_min + 1
        # windows[a, b] = background block whose top-left is (a, b): ring pixel p lands on
        # p + (a - r_min, b - c_min) for the shift (a - r_min, b - c_min).
        windows = sliding_window_view(self.grid_background, (win_h, win_w), axis=(0, 1))
        n_a, n_b, channels = windows.shape[:3]
        local_r = rows_a - r_min
        local_c = cols_a - c_min
        features = self.grid_image[rows_a, cols_a]          # (R, C)
        shift_heat = np.zeros((n_a, n_b), dtype=np.float32)
        chunk = max(1, GATHER_CHUNK_ELEMENTS // max(1, n_a * n_b * channels))
        for start in range(0, rows_a.size, chunk):
            stop = start + chunk
            gathered = windows[:, :, :, local_r[start:stop], local_c[start:stop]]  # (a, b, C, r)
            diff = gathered - features[start:stop].T
            dist = np.sqrt(np.einsum("abcr,abcr->abr", diff, diff))
            shift_heat += dist @ weights_a[start:stop]
        # Grid position q = p0 + shift = p0 + (a - r_min, b - c_min).
        centre_r = int(((box[1] + box[3]) / 2) / SHRINK)
        centre_c = int(((box[0] + box[2]) / 2) / SHRINK)
        heat = np.full((self.grid_h, self.grid_w), -1.0, dtype=np.float32)
        q_r0, q_c0 = centre_r - r_min, centre_c - c_min
        a0, b0 = max(0, -q_r0), max(0, -q_c0)
        a1, b1 = min(n_a, self.grid_h - q_r0), min(n_b, self.grid_w - q_c0)
        if a1 > a0 and b1 > b0:
            heat[q_r0 + a0:q_r0 + a1, q_c0 + b0:q_c0 + b1] = shift_heat[a0:a1, b0:b1]
        return heat

    def sample_centre(self, box: tuple[int, int, int, int], group_mask: np.ndarray,
                      rng: np.random.Generator) -> tuple[float, float] | None:
        """Draw the group's new centre ``(x, y)`` in full-resolution pixels, or None (no
        guidance: keep the random jitter)."""
        if not self.available:
            return None
        heat = self.heat(box, group_mask)
        if heat is None:
            return None
        valid = heat >= 0
        if not valid.any():
            return None
        worst = float(heat[valid].max())
        if worst <= 0.0:
            return None
        heat[~valid] = worst
        score = (1.0 - heat / worst) ** SCORE_EXPONENT
        best = float(score.max())
        if best <= 0.0:
            return None
        score *= SCORE_SCALE / best
        full = cv2.resize(score, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        use_low = rng.random() < LOW_SCORE_PROB
        candidates = np.flatnonzero(full > HIGH_SCORE)
        if use_low or candidates.size == 0:
            candidates = np.flatnonzero(full > LOW_SCORE)
        if candidates.size == 0:
            return None
        pick = int(candidates[rng.integers(candidates.size)])
        row, col = divmod(pick, self.width)
        return float(col), float(row)
