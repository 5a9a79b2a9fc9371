"""CocoSource / CocoCategories on the real sets and on small hand-written files."""
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from instaboost.data.coco import CocoCategories, CocoSource, masks_to_boxes, read_image_bgr
from tests.helpers import shared_data_dir




def _check_sample(sample, num_classes):
    image, masks = sample["image"], sample["masks"]
    n = len(sample["labels"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert masks.dtype == np.uint8 and masks.shape == (n,) + image.shape[:2]
    assert sample["boxes"].dtype == np.float32 and sample["boxes"].shape == (n, 4)
    assert sample["labels"].dtype == np.int32 and sample["iscrowd"].dtype == np.bool_
    assert Path(sample["file_name"]).is_absolute() and Path(sample["file_name"]).is_file()
    if n:
        assert ((sample["labels"] >= 1) & (sample["labels"] <= num_classes)).all()
        assert set(np.unique(masks)) <= {0, 1}
        assert masks.reshape(n, -1).any(axis=1).all()
        np.testing.assert_array_equal(sample["boxes"], masks_to_boxes(masks))


@pytest.mark.parametrize("name, ann_file, num_images, num_crowd", [
    ("coco128seg", "annotations.json", 126, 0),
    ("coco_val10", "annotations.json", 10, 0),
    ("coco_val10", "annotations_with_crowd.json", 10, 1),
])
def test_real_sets_load(name, ann_file, num_images, num_crowd):
    root = shared_data_dir(name)
    source = CocoSource(root / "images", root / ann_file)
    assert len(source) == num_images and source.categories.num_classes == 80
    crowd_total = 0
    for i in range(len(source)):
        sample = source.load(i)
        _check_sample(sample, 80)
        crowd_total += int(sample["iscrowd"].sum())
        # pycocotools' own tight box of each annotation's RLE is exactly our box
        anns = source.coco.loadAnns(source.coco.getAnnIds(imgIds=sample["image_id"]))
        rle_boxes = np.array([mask_utils.toBbox(source.coco.annToRLE(a)) for a in anns]).reshape(-1, 4)
        rle_boxes[:, 2:] += rle_boxes[:, :2]
        np.testing.assert_array_equal(sample["boxes"], rle_boxes)
    assert crowd_total == num_crowd
    assert source.stats.get("annotations_skipped_small") == 0
    assert source.stats.get("annotations_skipped_empty_mask") == 0


def test_crowd_region_is_the_rle_person():
    root = shared_data_dir("coco_val10")
    source = CocoSource(root / "images", root / "annotations_with_crowd.json")
    crowd_ann = next(a for a in source.coco.dataset["annotations"] if a["iscrowd"])
    index = source.image_ids.index(crowd_ann["image_id"])
    sample = source.load(index)
    (crowd_idx,) = np.flatnonzero(sample["iscrowd"])
    assert source.categories.to_coco_id(sample["labels"][crowd_idx]) == crowd_ann["category_id"]
    x, y, w, h = crowd_ann["bbox"]
    np.testing.assert_allclose(sample["boxes"][crowd_idx], [x, y, x + w, y + h], atol=1.0)


def test_max_images_takes_the_first_ids():
    root = shared_data_dir("coco128seg")
    source = CocoSource(root / "images", root / "annotations.json", max_images=5)
    assert len(source) == 5 and source.image_ids == sorted(source.coco.getImgIds())[:5]


def test_labels_map_back_to_coco_2017_ids_with_their_gaps():
    """COCO 2017's ids skip 12, 26, ...: label 12 is category 13, label 80 is 90."""
    root = shared_data_dir("coco_val10")
    mapping = CocoSource(root / "images", root / "annotations.json").categories.label_to_coco_id()
    assert len(mapping) == 80 and mapping[11] == 11 and mapping[12] == 13 and mapping[80] == 90


def test_categories_map_sorted_ids_to_contiguous_labels():
    cats = CocoCategories([{"id": 7, "name": "c"}, {"id": 2, "name": "a"}, {"id": 5, "name": "b"}])
    assert cats.num_classes == 3 and cats.names == ("a", "b", "c")
    assert [cats.to_label(i) for i in (2, 5, 7)] == [1, 2, 3]
    assert [cats.to_coco_id(label) for label in (1, 2, 3)] == [2, 5, 7]
    assert cats.label_to_coco_id() == {1: 2, 2: 5, 3: 7}
    assert cats.label_names() == {1: "a", 2: "b", 3: "c"}
    assert cats.name(3) == "c"
    with pytest.raises(KeyError, match="not among"):
        cats.to_label(3)
    with pytest.raises(ValueError, match="outside 1..3"):
        cats.to_coco_id(0)


def _write_coco(folder: Path, images, annotations, categories=({"id": 1, "name": "thing"},)):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": list(categories)}))
    return path


def test_skips_degenerate_annotations_and_keeps_negative_images(tmp_path):
    img = np.full((32, 48, 3), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    cv2.imwrite(str(tmp_path / "b.png"), img)
    square = [[4, 4, 20, 4, 20, 20, 4, 20]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": square, "bbox": [4, 4, 16, 16], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[5, 5, 5.4, 5, 5.4, 30]],
         "bbox": [5, 5, 0.4, 25], "iscrowd": 0},  # narrower than a pixel: skipped from the json
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[30, 10, 40, 10, 35, 10.01]],
         "bbox": [30, 10, 10, 1.0], "iscrowd": 0},  # passes the box check, rasterises empty
    ]
    images = [{"id": 1, "file_name": "a.png", "width": 48, "height": 32},
              {"id": 2, "file_name": "b.png", "width": 48, "height": 32}]
    source = CocoSource(tmp_path, _write_coco(tmp_path, images, anns))
    assert len(source) == 2 and source.stats.get("annotations_skipped_small") == 1
    sample = source.load(0)
    assert len(sample["labels"]) == 1 and source.stats.get("annotations_skipped_empty_mask") == 1
    np.testing.assert_array_equal(sample["boxes"], [[4, 4, 20, 20]])
    negative = source.load(1)
    assert negative["masks"].shape == (0, 32, 48) and negative["boxes"].shape == (0, 4)


def test_annotations_without_a_usable_segmentation_are_counted_not_fatal(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((32, 48, 3), 100, np.uint8))
    square = [4, 4, 20, 4, 20, 20, 4, 20]
    box = [4, 4, 16, 16]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [], "bbox": box, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": box, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "segmentation": [[4, 4, 20, 20]], "bbox": box,
         "iscrowd": 0},                                   # a 2-point polygon only: skipped
        {"id": 4, "image_id": 1, "category_id": 1, "segmentation": [[30, 5, 40, 9], square],
         "bbox": box, "iscrowd": 0},                      # its short polygon dropped, the square kept
    ]
    images = [{"id": 1, "file_name": "a.png", "width": 48, "height": 32}]
    source = CocoSource(tmp_path, _write_coco(tmp_path, images, anns))
    assert source.stats.get("annotations_skipped_no_segmentation") == 3
    sample = source.load(0)
    np.testing.assert_array_equal(sample["boxes"], [[4, 4, 20, 20]])


@pytest.mark.parametrize("bad, message", [
    ({"category_id": 7}, r"annotation 1 \(image 1\): category_id 7 is not among the file's categories \[1\]"),
    ({"bbox": None}, r"annotation 1 \(image 1\) has no \[x, y, width, height\] bbox"),
    # an RLE of the transposed size would decode to a (48, 32) mask of a (32, 48) image
    ({"segmentation": {"size": [48, 32], "counts": "0`0"}},
     r"annotation 1 \(image 1\): RLE size \[48, 32\] is not the image's \[height, width\] \[32, 48\]"),
])
def test_malformed_annotations_name_the_file_and_annotation(tmp_path, bad, message):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((32, 48, 3), 100, np.uint8))
    ann = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 20]],
           "bbox": [4, 4, 16, 16], "iscrowd": 0, **bad}
    images = [{"id": 1, "file_name": "a.png", "width": 48, "height": 32}]
    annotations_file = _write_coco(tmp_path, images, [ann])
    with pytest.raises(ValueError, match=str(annotations_file.resolve()) + ": " + message):
        CocoSource(tmp_path, annotations_file)


@pytest.mark.parametrize("entry, message", [
    ({"width": 48}, r"image 1 needs a positive integer height, got None"),
    ({"width": 48, "height": 0}, r"image 1 needs a positive integer height, got 0"),
    ({"height": 32, "width": 48.5}, r"image 1 needs a positive integer width, got 48.5"),
    ({"height": "32", "width": 48}, r"image 1 needs a positive integer height, got '32'"),
])
def test_image_entries_without_file_or_size_name_the_file_and_image(tmp_path, entry, message):
    images = [{"id": 1, "file_name": "a.png", **entry}]
    annotations_file = _write_coco(tmp_path, images, [])
    with pytest.raises(ValueError, match=str(annotations_file.resolve()) + ": " + message):
        CocoSource(tmp_path, annotations_file)


def test_integral_float_image_sizes_are_sizes(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((32, 48, 3), 100, np.uint8))
    images = [{"id": 1, "file_name": "a.png", "width": 48.0, "height": 32.0}]
    assert CocoSource(tmp_path, _write_coco(tmp_path, images, [])).load(0)["image"].shape == (32, 48, 3)


def test_image_ids_the_metadata_cannot_carry_are_refused_when_the_json_is_read(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.full((32, 48, 3), 100, np.uint8))
    images = [{"id": 2**24, "file_name": "a.png", "width": 48, "height": 32}]
    annotations_file = _write_coco(tmp_path, images, [])
    with pytest.raises(ValueError, match=r"ann.json: image ids must lie in \[0, 2\*\*24\).* e.g. \[16777216\]"):
        CocoSource(tmp_path, annotations_file)


@pytest.mark.parametrize("stored, channels", [
    (np.full((8, 10), 77, np.uint8), 1),
    (np.dstack([np.full((8, 10), v, np.uint8) for v in (10, 20, 30, 0)]), 4),       # BGRA
    (np.dstack([np.full((8, 10), v, np.uint8) for v in (10, 20, 30)]), 3),
])
def test_read_image_converts_to_bgr(tmp_path, stored, channels):
    path = tmp_path / "img.png"
    assert cv2.imwrite(str(path), stored)
    image, orig_channels = read_image_bgr(path)
    assert orig_channels == channels and image.shape == (8, 10, 3) and image.dtype == np.uint8
    if stored.ndim == 2:                    # gray: three equal channels
        expected = np.dstack([stored] * 3)
    else:                                   # B, G, R kept in their order, alpha dropped
        expected = stored[:, :, :3]
    np.testing.assert_array_equal(image, expected)


def _write_gray_alpha_png(path: Path, gray: np.ndarray, alpha: np.ndarray) -> None:
    """An 8-bit gray+alpha PNG (colour type 4), written by hand: OpenCV writes none."""
    height, width = gray.shape
    pixels = np.dstack([gray, alpha])
    raw = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 4, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_read_gray_alpha_png_gives_the_gray_in_three_channels(tmp_path):
    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    path = tmp_path / "gray_alpha.png"
    _write_gray_alpha_png(path, gray, np.full((8, 10), 200, np.uint8))
    image, orig_channels = read_image_bgr(path)
    assert orig_channels == 4, "OpenCV decodes gray+alpha PNG as BGRA"
    np.testing.assert_array_equal(image, np.dstack([gray] * 3))


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image_bgr(tmp_path / "missing.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_image_bgr(broken)
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), np.full((4, 4), 60000, np.uint16))
    with pytest.raises(ValueError, match="deep.png.*16-bit"):
        read_image_bgr(deep)


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoSource(tmp_path, tmp_path / "nope.json")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((10, 10, 3), np.uint8))
    path = _write_coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 12, "height": 10},
                                  {"id": 2, "file_name": "gone.png", "width": 12, "height": 10}], [])
    source = CocoSource(tmp_path, path)
    with pytest.raises(ValueError, match="a.png is 10x10"):
        source.load(0)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        source.load(1)


def test_captured_loads_leave_the_sources_counters_alone(tmp_path):
    # An annotation whose polygon lies outside the image decodes to an empty mask (counted).
    cv2.imwrite(str(tmp_path / "a.png"), np.full((32, 48, 3), 100, np.uint8))
    ann = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[60, 40, 70, 40, 70, 50]],
           "bbox": [60, 40, 10, 10], "iscrowd": 0}
    images = [{"id": 1, "file_name": "a.png", "width": 48, "height": 32}]
    source = CocoSource(tmp_path, _write_coco(tmp_path, images, [ann]))
    with source.stats.capture() as other:   # e.g. the augmentation grid's loads
        source.load(0)
    assert other[source.stats.names.index("annotations_skipped_empty_mask")] == 1
    assert source.stats.get("annotations_skipped_empty_mask") == 0
    source.load(0)
    assert source.stats.get("annotations_skipped_empty_mask") == 1
