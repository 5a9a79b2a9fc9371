"""Pictures for the tracker: training samples before and after augmentation, masks and boxes drawn."""
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

PANEL_HEIGHT = 256          # every picture in the grid is scaled to this height
MASK_ALPHA = 0.45           # weight of the mask colour over the image
BORDER = 4                  # pixels between panels
_GOLDEN = 0.618033988749895  # hue step that spreads instance colours evenly


def instance_colour(index: int) -> Tuple[int, int, int]:
    """A distinct, deterministic BGR colour per instance index."""
    hue = int(((index * _GOLDEN) % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def draw_instances(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                   names: Optional[Dict[int, str]] = None, crowd: Optional[np.ndarray] = None) -> np.ndarray:
    """Overlay masks (N, H, W), xyxy boxes (N, 4) and class names on a BGR/grey image; returns BGR uint8."""
    canvas = image if image.ndim == 3 and image.shape[2] == 3 else _to_bgr(image)
    canvas = canvas.astype(np.float32).copy()
    for i in range(len(boxes)):
        colour = np.array(instance_colour(i), dtype=np.float32)
        region = masks[i].astype(bool)
        canvas[region] = (1 - MASK_ALPHA) * canvas[region] + MASK_ALPHA * colour
    canvas = np.clip(canvas, 0, 255).astype(np.uint8)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        is_crowd = crowd is not None and bool(crowd[i])
        colour = (128, 128, 128) if is_crowd else instance_colour(i)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 1 if is_crowd else 2)
        label = int(labels[i])
        text = (names or {}).get(label, str(label)) + (" (crowd)" if is_crowd else "")
        cv2.putText(canvas, text, (x1 + 2, max(y1 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return canvas


def _to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def _panel(sample: dict, names: Optional[Dict[int, str]]) -> np.ndarray:
    drawn = draw_instances(sample["image"], sample["boxes"], sample["masks"], sample["labels"], names,
                           sample.get("iscrowd"))
    scale = PANEL_HEIGHT / drawn.shape[0]
    return cv2.resize(drawn, (max(int(round(drawn.shape[1] * scale)), 1), PANEL_HEIGHT),
                      interpolation=cv2.INTER_AREA)


def augmentation_grid(pairs: Sequence[Tuple[dict, dict]], names: Optional[Dict[int, str]] = None,
                      titles: Tuple[str, str] = ("before", "after")) -> np.ndarray:
    """One row per (before, after) sample pair; returns an RGB uint8 image for the tracker."""
    if not pairs:
        raise ValueError("augmentation_grid needs at least one (before, after) sample pair")
    rows: List[np.ndarray] = []
    for before, after in pairs:
        left, right = _panel(before, names), _panel(after, names)
        cv2.putText(left, titles[0], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.putText(right, titles[1], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        gap = np.zeros((PANEL_HEIGHT, BORDER, 3), np.uint8)
        rows.append(np.concatenate([left, gap, right], axis=1))
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, BORDER), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return cv2.cvtColor(np.concatenate(padded, axis=0), cv2.COLOR_BGR2RGB)
