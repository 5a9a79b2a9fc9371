"""Geometry and pasting of InstaBoost groups (used by ``project_engine``).

Coordinates are pixel indices (x = column, y = row; pixel centres on integers), the
convention of both ``scipy.ndimage`` (the reference) and ``cv2.warpAffine``.  Only the
destination region of a group is touched: the warp runs on the group's crop, not on a
full-size canvas.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

MASK_ON = 255
MASK_THRESHOLD = 128           # bilinear-warped 0/255 masks: >= one half -> inside
IDENTITY_2X3 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

Box = tuple[int, int, int, int]   # x0, y0, x1, y1 (half-open, integer pixels)


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def forward_matrix(box: Box, flip: str | None, scale: float, theta_deg: float,
                   tx: float, ty: float) -> np.ndarray:
    """float64 (3, 3) map from source pixel (x, y) to destination pixel, composed as the reference.

    The group crop (u = x - x0, v = y - y0) is optionally mirrored inside the crop
    (``horizontal``: u -> w - 1 - u; ``vertical``: v -> h - 1 - v), then
    ``dst = s R(theta) ((u, v) - (w/2, h/2)) + box centre + (tx, ty)``, ``R`` the rotation
    ``[[cos, -sin], [sin, cos]]`` in (x, y) (reference ``affine_transform.__transform_img``).
    """
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    mirror = np.eye(3)
    if flip == "horizontal":
        mirror = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    elif flip == "vertical":
        mirror = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, h - 1.0], [0.0, 0.0, 1.0]])
    angle = math.radians(theta_deg)
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    centre_x = (x0 + x1) / 2 + tx
    centre_y = (y0 + y1) / 2 + ty
    similarity = np.array([[cos, -sin, centre_x - cos * w / 2 + sin * h / 2],
                           [sin, cos, centre_y - sin * w / 2 - cos * h / 2],
                           [0.0, 0.0, 1.0]])
    return similarity @ mirror @ _translation(-x0, -y0)


def destination_region(box: Box, matrix: np.ndarray, width: int, height: int) -> Box | None:
    """Clipped destination box receiving any bilinear contribution from ``box``, or None."""
    x0, y0, x1, y1 = box
    corners = np.array([[x0 - 1, x0 - 1, x1, x1], [y0 - 1, y1, y0 - 1, y1], [1, 1, 1, 1]], dtype=np.float64)
    moved = matrix[:2] @ corners
    dx0 = max(0, int(math.floor(moved[0].min())))
    dy0 = max(0, int(math.floor(moved[1].min())))
    dx1 = min(width, int(math.ceil(moved[0].max())) + 1)
    dy1 = min(height, int(math.ceil(moved[1].max())) + 1)
    if dx1 <= dx0 or dy1 <= dy0:
        return None
    return dx0, dy0, dx1, dy1


def _local_warp(box: Box, region: Box, matrix: np.ndarray) -> np.ndarray:
    """2x3 map from crop-local source pixels of ``box`` to region-local destination pixels."""
    return (_translation(-region[0], -region[1]) @ matrix @ _translation(box[0], box[1]))[:2]


def paste_unchanged(canvas: np.ndarray, image: np.ndarray, masks: np.ndarray, out_masks: np.ndarray,
                    members: np.ndarray, box: Box, alpha: np.ndarray) -> None:
    """Skip action: restore the group's own pixels and masks exactly.

    canvas / image uint8 (H, W, C); masks / out_masks uint8 (N, H, W); alpha uint8 (h, w) 0/1
    of the group inside ``box``.
    """
    x0, y0, x1, y1 = box
    cv2.copyTo(image[y0:y1, x0:x1], alpha, canvas[y0:y1, x0:x1])
    for i in members:
        out_masks[i, y0:y1, x0:x1] = masks[i, y0:y1, x0:x1]


def warp_mask(mask_crop: np.ndarray, box: Box, matrix: np.ndarray, out_mask: np.ndarray) -> None:
    """Warp a 0/1 uint8 crop (of ``box``) bilinearly, threshold at one half, write into
    ``out_mask`` uint8 (H, W) on its destination region."""
    height, width = out_mask.shape
    region = destination_region(box, matrix, width, height)
    if region is None:
        return
    rx0, ry0, rx1, ry1 = region
    warped = cv2.warpAffine(mask_crop * np.uint8(MASK_ON), _local_warp(box, region, matrix),
                            (rx1 - rx0, ry1 - ry0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    out_mask[ry0:ry1, rx0:rx1] = warped >= MASK_THRESHOLD


def paste_warped(canvas: np.ndarray, image: np.ndarray, masks: np.ndarray, out_masks: np.ndarray,
                 members: np.ndarray, boxes: np.ndarray, box: Box, alpha: np.ndarray,
                 matrix: np.ndarray) -> None:
    """Warp the group onto its destination region and composite it; warp its members' masks.

    The group's pixels are premultiplied by its mask and warped bilinearly together with the
    mask (as alpha), then composited "over" the canvas.  Each member mask is warped on its
    own box (bilinear, thresholded at one half); a lone member's mask is the alpha itself.
    ``boxes``: int (N, 4) member boxes; other arguments as in ``paste_unchanged``.
    """
    height, width, channels = canvas.shape
    region = destination_region(box, matrix, width, height)
    if region is None:
        return
    x0, y0, x1, y1 = box
    rx0, ry0, rx1, ry1 = region
    size = (rx1 - rx0, ry1 - ry0)
    local = _local_warp(box, region, matrix)
    crop = image[y0:y1, x0:x1]
    premultiplied = cv2.bitwise_and(crop, crop, mask=alpha)
    colour = cv2.warpAffine(premultiplied, local, size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    coverage = cv2.warpAffine(alpha * np.uint8(MASK_ON), local, size, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    # Premultiplied "over": target * (1 - a) + warped premultiplied colour, uint8 with rounding.
    uncovered = cv2.bitwise_not(coverage)
    if channels > 1:
        uncovered = cv2.merge([uncovered] * channels)
    target = canvas[ry0:ry1, rx0:rx1]
    kept = cv2.multiply(target, uncovered.reshape(target.shape), scale=1.0 / MASK_ON)
    target[...] = cv2.add(kept, colour.reshape(kept.shape)).reshape(target.shape)
    if len(members) == 1:
        out_masks[members[0], ry0:ry1, rx0:rx1] = coverage >= MASK_THRESHOLD
        return
    for i in members:
        bx0, by0, bx1, by1 = (int(v) for v in boxes[i])
        warp_mask(masks[i, by0:by1, bx0:bx1], (bx0, by0, bx1, by1), matrix, out_masks[i])
