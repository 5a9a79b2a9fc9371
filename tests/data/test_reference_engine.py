"""The instaboostfast reference engine: the fixes at their causes, the contract, the real sets."""
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from instaboost.data.coco import CocoSource
from instaboost.data.demo_data import generate_image
from instaboost.data.transforms import build_instaboost_engine
from instaboost.data.transforms.reference_engine import (InstaBoostFastEngine, binary_mask_to_polygon,
                                                         exact_unit_sum, import_instaboostfast,
                                                         mask_to_uncompressed_rle, original_function,
                                                         segmentation_to_mask)
from tests.helpers import REPO_ROOT, shared_data_dir

PARAMS = dict(action_candidate=["normal", "horizontal", "skip"], action_prob=[1.0, 0.0, 0.0],
              scale=[0.8, 1.2], dx=15, dy=15, theta=[-1, 1], color_prob=0.5, heatmap_flag=False)
FLIP_PARAMS = {**PARAMS, "action_prob": [0.5, 0.5, 0.0]}


def _two_blobs():
    mask = np.zeros((40, 40), np.uint8)
    mask[2:20, 2:20] = 1
    mask[30:33, 30:33] = 1  # a second contour of another length
    return mask


def test_fixed_binary_mask_to_polygon_matches_the_library():
    original = original_function("binary_mask_to_polygon")
    single = np.zeros((30, 30), np.uint8)
    single[5:20, 8:25] = 1
    assert binary_mask_to_polygon(single) == original(single)
    with pytest.raises(ValueError, match="inhomogeneous"):
        original(_two_blobs())  # the bug under NumPy >= 1.24
    polygons = binary_mask_to_polygon(_two_blobs())
    assert len(polygons) == 2
    traced = segmentation_to_mask(polygons, 40, 40)  # half-pixel outlines: boundary rounding only
    assert (traced & _two_blobs()).sum() / (traced | _two_blobs()).sum() > 0.8
    assert traced[30:33, 30:33].any() and traced[5:17, 5:17].all()


def test_fixes_are_installed_where_the_library_looks_them_up():
    import_instaboostfast()
    import instaboostfast.affine_transform as affine_module
    import instaboostfast.get_instance_group as group_module

    assert affine_module.binary_mask_to_polygon is binary_mask_to_polygon
    assert group_module.get_transform is not original_function("get_transform")


def test_exact_unit_sum():
    for probs in ([0.1, 0.3], [0.1, 0.6, 0.3], [1e-7, 1 - 1e-7], [3, 1]):
        out = exact_unit_sum(probs)
        assert np.sum(out) == 1.0
        np.testing.assert_allclose(out, np.asarray(probs) / np.sum(probs), rtol=1e-12)
    with pytest.raises(ValueError):
        exact_unit_sum([0.0, 0.0])


def test_border_groups_renormalise_exactly():
    import_instaboostfast()
    import instaboostfast.get_instance_group as group_module
    from instaboostfast import InstaBoostConfig

    config = InstaBoostConfig(action_candidate=("normal", "horizontal", "skip"),
                              action_prob=(0.1, 0.6, 0.3))
    restricts = {"bbox_w": 30, "bbox_h": 30, "noflip": 1, "restrict_left": 1}
    src = np.zeros((30, 30, 4), np.uint8)
    with pytest.raises(AssertionError):
        original_function("get_transform")(src, dict(restricts), config)  # 0.1/0.4 + 0.3/0.4 != 1
    np.random.seed(0)
    for _ in range(50):
        _, transform = group_module.get_transform(src, dict(restricts), config)
        assert "flip" not in transform
    only_flips = InstaBoostConfig(action_candidate=("horizontal",), action_prob=(1,))
    _, transform = group_module.get_transform(src, dict(restricts), only_flips)
    assert "flip" not in transform and transform["s"] >= 1  # 'normal' under the border restriction


def test_import_restores_the_matplotlib_backend():
    code = ("import matplotlib; from instaboost.data.transforms.reference_engine import "
            "import_instaboostfast; import_instaboostfast(); "
            "print(matplotlib.get_backend(auto_select=False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "None"  # still "not chosen yet", not the library's AGG


def test_rle_round_trip():
    mask = _two_blobs()
    mask[0, 0] = 1
    np.testing.assert_array_equal(segmentation_to_mask(mask_to_uncompressed_rle(mask), 40, 40), mask)


def _demo_sample(seed=3, size=96):
    image, objects = generate_image(np.random.default_rng(seed), size)
    masks = np.stack([segmentation_to_mask(o["polygons"], size, size) for o in objects])
    labels = np.array([o["category_id"] for o in objects], np.int32)
    return image, masks, labels


@pytest.mark.parametrize("params", [PARAMS, FLIP_PARAMS])
def test_engine_contract_determinism_and_global_state(params):
    engine = build_instaboost_engine("instaboostfast", params)
    assert engine.segmentation_format == ("polygon" if params is FLIP_PARAMS else "rle")
    image, masks, labels = _demo_sample()
    random.seed(11)
    np.random.seed(11)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    out = engine(image, masks, labels, np.random.default_rng(5))
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    new_image, new_masks, new_labels = out
    assert new_image.dtype == np.uint8 and new_image.shape == image.shape
    assert new_masks.dtype == np.uint8 and new_masks.shape[1:] == masks.shape[1:]
    assert new_labels.dtype == np.int32 and len(new_labels) == len(new_masks) <= len(masks)
    assert set(new_labels) <= set(labels)
    again = engine(image, masks, labels, np.random.default_rng(5))
    for a, b in zip(out, again):
        np.testing.assert_array_equal(a, b)
    empty = engine(image, masks[:0], labels[:0], np.random.default_rng(5))
    assert empty[1].shape == (0, 96, 96) and np.array_equal(empty[0], image)


def test_identity_action_keeps_rle_masks_exact():
    engine = InstaBoostFastEngine(**{**PARAMS, "action_candidate": ["skip"], "action_prob": [1.0],
                                     "color_prob": 0.0})
    image, masks, labels = _demo_sample(seed=4)
    _, new_masks, new_labels = engine(image, masks, labels, np.random.default_rng(0))
    assert len(new_masks) == len(masks)
    assert sorted(new_labels.tolist()) == sorted(labels.tolist())
    assert {m.tobytes() for m in new_masks} == {m.tobytes() for m in masks}


def test_invalid_parameters_are_named():
    with pytest.raises(ValueError, match="theta"):
        InstaBoostFastEngine(**{**PARAMS, "theta": [-1.5, 1.5]})
    with pytest.raises(ValueError, match="action_prob"):
        InstaBoostFastEngine(**{**PARAMS, "action_prob": [0.5, 0.0, 0.0]})
    with pytest.raises(ValueError, match="unknown actions"):
        InstaBoostFastEngine(**{**PARAMS, "action_candidate": ["normal", "mirror", "skip"]})
    with pytest.raises(ValueError, match="unknown InstaBoost engine"):
        build_instaboost_engine("fastest", PARAMS)


def _run_all(engine, sources):
    failures, count = [], 0
    for source in sources:
        for index in range(len(source)):
            sample = source.load(index)
            keep = ~sample["iscrowd"]
            try:
                image, masks, labels = engine(sample["image"], sample["masks"][keep],
                                              sample["labels"][keep], np.random.default_rng(index))
            except ValueError as exc:  # collected to name every failing image, then asserted
                failures.append(f"{sample['file_name']}: {exc}")
                continue
            count += 1
            assert image.shape == sample["image"].shape and masks.shape[1:] == image.shape[:2]
            assert len(labels) == len(masks)
    return failures, count


@pytest.mark.slow
def test_no_real_image_fails_with_flips():
    """All 126 + 10 real images through the polygon path (the one that raised before the fix)."""
    sources = [CocoSource(shared_data_dir("coco128seg") / "images", shared_data_dir("coco128seg") / "annotations.json"),
               CocoSource(shared_data_dir("coco_val10") / "images",
                          shared_data_dir("coco_val10") / "annotations_with_crowd.json")]
    engine = InstaBoostFastEngine(**{**FLIP_PARAMS, "color_prob": 0.0})
    start = time.perf_counter()
    failures, count = _run_all(engine, sources)
    assert not failures, failures
    assert count == 136
    print(f"reference engine, polygon path: 136 images in {time.perf_counter() - start:.1f} s")


def test_real_val_images_with_the_default_config():
    root = shared_data_dir("coco_val10")
    failures, count = _run_all(InstaBoostFastEngine(**PARAMS),
                               [CocoSource(root / "images", root / "annotations_with_crowd.json")])
    assert not failures and count == 10
