"""Generated demo data set in COCO instances format (for `make demo` and tests without real data).

Four classes of filled shapes with irregular outlines ("disc", "star", "blob", "bar"), drawn on
textured backgrounds (noise, gradients, stripes), overlapping each other and crossing the image
border. Later shapes occlude earlier ones; each annotation is the *visible* part of its shape,
traced with `cv2.findContours` into COCO polygons. The image is painted from the rasterised
annotation polygons, so pixels and annotations agree exactly. A placement is re-drawn when it
would hide most of an earlier shape or cut a hole into it (COCO polygons cannot express holes).

Everything is a deterministic function of (num_train, num_val, image_size, seed): image k of a
split draws from `np.random.default_rng([seed, split, k])`. The set is generated once into a
temporary folder and renamed into place (under a file lock), and regenerated when the recorded
parameters differ.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import cv2
import numpy as np

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
CLASS_NAMES = ("disc", "star", "blob", "bar")
# Per-class base colour (BGR) of the fill; each object jitters it.
CLASS_COLORS_BGR = ((60, 60, 200), (40, 190, 230), (180, 90, 60), (90, 170, 70))
SPLITS = {"train": 0, "val": 1}
IMAGE_EXT = {"train": ".jpg", "val": ".png"}
JPEG_QUALITY = 95
MIN_IMAGE_SIZE = 64
PARAMS_FILE = "params.json"
ANNOTATIONS_FILE = "annotations.json"

MIN_OBJECTS, MAX_OBJECTS = 2, 6
# Object radius as a fraction of the image size.
MIN_RADIUS_FRAC, MAX_RADIUS_FRAC = 0.07, 0.2
BORDER_PROB = 0.3  # chance to centre an object on the image border
OVERLAP_PROB = 0.4  # chance to centre an object near an earlier one
MAX_PLACEMENT_TRIES = 20
MIN_VISIBLE_FRACTION = 0.35  # an occluded shape must keep at least this share visible
MIN_OBJECT_AREA_FRAC = 0.002  # visible area floor, as a fraction of the image area
POLY_VERTICES = 48
FILL_SHIFT = 4  # cv2.fillPoly fixed-point bits (sub-pixel vertices)
STAR_POINTS = 5
STAR_INNER_RATIO = 0.45
BAR_ASPECT = 0.35  # bar half-width / half-length
NOISE_STD = 12.0  # pixel noise of background and fills (0-255 scale)
MIN_POLYGON_POINTS = 3


def demo_paths(root: Path) -> tuple[Path, Path, Path, Path]:
    """(train_images, train_annotations, val_images, val_annotations) under `root`."""
    root = Path(root)
    return (root / "train" / "images", root / "train" / ANNOTATIONS_FILE,
            root / "val" / "images", root / "val" / ANNOTATIONS_FILE)


def ensure_demo_dataset(root, *, num_train: int, num_val: int, image_size: int, seed: int
                        ) -> tuple[Path, Path, Path, Path]:
    """Generate the demo set under `root` unless it is already there with these parameters.

    Returns (train_images, train_annotations, val_images, val_annotations) as absolute paths.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root).resolve()
    params = {"num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size),
              "seed": int(seed), "generator_version": GENERATOR_VERSION}
    if _is_current(root, params):
        return demo_paths(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f".{root.name}.lock"):
        if _is_current(root, params):  # another process generated it while we waited
            return demo_paths(root)
        _check_replaceable(root)
        logger.info("generating the demo data set in %s (%s)", root, params)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        done = False
        try:
            for split, count in (("train", num_train), ("val", num_val)):
                _write_split(tmp / split, split, count, image_size, seed)
            (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True))
            old = None
            if root.exists():
                old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex}")
                os.rename(root, old)
            os.rename(tmp, root)
            done = True
            if old is not None:
                shutil.rmtree(old)
        finally:
            if not done:
                shutil.rmtree(tmp, ignore_errors=True)
    return demo_paths(root)


def _generated_params(root: Path) -> Optional[dict[str, Any]]:
    """The parameters a generated demo set under `root` records, or None where `root` holds no
    readable record of this generator (a missing, unreadable or foreign params.json)."""
    try:
        params = json.loads((root / PARAMS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) and "generator_version" in params else None


def _is_current(root: Path, params: dict[str, Any]) -> bool:
    return _generated_params(root) == params


def _check_replaceable(root: Path) -> None:
    """Only a demo set generated here (any parameters) or an empty folder is replaced: `root`
    comes from ``dataset.root``, which a user may point at their own data by mistake."""
    if not root.exists() or _generated_params(root) is not None:
        return
    if root.is_dir() and not any(root.iterdir()):
        return
    raise ValueError(
        f"dataset.root: {root} exists and is not a demo data set generated by this project (no "
        f"{PARAMS_FILE} of the generator in it), so it is left alone; point dataset.root at a new "
        f"or empty folder, or use dataset=coco_folder or dataset=coco2017 for your own data")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_split(folder: Path, split: str, count: int, image_size: int, seed: int) -> None:
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, SPLITS[split], index])
        image, objects = generate_image(rng, image_size)
        image_id = index + 1
        file_name = f"{image_id:06d}{IMAGE_EXT[split]}"
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if split == "train" else []
        if not cv2.imwrite(str(images_dir / file_name), image, params):
            raise OSError(f"OpenCV could not write {images_dir / file_name}")
        images.append({"id": image_id, "file_name": file_name, "width": image_size,
                       "height": image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": obj["category_id"], "segmentation": obj["polygons"],
                                "area": obj["area"], "bbox": obj["bbox"], "iscrowd": 0})
    coco = {
        "info": {"description": "InstaBoost demo shapes (generated)", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(CLASS_NAMES)],
        "images": images,
        "annotations": annotations,
    }
    (folder / ANNOTATIONS_FILE).write_text(json.dumps(coco, sort_keys=True))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (size, size, 3): base colour + linear gradient + stripes + noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(70, 190, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(-60, 60, size=3)
    stripe_angle = rng.uniform(0, np.pi)
    frequency = rng.uniform(4, 14)
    phase = (np.cos(stripe_angle) * xx + np.sin(stripe_angle) * yy) * frequency * 2 * np.pi
    stripes = np.sin(phase)[..., None] * rng.uniform(5, 30, size=3)
    noise = rng.normal(0, NOISE_STD, size=(size, size, 3))
    return np.clip(base + gradient + stripes + noise, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, class_index: int, center: np.ndarray, radius: float
                   ) -> np.ndarray:
    """float (V, 2) xy outline of one shape of class `class_index`."""
    angles = np.linspace(0, 2 * np.pi, POLY_VERTICES, endpoint=False) + rng.uniform(0, 2 * np.pi)
    name = CLASS_NAMES[class_index]
    if name == "disc":
        radii = radius * (1 + rng.uniform(-0.06, 0.06, POLY_VERTICES))
    elif name == "star":
        spikes = np.cos(STAR_POINTS * (angles - angles[0]))  # +1 at the tips, -1 between
        profile = STAR_INNER_RATIO + (1 - STAR_INNER_RATIO) * (spikes + 1) / 2
        radii = radius * profile * (1 + rng.uniform(-0.08, 0.08, POLY_VERTICES))
    elif name == "blob":
        radii = np.full(POLY_VERTICES, radius)
        for harmonic in (2, 3, 4):
            radii *= 1 + rng.uniform(0.05, 0.18) * np.sin(harmonic * angles + rng.uniform(0, 2 * np.pi))
    else:  # bar: a rotated rectangle with a jittered outline
        half_len, half_wid = radius, radius * BAR_ASPECT
        t = np.linspace(0, 4, POLY_VERTICES, endpoint=False)
        side, frac = np.floor(t).astype(int), t - np.floor(t)
        corners = np.array([[-half_len, -half_wid], [half_len, -half_wid],
                            [half_len, half_wid], [-half_len, half_wid]])
        points = corners[side] + (corners[(side + 1) % 4] - corners[side]) * frac[:, None]
        points += rng.uniform(-0.04, 0.04, points.shape) * radius
        rotation = rng.uniform(0, np.pi)
        rot = np.array([[np.cos(rotation), -np.sin(rotation)], [np.sin(rotation), np.cos(rotation)]])
        return points @ rot.T + center
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1) + center


def _fill(size: int, polygon: np.ndarray) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    points = np.round(polygon * (1 << FILL_SHIFT)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=FILL_SHIFT)
    return mask


def _has_hole(mask: np.ndarray) -> bool:
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def _visible(full_masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are drawn on top."""
    if not full_masks:
        return []
    visible, cover = [], np.zeros_like(full_masks[0])
    for mask in reversed(full_masks):
        visible.append(mask & (1 - cover))
        cover = cover | mask
    return visible[::-1]


def _placement_ok(full_masks: list[np.ndarray], min_area: float) -> bool:
    visible = _visible(full_masks)
    for full, vis in zip(full_masks, visible):
        area = vis.sum()
        if area < min_area or area < MIN_VISIBLE_FRACTION * full.sum() or _has_hole(vis):
            return False
    return True


def _polygons(mask: np.ndarray) -> list[list[float]]:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= MIN_POLYGON_POINTS]


def generate_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One demo image: (uint8 (size, size, 3) BGR, objects with category_id, polygons, area, bbox)."""
    from pycocotools import mask as mask_utils

    image = _background(rng, size)
    min_area = MIN_OBJECT_AREA_FRAC * size * size
    full_masks: list[np.ndarray] = []
    classes: list[int] = []
    centers: list[np.ndarray] = []
    for _ in range(int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))):
        class_index = int(rng.integers(len(CLASS_NAMES)))
        for _try in range(MAX_PLACEMENT_TRIES):
            radius = rng.uniform(MIN_RADIUS_FRAC, MAX_RADIUS_FRAC) * size
            draw = rng.random()
            if draw < BORDER_PROB:
                center = rng.uniform(0, size, 2)
                axis = int(rng.integers(2))
                center[axis] = float(rng.choice([0.0, size - 1.0])) + rng.uniform(-0.3, 0.3) * radius
            elif draw < BORDER_PROB + OVERLAP_PROB and centers:
                anchor = centers[int(rng.integers(len(centers)))]
                center = anchor + rng.uniform(-1.2, 1.2, 2) * radius
            else:
                center = rng.uniform(radius, size - radius, 2)
            mask = _fill(size, _shape_polygon(rng, class_index, center, radius))
            if _placement_ok(full_masks + [mask], min_area):
                full_masks.append(mask)
                classes.append(class_index)
                centers.append(center)
                break
    objects = []
    for class_index, visible in zip(classes, _visible(full_masks)):
        polygons = _polygons(visible)
        if not polygons:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, size, size))
        ann_mask = mask_utils.decode(rle).astype(bool)
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        if not ann_mask.any() or bbox[2] < 1 or bbox[3] < 1:
            continue
        color = np.clip(np.asarray(CLASS_COLORS_BGR[class_index]) + rng.uniform(-25, 25, 3), 0, 255)
        shade = rng.normal(0, NOISE_STD, size=(int(ann_mask.sum()), 3))
        image[ann_mask] = np.clip(color + shade, 0, 255).astype(np.uint8)
        objects.append({"category_id": class_index + 1, "polygons": polygons,
                        "area": float(mask_utils.area(rle)), "bbox": bbox})
    return image, objects
