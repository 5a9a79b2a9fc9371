"""Geometric transforms, TrainTransform and the InstaBoostAug step (real images where it matters)."""
import cv2
import numpy as np
import pytest

from instaboost.data.coco import CocoSource, masks_to_boxes
from instaboost.data.pipeline import EvalTransform, TrainTransform
from instaboost.data.stats import DataStats
from instaboost.data.transforms import InstaBoostAug, build_instaboost_engine, build_instaboost_step
from instaboost.data.transforms.geometric import (box_aligned_masks, check_pad_shape, hflip_boxes,
                                                  keep_ratio_size, normalize_to_chw, resize_masks,
                                                  select_largest)
from tests.helpers import shared_data_dir

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
AUG_PARAMS = dict(engine="instaboostfast", aug_prob=1.0, action_candidate=["normal", "horizontal", "skip"],
                  action_prob=[1.0, 0.0, 0.0], scale=[0.8, 1.2], dx=15, dy=15, theta=[-1, 1],
                  color_prob=0.5, heatmap_flag=False)
# Nearest-neighbour resizing moves most mask edges by at most this much (output pixels) ...
BOX_MATCH_PX = 2.0
# ... for at least this share of the box edges (measured on coco128seg: 99.5 %).
NEAREST_WITHIN_SHARE = 0.98


def _transform(**overrides):
    kwargs = dict(img_height=128, img_width=192, pad_divisor=64, flip_ratio=0.5, img_mean=MEAN,
                  img_std=STD, num_gts=100, gt_mask_size=28)
    kwargs.update(overrides)
    return TrainTransform(**kwargs)


def test_keep_ratio_size_fits_and_keeps_aspect():
    assert keep_ratio_size(480, 640, 128, 192) == (128, 171)
    assert keep_ratio_size(640, 480, 128, 192) == (128, 96)
    assert keep_ratio_size(100, 1000, 128, 192) == (19, 192)
    assert keep_ratio_size(103, 1000, 128, 192) == (20, 192)   # 19.776 rounds up


def test_pad_divisor_is_checked():
    check_pad_shape(128, 192, 64)
    with pytest.raises(ValueError, match="divisible by pad_divisor"):
        check_pad_shape(100, 192, 64)
    with pytest.raises(ValueError, match="divisible by pad_divisor"):
        _transform(img_width=200)


def test_hflip_boxes_is_an_involution():
    boxes = np.array([[0, 1, 5, 9], [3, 0, 10, 2]], np.float32)
    flipped = hflip_boxes(boxes, 10)
    np.testing.assert_array_equal(flipped, [[5, 1, 10, 9], [0, 0, 7, 2]])
    np.testing.assert_array_equal(hflip_boxes(flipped, 10), boxes)


def test_box_aligned_masks():
    masks = np.zeros((3, 40, 50), np.uint8)
    masks[0, 5:15, 10:40] = 1  # a full rectangle fills its own box
    masks[1, 20:40, 0:20] = np.tril(np.ones((20, 20), np.uint8))  # lower triangle
    masks[2, 0, 49] = 1  # a single pixel is never lost
    boxes = masks_to_boxes(masks)
    out = box_aligned_masks(masks, boxes, 8)
    assert out.dtype == np.uint8 and out.shape == (3, 8, 8)
    assert out[0].all() and out[2].all()
    assert out[1][7, 0] == 1 and out[1][0, 7] == 0
    np.testing.assert_array_equal(box_aligned_masks(masks, boxes, 8, hflip=True), out[:, :, ::-1])
    # a pixel of the M x M mask whose area is exactly half covered is set ("reaches one half")
    stripes = np.zeros((1, 4, 4), np.uint8)
    stripes[0, :, ::2] = 1
    assert box_aligned_masks(stripes, np.array([[0, 0, 4, 4]], np.float32), 2).sum() == 4


def test_select_largest_prefers_targets_then_area():
    areas = np.array([5, 50, 20, 100, 1])
    crowd = np.array([False, False, False, True, False])
    np.testing.assert_array_equal(select_largest(areas, crowd, 2), [1, 2])
    np.testing.assert_array_equal(select_largest(areas, crowd, 5), [0, 1, 2, 3, 4])


def test_normalize_to_chw_is_rgb():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255  # blue in BGR
    out = normalize_to_chw(image, [0, 0, 0], [1, 1, 1])
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    assert (out[2] == 255).all() and (out[0] == 0).all()


def _real_source(name="coco128seg", ann="annotations.json"):
    root = shared_data_dir(name)
    return CocoSource(root / "images", root / ann)


@pytest.mark.parametrize("flip_ratio", [0.0, 1.0])
def test_train_transform_geometry_on_real_images(flip_ratio):
    source = _real_source()
    transform = _transform(flip_ratio=flip_ratio)
    nearest_errors = []
    for index in range(0, len(source), 3):
        sample = source.load(index)
        out = transform(sample, np.random.default_rng(index))
        meta = out["img_meta"]
        orig_h, orig_w, new_h, new_w = (int(v) for v in meta[1:])
        assert meta[0] == sample["image_id"] and (orig_h, orig_w) == sample["image"].shape[:2]
        assert out["image"].shape == (3, 128, 192) and out["image"].dtype == np.float32
        assert (out["image"][:, new_h:, :] == 0).all() and (out["image"][:, :, new_w:] == 0).all()
        n = len(sample["labels"])
        valid = out["gt_valid"]
        assert valid.sum() == n and valid[:n].all()
        boxes = out["gt_boxes"][:n]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= new_w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= new_h).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert out["gt_masks"][:n].reshape(n, -1).any(axis=1).all()
        assert (out["gt_labels"][:n] == sample["labels"]).all() and (out["gt_labels"][n:] == 0).all()
        assert (out["gt_boxes"][n:] == 0).all() and not out["gt_masks"][n:].any()
        # the resized masks' tight boxes agree with the scaled (and flipped) gt boxes: exactly up to
        # pixel rounding for coverage (area) resizing; nearest resizing keeps only every
        # (1/scale)-th source row/column, so a thin tip may vanish and move the box further.
        coverage = np.stack([cv2.resize(m.astype(np.float32), (new_w, new_h),
                                        interpolation=cv2.INTER_AREA) > 0 for m in sample["masks"]])
        nearest = resize_masks(sample["masks"], new_h, new_w)
        if flip_ratio:
            coverage, nearest = coverage[:, :, ::-1], nearest[:, :, ::-1]
        np.testing.assert_allclose(masks_to_boxes(coverage), boxes, atol=1.0)
        nonempty = nearest.reshape(n, -1).any(axis=1)
        nearest_errors.append(np.abs(masks_to_boxes(nearest)[nonempty] - boxes[nonempty]).ravel())
        # the image holds the resized picture, RGB, normalized
        rgb = out["image"][:, :new_h, :new_w] * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
        assert rgb.min() > -1 and rgb.max() < 256
        if flip_ratio:   # the picture and the masks are flipped with the boxes
            unflipped = _transform(flip_ratio=0.0)(source.load(index), np.random.default_rng(index))
            np.testing.assert_array_equal(out["image"][:, :new_h, :new_w],
                                          unflipped["image"][:, :new_h, :new_w][:, :, ::-1])
            np.testing.assert_array_equal(out["gt_masks"][:n], unflipped["gt_masks"][:n][:, :, ::-1])
    errors = np.concatenate(nearest_errors)
    assert np.median(errors) <= 0.5 + 1e-3 and np.mean(errors <= BOX_MATCH_PX) >= NEAREST_WITHIN_SHARE


def test_train_transform_keeps_the_largest_and_counts_the_rest():
    source = _real_source()
    index = max(range(len(source)), key=lambda i: len(source.coco.imgToAnns[source.image_ids[i]]))
    sample = source.load(index)
    stats = DataStats()
    out = _transform(num_gts=3, stats=stats)(sample, np.random.default_rng(0))
    areas = sample["masks"].reshape(len(sample["masks"]), -1).sum(axis=1)
    assert out["gt_valid"].all() and stats.get("gts_dropped_over_limit") == len(areas) - 3
    kept_labels = sorted(sample["labels"][np.sort(np.argsort(-areas)[:3])])
    assert sorted(out["gt_labels"]) == kept_labels


def test_crowd_is_flagged_and_never_given_to_the_engine():
    source = _real_source("coco_val10", "annotations_with_crowd.json")
    index = next(i for i in range(len(source)) if source.load(i)["iscrowd"].any())
    sample = source.load(index)
    engine = build_instaboost_engine("instaboostfast", AUG_PARAMS)
    seen = []

    def spy(image, masks, labels, rng):
        seen.append(masks.copy())
        return engine(image, masks, labels, rng)

    stats = DataStats()
    step = InstaBoostAug(spy, 1.0, stats=stats)
    out = _transform(augment=step, flip_ratio=0.0)(sample, np.random.default_rng(1))
    crowd_mask = sample["masks"][sample["iscrowd"]][0]
    (given,) = seen
    assert len(given) == (~sample["iscrowd"]).sum()
    assert not any(np.array_equal(m, crowd_mask) for m in given)
    crowd_slots = np.flatnonzero(out["gt_crowd"])
    assert len(crowd_slots) == 1 and out["gt_valid"][crowd_slots].all()
    assert out["gt_labels"][crowd_slots[0]] == sample["labels"][sample["iscrowd"]][0]
    assert stats.get("instaboost_applied") == 1


@pytest.mark.parametrize("aug_prob", [0.0, 1.0])
def test_instaboost_on_and_off_on_real_images(aug_prob):
    source = _real_source()
    stats = DataStats()
    step = InstaBoostAug(build_instaboost_engine("instaboostfast", AUG_PARAMS), aug_prob, stats=stats)
    transform = _transform(augment=step)
    changed = 0
    for index in range(0, 30, 5):
        sample = source.load(index)
        augmented = step(sample, np.random.default_rng(index))
        assert augmented["instaboost_applied"] == bool(aug_prob)
        changed += int(not np.array_equal(augmented["image"], sample["image"]))
        masks = augmented["masks"]
        assert masks.dtype == np.uint8 and masks.shape[1:] == sample["masks"].shape[1:]
        assert masks.reshape(len(masks), -1).any(axis=1).all()
        np.testing.assert_array_equal(augmented["boxes"], masks_to_boxes(masks))
        assert augmented["labels"].dtype == np.int32 and augmented["iscrowd"].dtype == np.bool_
        assert set(augmented["labels"]) <= set(sample["labels"])
        out = transform(sample, np.random.default_rng(index))
        assert out["gt_masks"][out["gt_valid"]].reshape(int(out["gt_valid"].sum()), -1).any(axis=1).all()
    assert stats.get("instaboost_applied") == (12 if aug_prob else 0)  # step + transform
    assert (changed > 0) == bool(aug_prob)
    assert repr(step).startswith("InstaBoostAug(engine=InstaBoostFastEngine(action_candidate=")
    for name in ("action_prob=", "scale=", "dx=", "dy=", "theta=", "color_prob=", "heatmap_flag=",
                 f"aug_prob={aug_prob}"):
        assert name in repr(step)


def test_step_returns_early_without_instances():
    image = np.zeros((32, 32, 3), np.uint8)
    sample = {"image_id": 1, "image": image, "boxes": np.zeros((0, 4), np.float32),
              "labels": np.zeros((0,), np.int32), "masks": np.zeros((0, 32, 32), np.uint8),
              "iscrowd": np.zeros((0,), bool)}

    def engine(*args):
        raise AssertionError("the engine must not run without instances")

    step = InstaBoostAug(engine, 1.0)
    out = step(sample, np.random.default_rng(0))
    assert out["image"] is image and step.counts["instaboost_no_instances"] == 1
    assert build_instaboost_step({**AUG_PARAMS, "aug_prob": 0.0}) is None


def test_step_counts_every_instance_it_drops():
    """Instances pushed out of the image (shifts of up to 4 box sizes) are counted, not lost."""
    from tests.data.test_project_engine import make_engine, make_scene

    stats = DataStats()
    step = InstaBoostAug(make_engine(dx=0.25, dy=0.25, action_candidate=["normal"],
                                     action_prob=[1.0]), 1.0, stats=stats)
    dropped = 0
    for seed in range(20):
        image, masks, labels = make_scene(seed=seed, border_object=True)
        sample = {"image_id": seed, "image": image, "masks": masks, "labels": labels,
                  "boxes": masks_to_boxes(masks), "iscrowd": np.zeros(len(masks), bool)}
        dropped += len(masks) - len(step(sample, np.random.default_rng(seed))["labels"])
    assert dropped > 0 and step.counts["instaboost_dropped_instances"] == dropped


def test_same_rng_same_output_and_eval_transform():
    source = _real_source("coco_val10")
    step = build_instaboost_step(AUG_PARAMS)
    transform = _transform(augment=step)
    sample = source.load(3)
    first = transform(sample, np.random.default_rng(7))
    second = transform(sample, np.random.default_rng(7))
    other = transform(sample, np.random.default_rng(8))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert not np.array_equal(first["image"], other["image"])
    out = EvalTransform(img_height=128, img_width=192, pad_divisor=64, img_mean=MEAN, img_std=STD)(sample)
    assert out["image"].shape == (3, 128, 192) and out["img_meta"].dtype == np.float32
    np.testing.assert_array_equal(out["img_meta"][:3], [sample["image_id"], *sample["image"].shape[:2]])


def test_eval_images_are_train_images_without_augmentation_and_meta_is_h_then_w():
    """The evaluation sees what training sees (same resize, RGB order, normalisation); its
    img_meta carries [image_id, orig_h, orig_w, resized_h, resized_w] for mapping results back."""
    sample = _real_source("coco_val10").load(3)
    height, width = sample["image"].shape[:2]
    assert height != width
    evaluated = EvalTransform(img_height=128, img_width=192, pad_divisor=64, img_mean=MEAN,
                              img_std=STD)(sample)
    trained = _transform(flip_ratio=0.0)(sample, np.random.default_rng(0))
    np.testing.assert_allclose(evaluated["image"], trained["image"], atol=1e-6)
    np.testing.assert_array_equal(evaluated["img_meta"][:5],
                                  [sample["image_id"], height, width,
                                   *keep_ratio_size(height, width, 128, 192)])


def test_project_engine_through_the_registry_on_real_images():
    source = _real_source("coco_val10", "annotations_with_crowd.json")
    stats = DataStats()
    step = build_instaboost_step({**AUG_PARAMS, "engine": "project"}, stats=stats)
    transform = _transform(augment=step)
    for index in range(len(source)):
        sample = source.load(index)
        out = transform(sample, np.random.default_rng(index))
        n = int(out["gt_valid"].sum())
        assert out["gt_masks"][:n].reshape(n, -1).any(axis=1).all()
        assert out["gt_crowd"].sum() == sample["iscrowd"].sum()
    assert stats.get("instaboost_applied") == len(source)
