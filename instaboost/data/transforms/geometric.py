"""Geometric and photometric transforms to the fixed-shape batch contract (pure numpy + OpenCV).

Shape shorthand: H, W original image; h, w resized image (aspect ratio kept, fits the target);
Hp, Wp padded image = (img_height, img_width); N instances; G = num_gts; M = gt_mask_size.
Boxes are xyxy absolute pixels with exclusive right/bottom edges (x2 - x1 = width in pixels).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

# A box-aligned mask pixel is foreground when the resampled coverage reaches one half.
MASK_THRESHOLD = 0.5
CHANNELS = 3


def check_pad_shape(img_height: int, img_width: int, pad_divisor: int) -> None:
    """Raise ValueError unless the padded size is positive and divisible by `pad_divisor`."""
    if pad_divisor < 1:
        raise ValueError(f"pad_divisor must be >= 1, got {pad_divisor}")
    if img_height < 1 or img_width < 1:
        raise ValueError(f"img_height and img_width must be >= 1, got {img_height}x{img_width}")
    if img_height % pad_divisor or img_width % pad_divisor:
        raise ValueError(f"img_height ({img_height}) and img_width ({img_width}) must be divisible by "
                         f"pad_divisor ({pad_divisor}): the FPN's coarsest level needs whole cells")


def keep_ratio_size(height: int, width: int, target_height: int, target_width: int
                    ) -> tuple[int, int]:
    """(h, w) of an H x W image scaled by one factor to fit inside target_height x target_width."""
    scale = min(target_height / height, target_width / width)
    new_h = min(target_height, max(1, int(round(height * scale))))
    new_w = min(target_width, max(1, int(round(width * scale))))
    return new_h, new_w


def resize_image(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3), bilinear (area averaging when shrinking)."""
    shrink = new_h < image.shape[0] and new_w < image.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interpolation)


def resize_masks(masks: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, h, w) with nearest-neighbour sampling."""
    out = np.zeros((masks.shape[0], new_h, new_w), dtype=np.uint8)
    for i, mask in enumerate(masks):
        out[i] = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return out


def scale_boxes(boxes: np.ndarray, scale_x: float, scale_y: float, height: int, width: int
                ) -> np.ndarray:
    """float32 (N, 4) xyxy scaled by (scale_x, scale_y) and clipped to [0, width] x [0, height]."""
    out = boxes.astype(np.float32) * np.array([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, width)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, height)
    return out


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror xyxy boxes (exclusive right edge) inside an image of `width` pixels."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def normalize_to_chw(image_bgr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (h, w, 3) BGR -> float32 (3, h, w) RGB, (x - mean) / std with RGB-ordered mean/std."""
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, CHANNELS)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, CHANNELS)
    rgb = image_bgr[:, :, ::-1].astype(np.float32)
    return np.ascontiguousarray(((rgb - mean_arr) / std_arr).transpose(2, 0, 1))


def pad_chw(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (C, h, w) -> (C, height, width), zeros at the bottom/right."""
    channels, h, w = image.shape
    if h > height or w > width:
        raise ValueError(f"image {h}x{w} does not fit the padded size {height}x{width}")
    out = np.zeros((channels, height, width), dtype=image.dtype)
    out[:, :h, :w] = image
    return out


def box_aligned_masks(masks: np.ndarray, boxes: np.ndarray, mask_size: int,
                      hflip: bool = False) -> np.ndarray:
    """Each mask cropped to its own box and resampled to mask_size x mask_size.

    Args:
        masks: uint8 (N, H, W) binary, in the same pixel grid as `boxes`.
        boxes: (N, 4) xyxy with integral coordinates (tight boxes; exclusive right/bottom).
        mask_size: M.
        hflip: mirror the result (the image was flipped after the crop's grid).
    Returns:
        uint8 (N, M, M) binary. Crops are area-averaged when shrinking, bilinear otherwise, and
        thresholded at one half; a non-empty crop always keeps at least its strongest pixel.
    """
    out = np.zeros((masks.shape[0], mask_size, mask_size), dtype=np.uint8)
    height, width = masks.shape[1:]
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x2, y2 = min(width, int(np.ceil(box[2]))), min(height, int(np.ceil(box[3])))
        if x2 <= x1 or y2 <= y1:
            continue
        crop = mask[y1:y2, x1:x2].astype(np.float32)
        shrink = crop.shape[0] >= mask_size and crop.shape[1] >= mask_size
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        resized = cv2.resize(crop, (mask_size, mask_size), interpolation=interpolation)
        binary = resized >= MASK_THRESHOLD
        if not binary.any() and crop.any():
            binary.flat[int(np.argmax(resized))] = True
        out[i] = binary
    if hflip:
        out = np.ascontiguousarray(out[:, :, ::-1])
    return out


def select_largest(areas: np.ndarray, iscrowd: np.ndarray, limit: int) -> np.ndarray:
    """Indices (ascending) of at most `limit` instances: targets first, each group largest first."""
    order = np.lexsort((-areas.astype(np.float64), iscrowd.astype(np.int8)))
    return np.sort(order[:limit])
