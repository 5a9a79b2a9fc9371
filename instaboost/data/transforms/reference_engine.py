"""InstaBoost engine wrapping the reference implementation, PyPI `instaboostfast` 0.1.2.

Engine contract (both engines):
    engine(image uint8 (H, W, C), masks uint8 (N, H, W), labels int32 (N,), rng np.random.Generator)
        -> (image uint8 (H, W, C), masks uint8 (M, H, W), labels int32 (M,))
Only non-crowd instances are passed in (`InstaBoostAug` keeps crowd regions aside).

What this wrapper fixes or contains, each at its cause (facts read in the library's source):

1. `pycococreater.binary_mask_to_polygon` calls `np.subtract(contours, 1)` on the *list* of
   contours that `skimage.measure.find_contours` returns. When a mask has several contours of
   different lengths, NumPy >= 1.24 refuses to build that ragged array (ValueError
   "inhomogeneous shape"). `affine_transform.py` imported the function by name, so the fixed
   `binary_mask_to_polygon` below (shifts each contour separately, otherwise the same steps and
   results) is installed in both `instaboostfast.affine_transform` and
   `instaboostfast.pycococreater`, where it is looked up.
2. `get_transform` removes the flip actions for groups near the border, renormalises the
   probabilities and asserts that they sum to exactly 1, which float division does not
   guarantee (and which divides by zero when only flip actions had mass). The installed
   wrapper does that removal itself with an exactly normalised vector (falling back to
   'normal', the same jitter without the flip, when no non-flip action has mass), then calls
   the library's `get_transform`. `InstaBoostConfig` asserts the same exact sum: the config's
   `action_prob` (validated within 1e-6) is normalised the same way before it is passed.
3. The library draws from the global `random` and `np.random` states: they are seeded from an
   int drawn from the caller's Generator right before the call and restored afterwards, so
   the call is reproducible and leaves no trace on the process's global state.
4. Importing the library calls `matplotlib.use('AGG')`: the previous backend setting is
   restored right after the import.
5. Segmentation format. The library rasterises its input segmentations and writes new ones.
   With polygons both directions are lossy (about 3 % IoU per round trip on small objects);
   uncompressed RLE is exact, but the library's RLE branch of `transform_annotation` never
   flips the mask while the image patch is flipped. So masks are passed as uncompressed RLE
   when the configuration can never flip (no 'horizontal'/'vertical' action with
   probability > 0, the seed's default) and as polygons otherwise (`segmentation_format`).

The library's colour jitter assumes BGR, which is what the data pipeline holds at this stage.
"""
from __future__ import annotations

import copy
import random
from typing import Any, Sequence

import numpy as np

from instaboost.data.coco import masks_to_boxes

FLIP_ACTIONS = ("horizontal", "vertical")
KNOWN_ACTIONS = ("normal", "horizontal", "vertical", "skip")
# The seed (and the config validator) accept action_prob summing to 1 within this tolerance.
ACTION_PROB_TOLERANCE = 1e-6
# Steps of one ulp tried when forcing a probability vector to sum to exactly 1.0.
MAX_ULP_STEPS = 64
# Global random states are seeded with ints in [0, 2**32) (NumPy's legacy seed range).
GLOBAL_SEED_SPACE = 2**32
BGR_CHANNELS = 3

_ORIGINALS: dict[str, Any] = {}


def exact_unit_sum(probs: Sequence[float]) -> np.ndarray:
    """float64 copy of `probs` scaled to sum to exactly 1.0 under `np.sum` (as the library checks).

    The largest entry absorbs the rounding error, one ulp at a time.
    Raises ValueError for negative entries or an all-zero vector.
    """
    values = np.asarray(probs, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty 1-D probability vector, got {probs!r}")
    if (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"probabilities must be >= 0 with a positive sum, got {probs!r}")
    values = values / values.sum()
    largest = int(np.argmax(values))
    for _ in range(MAX_ULP_STEPS):
        total = np.sum(values)
        if total == 1.0:
            return values
        values[largest] = np.nextafter(values[largest], values[largest] + (1.0 - total))
    raise ValueError(f"cannot normalise {probs!r} to an exact unit sum")


def binary_mask_to_polygon(binary_mask: np.ndarray, tolerance: float = 0) -> list[list[float]]:
    """COCO polygons [[x0, y0, x1, y1, ...], ...] tracing a binary (H, W) mask.

    Same steps and results as instaboostfast's `pycococreater.binary_mask_to_polygon`, except
    that each contour is shifted back by the padding on its own, so masks with several
    contours of different lengths work under NumPy >= 1.24.
    """
    from skimage import measure

    padded = np.pad(binary_mask, pad_width=1, mode="constant", constant_values=0)
    polygons = []
    for contour in measure.find_contours(padded, 0.5):
        contour = contour - 1  # undo the one-pixel padding
        if not np.array_equal(contour[0], contour[-1]):
            contour = np.vstack((contour, contour[0]))  # close the ring
        contour = measure.approximate_polygon(contour, tolerance)
        if len(contour) < 3:
            continue
        # (row, col) -> (x, y); the padding can leave -0.5 coordinates, clipped to 0.
        xy = np.flip(contour, axis=1).ravel()
        polygons.append([0 if v < 0 else v for v in xy.tolist()])
    return polygons


def _get_transform_exact(src, restricts: dict, config):
    """`get_transform` with the no-flip renormalisation done exactly (see the module docstring)."""
    original = _ORIGINALS["get_transform"]
    if restricts.get("noflip") != 1:
        return original(src, restricts, config)
    candidates = np.asarray(config.action_candidate)
    probs = np.asarray(config.action_prob, dtype=np.float64)
    keep = ~np.isin(candidates, FLIP_ACTIONS)
    reduced = copy.copy(config)
    if probs[keep].sum() > 0:
        reduced.action_candidate = candidates[keep]
        reduced.action_prob = exact_unit_sum(probs[keep])
    else:
        reduced.action_candidate = np.array(["normal"])
        reduced.action_prob = np.array([1.0])
    without_noflip = {key: value for key, value in restricts.items() if key != "noflip"}
    return original(src, without_noflip, reduced)


def _restore_matplotlib_backend(saved) -> None:
    """Undo `matplotlib.use('AGG')`: restore the backend setting held in `saved` (raw rcParams)."""
    import matplotlib
    from matplotlib import rcsetup

    previous = saved["backend"]  # a name, or the "auto" sentinel when none was chosen yet
    if isinstance(previous, str):
        matplotlib.use(previous)  # also switches pyplot back when it was already imported
    else:
        # Assigning the "auto" sentinel through rcParams[...] is ignored once a backend is set;
        # `_set` is RcParams' raw setter (matplotlib >= 3.7).
        matplotlib.rcParams._set("backend", rcsetup._auto_backend_sentinel)
    matplotlib.rcParams["backend_fallback"] = saved["backend_fallback"]


def import_instaboostfast():
    """Import instaboostfast once, restore matplotlib's backend, install the fixes; returns the module."""
    if "module" in _ORIGINALS:
        return _ORIGINALS["module"]
    import matplotlib

    saved = matplotlib.rcParams.copy()  # raw values: does not resolve an "auto" backend
    try:
        import instaboostfast
        import instaboostfast.affine_transform as affine_module
        import instaboostfast.get_instance_group as group_module
        import instaboostfast.pycococreater as creator_module
    except ImportError as exc:
        raise ImportError("the 'instaboostfast' engine needs the instaboostfast package: "
                          "pip install instaboostfast==0.1.2") from exc
    finally:
        _restore_matplotlib_backend(saved)
    _ORIGINALS["binary_mask_to_polygon"] = creator_module.binary_mask_to_polygon
    _ORIGINALS["get_transform"] = group_module.get_transform
    affine_module.binary_mask_to_polygon = binary_mask_to_polygon
    creator_module.binary_mask_to_polygon = binary_mask_to_polygon
    group_module.get_transform = _get_transform_exact
    _ORIGINALS["module"] = instaboostfast
    return instaboostfast


def original_function(name: str):
    """The library's own (unfixed) `binary_mask_to_polygon` or `get_transform`, for comparisons."""
    import_instaboostfast()
    return _ORIGINALS[name]


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE {'counts': [int, ...], 'size': [H, W]} of a binary (H, W) mask.

    Runs over the column-major pixel order, starting with a (possibly zero) run of zeros.
    """
    flat = np.asarray(mask, dtype=np.uint8).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) mask of a COCO segmentation (polygons / uncompressed / compressed RLE)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class InstaBoostFastEngine:
    """The reference InstaBoost (instaboostfast 0.1.2) behind the engine contract.

    Args (the seed's names, as in `instaboostfast.InstaBoostConfig`):
        action_candidate: actions drawn per instance group, from normal|horizontal|vertical|skip.
        action_prob: their probabilities (sum 1 within 1e-6; normalised exactly here).
        scale: (min, max) scale factor of the jitter.
        dx, dy: the shift is at most (group width / dx, group height / dy) pixels.
        theta: (min, max) rotation in degrees; the library draws integer degrees, so both
            must be integral.
        color_prob: probability of the library's colour jitter (BGR images).
        heatmap_flag: paste position sampled from the appearance-similarity heatmap
            (slow: the library loops over pixels in Python).
    """

    def __init__(self, *, action_candidate: Sequence[str], action_prob: Sequence[float],
                 scale: Sequence[float], dx: float, dy: float, theta: Sequence[float],
                 color_prob: float, heatmap_flag: bool):
        candidates = [str(a) for a in action_candidate]
        unknown = sorted(set(candidates) - set(KNOWN_ACTIONS))
        if unknown:
            raise ValueError(f"action_candidate: unknown actions {unknown}; known {list(KNOWN_ACTIONS)}")
        probs = [float(p) for p in action_prob]
        if len(probs) != len(candidates):
            raise ValueError(f"action_prob has {len(probs)} entries, action_candidate {len(candidates)}")
        if abs(sum(probs) - 1.0) > ACTION_PROB_TOLERANCE:
            raise ValueError(f"action_prob must sum to 1 within {ACTION_PROB_TOLERANCE}, got {sum(probs)}")
        theta_values = [float(t) for t in theta]
        if len(theta_values) != 2 or any(t != int(t) for t in theta_values):
            raise ValueError(f"theta must be two integral degrees for the instaboostfast engine "
                             f"(it draws random.randint(*theta)), got {list(theta)}")
        scale_values = [float(s) for s in scale]
        if len(scale_values) != 2 or not 0 < scale_values[0] <= scale_values[1]:
            raise ValueError(f"scale must be [min, max] with 0 < min <= max, got {list(scale)}")
        if dx <= 0 or dy <= 0:
            raise ValueError(f"dx and dy must be > 0, got dx={dx}, dy={dy}")
        if not 0.0 <= color_prob <= 1.0:
            raise ValueError(f"color_prob must lie in [0, 1], got {color_prob}")
        self.action_candidate = candidates
        self.action_prob = probs
        self.scale = scale_values
        # Integral shifts stay ints: the library computes randint(-(w // dx), w // dx).
        self.dx = int(dx) if float(dx).is_integer() else float(dx)
        self.dy = int(dy) if float(dy).is_integer() else float(dy)
        self.theta = [int(t) for t in theta_values]
        self.color_prob = float(color_prob)
        self.heatmap_flag = bool(heatmap_flag)
        can_flip = any(a in FLIP_ACTIONS and p > 0 for a, p in zip(candidates, probs))
        self.segmentation_format = "polygon" if can_flip else "rle"
        library = import_instaboostfast()
        self._get_new_data = library.get_new_data
        self._config = library.InstaBoostConfig(
            action_candidate=tuple(candidates), action_prob=tuple(exact_unit_sum(probs).tolist()),
            scale=tuple(self.scale), dx=self.dx, dy=self.dy, theta=tuple(self.theta),
            color_prob=self.color_prob, heatmap_flag=self.heatmap_flag)

    def _kwargs(self) -> dict[str, Any]:
        return {"action_candidate": self.action_candidate, "action_prob": self.action_prob,
                "scale": self.scale, "dx": self.dx, "dy": self.dy, "theta": self.theta,
                "color_prob": self.color_prob, "heatmap_flag": self.heatmap_flag}

    def __reduce__(self):
        # Rebuilt from its arguments, so a process that unpickles it (a spawned data worker)
        # imports the library through `import_instaboostfast` and gets the fixes installed.
        return _rebuild_engine, (self._kwargs(),)

    def _to_instaboost_anns(self, masks: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
        """Library annotations: segmentation, bbox [x, y, w, h], category_id = our label."""
        boxes = masks_to_boxes(masks)
        anns = []
        for i, (mask, box, label) in enumerate(zip(masks, boxes, labels)):
            if self.segmentation_format == "rle":
                segmentation = mask_to_uncompressed_rle(mask)
            else:
                segmentation = binary_mask_to_polygon(mask)
            x1, y1, x2, y2 = (int(v) for v in box)
            anns.append({"id": i + 1, "segmentation": segmentation, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": int(mask.sum()), "category_id": int(label), "iscrowd": 0})
        return anns

    @staticmethod
    def _from_instaboost_anns(anns: list[dict[str, Any]], height: int, width: int
                              ) -> tuple[np.ndarray, np.ndarray]:
        """(masks uint8 (M, H, W), labels int32 (M,)) from the library's annotations."""
        if not anns:
            return np.zeros((0, height, width), dtype=np.uint8), np.zeros((0,), dtype=np.int32)
        masks = np.stack([segmentation_to_mask(a["segmentation"], height, width) for a in anns])
        labels = np.asarray([a["category_id"] for a in anns], dtype=np.int32)
        return masks, labels

    def __call__(self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != BGR_CHANNELS:
            raise ValueError(f"expected a uint8 (H, W, 3) BGR image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        if masks.shape[1:] != (height, width) or len(masks) != len(labels):
            raise ValueError(f"masks {masks.shape} / labels {labels.shape} do not match image {image.shape}")
        if len(masks) == 0:
            return image.copy(), masks.copy(), np.asarray(labels, dtype=np.int32).copy()
        anns = self._to_instaboost_anns(masks, labels)
        seed = int(rng.integers(GLOBAL_SEED_SPACE))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            new_anns, new_image = self._get_new_data(anns, np.ascontiguousarray(image), self._config)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        new_masks, new_labels = self._from_instaboost_anns(new_anns, height, width)
        return np.ascontiguousarray(new_image, dtype=np.uint8), new_masks, new_labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(action_candidate={self.action_candidate}, "
                f"action_prob={self.action_prob}, scale={self.scale}, dx={self.dx}, dy={self.dy}, "
                f"theta={self.theta}, color_prob={self.color_prob}, heatmap_flag={self.heatmap_flag}, "
                f"segmentation_format={self.segmentation_format!r})")


def _rebuild_engine(kwargs: dict[str, Any]) -> InstaBoostFastEngine:
    return InstaBoostFastEngine(**kwargs)
