"""COCO instances data: category mapping and a random-access sample source.

`CocoSource.load(i)` returns one sample in the data contract (CONTRACTS.md, all numpy):

    image_id      int
    file_name     str, absolute path
    image         uint8 (H, W, 3) BGR; grayscale / gray+alpha -> 3 channels, BGRA -> BGR
    orig_channels int, channels of the decoded file (1, 2, 3 or 4)
    boxes         float32 (N, 4) xyxy absolute pixels, tight box of the mask
                  (x2 = last column + 1, so x2 - x1 is the width in pixels, as COCO's bbox w)
    labels        int32 (N,) contiguous class index 1..K (0 is background)
    masks         uint8 (N, H, W) binary
    iscrowd       bool (N,) crowd regions (ignore regions: never targets, never jittered)

Images without (usable) annotations are kept: they are legitimate negatives for training and
evaluation alike.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import cv2
import numpy as np

from instaboost.data.stats import DataStats

logger = logging.getLogger(__name__)

# An annotation box narrower or lower than this (in pixels) cannot hold a usable mask.
MIN_BOX_SIDE = 1.0
# Channel counts of decoded images.
GRAY_CHANNELS, GRAY_ALPHA_CHANNELS, BGR_CHANNELS, BGRA_CHANNELS = 1, 2, 3, 4


# Image ids must lie in [0, MAX_IMAGE_ID): the pipeline's img_meta is float32, which holds every
# integer below 2**24 exactly; checked when the json is read, not when a worker meets the image.
MAX_IMAGE_ID = 2**24


class CocoCategories:
    """COCO category ids (sorted ascending) <-> contiguous labels 1..K (0 = background).

    Args:
        categories: COCO "categories" entries, each a mapping with "id" and "name".
    """

    def __init__(self, categories: Iterable[Mapping[str, Any]]):
        entries = sorted(categories, key=lambda c: int(c["id"]))
        if not entries:
            raise ValueError("a COCO annotation file needs at least one category")
        self.coco_ids: tuple[int, ...] = tuple(int(c["id"]) for c in entries)
        if len(set(self.coco_ids)) != len(self.coco_ids):
            raise ValueError(f"duplicate COCO category ids in {self.coco_ids}")
        self.names: tuple[str, ...] = tuple(str(c["name"]) for c in entries)
        self._to_label = {coco_id: label for label, coco_id in enumerate(self.coco_ids, start=1)}

    @classmethod
    def from_coco(cls, coco) -> "CocoCategories":
        """From a pycocotools `COCO` object (all categories of the file, used or not)."""
        return cls(coco.loadCats(coco.getCatIds()))

    @property
    def num_classes(self) -> int:
        """K, the number of foreground classes."""
        return len(self.coco_ids)

    def __contains__(self, coco_id: object) -> bool:
        """Whether `coco_id` is one of the file's category ids."""
        return coco_id in self._to_label

    def to_label(self, coco_id: int) -> int:
        """COCO category id -> contiguous label in 1..K."""
        try:
            return self._to_label[int(coco_id)]
        except KeyError:
            raise KeyError(f"COCO category id {coco_id} is not among the file's categories "
                           f"{list(self.coco_ids)}") from None

    def to_coco_id(self, label: int) -> int:
        """Contiguous label in 1..K -> COCO category id."""
        if not 1 <= int(label) <= self.num_classes:
            raise ValueError(f"label {label} is outside 1..{self.num_classes}")
        return self.coco_ids[int(label) - 1]

    def name(self, label: int) -> str:
        """Class name of a contiguous label in 1..K."""
        self.to_coco_id(label)  # validates the range
        return self.names[int(label) - 1]

    def label_to_coco_id(self) -> dict[int, int]:
        """Every label 1..K -> its COCO category id (what a COCO results file must carry)."""
        return {label: coco_id for label, coco_id in enumerate(self.coco_ids, start=1)}

    def label_names(self) -> dict[int, str]:
        """Every label 1..K -> its class name."""
        return {label: name for label, name in enumerate(self.names, start=1)}

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return f"CocoCategories(num_classes={self.num_classes}, names={list(self.names)})"


def read_image_bgr(path: Path) -> tuple[np.ndarray, int]:
    """Decode an image file to uint8 (H, W, 3) BGR; returns (image, channels of the file).

    Decoding uses IMREAD_UNCHANGED: EXIF orientation is ignored, as COCO's annotations refer to
    the stored pixel grid. Grayscale and gray+alpha become 3 equal channels, BGRA drops alpha.
    Raises FileNotFoundError / ValueError naming the file for a missing, unreadable or
    non-8-bit image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"OpenCV cannot decode image file {path} (corrupt or unsupported format)")
    if image.dtype != np.uint8:
        raise ValueError(f"image file {path} decodes to {image.dtype} ({image.dtype.itemsize * 8}-bit "
                         f"samples); only 8-bit images are supported: convert it to 8 bit first")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == GRAY_CHANNELS:
        image = cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif channels == GRAY_ALPHA_CHANNELS:
        image = cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2BGR)
    elif channels == BGRA_CHANNELS:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif channels != BGR_CHANNELS:
        raise ValueError(f"image file {path} has {channels} channels; expected 1, 2, 3 or 4")
    return np.ascontiguousarray(image), channels


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of binary masks.

    Args:
        masks: (N, H, W) binary (any integer/bool dtype).
    Returns:
        float32 (N, 4) xyxy with x2/y2 exclusive (last index + 1); all zeros for an empty mask.
    """
    num = masks.shape[0]
    boxes = np.zeros((num, 4), dtype=np.float32)
    if num == 0:
        return boxes
    rows = masks.any(axis=2)  # (N, H)
    cols = masks.any(axis=1)  # (N, W)
    nonempty = rows.any(axis=1)
    height, width = masks.shape[1:]
    y1 = rows.argmax(axis=1)
    y2 = height - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = width - cols[:, ::-1].argmax(axis=1)
    boxes[:] = np.stack([x1, y1, x2, y2], axis=1)
    boxes[~nonempty] = 0.0
    return boxes


def empty_sample_arrays(height: int, width: int) -> dict[str, np.ndarray]:
    """The instance arrays of a sample with no instance (correct shapes and dtypes)."""
    return {
        "boxes": np.zeros((0, 4), dtype=np.float32),
        "labels": np.zeros((0,), dtype=np.int32),
        "masks": np.zeros((0, height, width), dtype=np.uint8),
        "iscrowd": np.zeros((0,), dtype=np.bool_),
    }


class CocoSource:
    """Random-access COCO instances source (images + instance masks).

    Args:
        images_dir: folder holding the files named by the json's images[].file_name.
        annotations_file: COCO instances json (polygons, RLE or uncompressed RLE segmentations).
        max_images: use only the first N images (sorted by image id); None = all.
        stats: counters to report skipped annotations into (default: a new `DataStats`).

    Attributes:
        coco: the pycocotools `COCO` object; categories: `CocoCategories`; image_ids: list[int];
        stats: `DataStats`.
    """

    def __init__(self, images_dir, annotations_file, max_images: int | None = None,
                 *, stats: DataStats | None = None):
        from pycocotools.coco import COCO  # heavy import kept local to the data source

        self.images_dir = Path(images_dir).resolve()
        self.annotations_file = Path(annotations_file).resolve()
        if not self.annotations_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotations_file}")
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO images folder not found: {self.images_dir}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        self.stats = stats if stats is not None else DataStats()
        self.coco = _load_coco_quietly(COCO, self.annotations_file)
        self.categories = CocoCategories.from_coco(self.coco)
        image_ids = sorted(self.coco.getImgIds())
        if max_images is not None:
            image_ids = image_ids[:max_images]
        if not image_ids:
            raise ValueError(f"{self.annotations_file} lists no images")
        outside = [i for i in image_ids if not 0 <= i < MAX_IMAGE_ID]
        if outside:
            raise ValueError(f"{self.annotations_file}: image ids must lie in [0, 2**24) to be "
                             f"carried exactly by the float32 image metadata; {len(outside)} do "
                             f"not, e.g. {outside[:3]}")
        self.image_ids: list[int] = image_ids
        self._check_image_entries()
        self._ann_ids = self._usable_annotation_ids()

    def _check_image_entries(self) -> None:
        """Every selected images[] entry names its file and gives its size (a worker reads them
        later, where a missing key would be a bare KeyError naming neither the json nor the id)."""
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            if not isinstance(info.get("file_name"), str) or not info["file_name"]:
                raise ValueError(f"{self.annotations_file}: image {image_id} has no file_name")
            for side in ("height", "width"):
                value = info.get(side)
                # 640.0 from a converter is 640; a fraction or a string is no image size
                if (isinstance(value, bool) or not isinstance(value, (int, float))
                        or value <= 0 or not float(value).is_integer()):
                    raise ValueError(f"{self.annotations_file}: image {image_id} needs a positive "
                                     f"integer {side}, got {value!r}")

    def _usable_annotation_ids(self) -> dict[int, list[int]]:
        """Annotation ids per image, checked once here rather than in a data worker: a missing box
        or an unknown category is an error naming the file and the annotation; boxes narrower or
        lower than MIN_BOX_SIDE and annotations without a segmentation are skipped (counted), and
        polygons of fewer than 3 points are dropped from an annotation's segmentation (pycocotools
        reads a 4-value polygon as a box and fails on shorter ones)."""
        usable: dict[int, list[int]] = {}
        small = no_segmentation = 0
        for image_id in self.image_ids:
            keep = []
            for ann in self.coco.imgToAnns.get(image_id, []):
                where = f"{self.annotations_file}: annotation {ann.get('id')} (image {image_id})"
                if len(ann.get("bbox") or ()) != 4:
                    raise ValueError(f"{where} has no [x, y, width, height] bbox")
                if ann.get("category_id") not in self.categories:
                    raise ValueError(f"{where}: category_id {ann.get('category_id')} is not among "
                                     f"the file's categories {list(self.categories.coco_ids)}")
                _, _, box_w, box_h = ann["bbox"]
                if box_w < MIN_BOX_SIDE or box_h < MIN_BOX_SIDE:
                    small += 1
                    continue
                if not _keep_valid_segmentation(ann):
                    no_segmentation += 1
                    continue
                segmentation = ann["segmentation"]
                if isinstance(segmentation, dict):
                    image = self.coco.imgs[image_id]
                    shape = [int(image["height"]), int(image["width"])]
                    if list(segmentation["size"]) != shape:
                        # pycocotools would decode it at its own size: a mask of another shape
                        raise ValueError(f"{where}: RLE size {list(segmentation['size'])} is not "
                                         f"the image's [height, width] {shape}")
                keep.append(ann["id"])
            usable[image_id] = keep
        if small:
            logger.warning("%s: skipped %d annotations with bbox width or height < %.0f px",
                           self.annotations_file, small, MIN_BOX_SIDE)
        if no_segmentation:
            logger.warning("%s: skipped %d annotations without a segmentation (none, or only "
                           "polygons of fewer than 3 points)", self.annotations_file, no_segmentation)
        self.stats.add("annotations_skipped_small", small)
        self.stats.add("annotations_skipped_no_segmentation", no_segmentation)
        return usable

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_info(self, index: int) -> dict[str, Any]:
        """The json's images[] entry of sample `index`."""
        return self.coco.imgs[self.image_ids[index]]

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.image_info(index)["file_name"]

    def load(self, index: int) -> dict[str, Any]:
        """Decode image `index` and its instances (sample contract, see the module docstring)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} outside 0..{len(self) - 1}")
        info = self.image_info(index)
        path = self.image_path(index)
        image, channels = read_image_bgr(path)
        height, width = int(info["height"]), int(info["width"])
        if image.shape[:2] != (height, width):
            raise ValueError(f"image file {path} is {image.shape[1]}x{image.shape[0]} (w x h) but "
                             f"{self.annotations_file} records {width}x{height}")
        sample: dict[str, Any] = {
            "image_id": int(info["id"]),
            "file_name": str(path),
            "image": image,
            "orig_channels": channels,
        }
        anns = self.coco.loadAnns(self._ann_ids[info["id"]])
        masks, labels, crowd = [], [], []
        empty = 0
        for ann in anns:
            mask = self.coco.annToMask(ann)
            if not mask.any():
                empty += 1
                continue
            masks.append(mask)
            labels.append(self.categories.to_label(ann["category_id"]))
            crowd.append(bool(ann.get("iscrowd", 0)))
        if empty:
            logger.debug("%s: skipped %d annotations with empty masks", path, empty)
            self.stats.add("annotations_skipped_empty_mask", empty)
        if not masks:
            sample.update(empty_sample_arrays(height, width))
            return sample
        mask_array = np.stack(masks).astype(np.uint8)
        sample.update({
            "boxes": masks_to_boxes(mask_array),
            "labels": np.asarray(labels, dtype=np.int32),
            "masks": mask_array,
            "iscrowd": np.asarray(crowd, dtype=np.bool_),
        })
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)

    def __repr__(self) -> str:
        return (f"CocoSource(images_dir={str(self.images_dir)!r}, "
                f"annotations_file={str(self.annotations_file)!r}, num_images={len(self)}, "
                f"num_classes={self.categories.num_classes})")


def _keep_valid_segmentation(ann: dict[str, Any]) -> bool:
    """Whether `ann` has a segmentation to rasterise: an RLE, or polygons, of which those with
    fewer than 3 points (or an odd count of values) are dropped in place, as mmdetection does."""
    segmentation = ann.get("segmentation")
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    if not isinstance(segmentation, list):
        return False
    polygons = [polygon for polygon in segmentation
                if isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0]
    ann["segmentation"] = polygons
    return bool(polygons)


def _load_coco_quietly(coco_cls, annotations_file: Path):
    """pycocotools' COCO(path) prints progress to stdout; keep it in the log instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco = coco_cls(str(annotations_file))
    logger.debug("pycocotools: %s", buffer.getvalue().strip())
    return coco

