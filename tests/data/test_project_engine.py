"""Tests of the project InstaBoost engine (instaboost/data/transforms/project_engine.py).

Synthetic scenes are tiny (<= 128 px); the real-data tests run every image of coco128seg and
coco_val10 (skipped when ../shared/data is absent) in jitter and heatmap modes.
"""
from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from instaboost.data.transforms.color_jitter import ColorFactors, apply_color_jitter
from instaboost.data.transforms.project_engine import (
    MIN_INSTANCE_AREA_PX,
    ProjectInstaBoostEngine,
)
from tests.helpers import shared_data_dir

BASE_PARAMS = dict(action_candidate=["normal", "horizontal", "vertical", "skip"],
                   action_prob=[0.4, 0.25, 0.15, 0.2], scale=[0.8, 1.2], dx=15, dy=15,
                   theta=[-10, 10], color_prob=0.5, heatmap_flag=False)
# A moved mask must match the source mask warped by the recorded transform this well.
MIN_IOU = 0.95
# Nearest-neighbour warps differ from bilinear+threshold ones on the outline: the independent
# nearest-neighbour check applies to instances at least this large.
NEAREST_CHECK_MIN_AREA = 500
MASK_ON = 255
MASK_THRESHOLD = 128


def make_engine(**overrides) -> ProjectInstaBoostEngine:
    return ProjectInstaBoostEngine(**{**BASE_PARAMS, **overrides})


def make_scene(height: int = 96, width: int = 128, channels: int = 3, seed: int = 0,
               border_object: bool = False):
    """Textured background with an ellipse and a rectangle (and a left-border blob)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 2) % 256, (yy * 3) % 256, (xx + yy) % 256], axis=2).astype(np.float64)
    base += rng.normal(0, 8, base.shape)
    image = np.clip(base, 0, 255).astype(np.uint8)
    masks = []
    ellipse = np.zeros((height, width), np.uint8)
    cv2.ellipse(ellipse, (40, 40), (16, 11), 20, 0, 360, 1, -1)
    masks.append(ellipse)
    rect = np.zeros((height, width), np.uint8)
    rect[55:80, 75:110] = 1
    masks.append(rect)
    if border_object:
        blob = np.zeros((height, width), np.uint8)
        cv2.circle(blob, (3, 75), 9, 1, -1)
        masks.append(blob)
    masks = np.stack(masks)
    colours = [(30, 200, 90), (220, 40, 40), (250, 250, 20)]
    for mask, colour in zip(masks, colours):
        image[mask > 0] = colour
    if channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    elif channels == 4:
        image = np.dstack([image, np.full((height, width), 200, np.uint8)])
    labels = np.arange(1, len(masks) + 1, dtype=np.int32)
    return image, masks, labels


def warp_expected(mask: np.ndarray, matrix: np.ndarray, nearest: bool = False) -> np.ndarray:
    """Full-canvas warp of a source mask by a recorded 2x3 matrix (bool (H, W))."""
    height, width = mask.shape
    if nearest:
        return cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST) > 0
    warped = cv2.warpAffine(mask * np.uint8(MASK_ON), matrix, (width, height), flags=cv2.INTER_LINEAR)
    return warped >= MASK_THRESHOLD


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def check_result(image, masks, labels, result) -> list[str]:
    """Problems of one engine result (empty list: consistent)."""
    problems = []
    if result.image.shape != image.shape or result.image.dtype != np.uint8:
        problems.append(f"image {result.image.dtype} {result.image.shape} for {image.shape}")
    m = len(result.kept)
    if result.masks.shape != (m,) + image.shape[:2] or result.masks.dtype != np.uint8:
        problems.append(f"masks {result.masks.dtype} {result.masks.shape}, kept {m}")
    if result.labels.dtype != np.int32 or not np.array_equal(result.labels, labels[result.kept]):
        problems.append("labels do not follow the kept instances")
    if np.any(np.diff(result.kept) <= 0):
        problems.append(f"kept indices not increasing: {result.kept}")
    for group in result.groups:
        for idx in group.indices:
            expected = warp_expected(masks[idx], group.matrix)
            source_area = int(np.count_nonzero(masks[idx]))
            position = np.flatnonzero(result.kept == idx)
            if position.size == 0:
                if np.count_nonzero(expected) >= min(MIN_INSTANCE_AREA_PX, source_area):
                    problems.append(f"instance {idx} dropped though its moved mask is visible")
                continue
            got = result.masks[position[0]] > 0
            if iou(got, expected) < MIN_IOU:
                problems.append(f"instance {idx}: IoU {iou(got, expected):.3f} with the recorded warp")
            if source_area >= NEAREST_CHECK_MIN_AREA:
                nearest = warp_expected(masks[idx], group.matrix, nearest=True)
                if iou(got, nearest) < MIN_IOU:
                    problems.append(f"instance {idx}: IoU {iou(got, nearest):.3f} with a nearest warp")
    return problems


# --------------------------------------------------------------------------- arguments
def test_repr_shows_every_argument_and_round_trips():
    engine = make_engine(dx=12.5, heatmap_flag=True)
    text = repr(engine)
    for name in BASE_PARAMS:
        assert f"{name}=" in text
    rebuilt = eval(text, {"ProjectInstaBoostEngine": ProjectInstaBoostEngine})
    assert repr(rebuilt) == text


@pytest.mark.parametrize("overrides, message", [
    (dict(action_prob=[0.4, 0.25, 0.15, 0.1]), "sum to 1"),
    (dict(action_candidate=["normal", "rotate", "vertical", "skip"]), "unknown action"),
    (dict(action_candidate="normal", action_prob=[1.0]), "list of action names"),
    (dict(action_candidate=["normal", "normal"], action_prob=[0.5, 0.5]), "duplicate"),
    (dict(action_prob=[0.5, 0.5]), "entries"),
    (dict(action_prob=[1.2, -0.2, 0.0, 0.0]), ">= 0"),
    (dict(dx=0), "dx"),
    (dict(dy=-3), "dy"),
    (dict(scale=[1.2, 0.8]), "min 1.2 > max 0.8"),
    (dict(scale=[0.0, 1.0]), "scale must be > 0"),
    (dict(scale=[1.0]), r"\[min, max\]"),
    (dict(theta=[10, -10]), "min 10.0 > max -10.0"),
    (dict(color_prob=1.5), "color_prob"),
    (dict(heatmap_flag="yes"), "heatmap_flag"),
])
def test_invalid_arguments_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_engine(**overrides)


def test_probabilities_within_tolerance_are_accepted():
    engine = make_engine(action_prob=[0.4, 0.25, 0.15, 0.2000004])
    assert abs(sum(engine.action_prob) - 1.0) < 1e-12


def test_bad_inputs_raise():
    image, masks, labels = make_scene()
    engine = make_engine()
    with pytest.raises(ValueError, match="rng"):
        engine(image, masks, labels, 0)
    with pytest.raises(ValueError, match="masks"):
        engine(image, masks[:, :10], labels, np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels"):
        engine(image, masks, labels[:1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="image"):
        engine(image.astype(np.float32), masks, labels, np.random.default_rng(0))


def test_engine_is_picklable_for_dataset_workers():
    engine = make_engine(heatmap_flag=True)
    assert repr(pickle.loads(pickle.dumps(engine))) == repr(engine)


# --------------------------------------------------------------------------- synthetic
def test_nonbinary_masks_and_int64_labels_are_normalised():
    image, masks, labels = make_scene()
    engine = make_engine()
    binary = engine(image, masks, labels, np.random.default_rng(1))
    scaled = engine(image, masks * 255, labels.astype(np.int64), np.random.default_rng(1))
    for a, b in zip(binary, scaled):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    assert set(np.unique(scaled[1])) <= {0, 1}


def test_image_without_instances_passes_through_unchanged():
    image, masks, labels = make_scene()
    engine = make_engine(color_prob=1.0, heatmap_flag=True)
    out_image, out_masks, out_labels = engine(image, masks[:0], labels[:0], np.random.default_rng(0))
    assert np.array_equal(out_image, image)
    assert out_masks.shape == (0,) + image.shape[:2] and out_labels.shape == (0,)


def test_empty_masks_are_dropped_and_image_unchanged():
    image, masks, labels = make_scene()
    out_image, out_masks, out_labels = make_engine(color_prob=1.0)(
        image, np.zeros_like(masks), labels, np.random.default_rng(0))
    assert np.array_equal(out_image, image)
    assert out_masks.shape == (0,) + image.shape[:2] and out_labels.shape == (0,)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("heatmap_flag", [False, True])
def test_masks_follow_the_recorded_transform(channels, heatmap_flag):
    engine = make_engine(scale=[0.6, 1.4], theta=[-30, 30], heatmap_flag=heatmap_flag)
    actions, guided = set(), 0
    for seed in range(12):
        image, masks, labels = make_scene(channels=channels, seed=seed, border_object=True)
        result = engine.apply(image, masks, labels, np.random.default_rng(seed))
        assert result.image.shape == image.shape
        assert check_result(image, masks, labels, result) == []
        actions.update(group.action for group in result.groups)
        guided += sum(group.heatmap_guided for group in result.groups)
    assert {"normal", "horizontal", "skip"} <= actions
    assert (guided > 0) == heatmap_flag


def test_pixels_move_with_their_mask():
    """The object's pixels land where its new mask is (one object, no colour jitter)."""
    engine = make_engine(scale=[0.7, 1.3], theta=[-25, 25], color_prob=0.0,
                         action_candidate=["normal", "horizontal"], action_prob=[0.5, 0.5])
    image, masks, labels = make_scene()
    for seed in range(6):
        result = engine.apply(image, masks[1:], labels[1:], np.random.default_rng(seed))
        (group,) = result.groups
        expected = cv2.warpAffine(image, group.matrix, image.shape[1::-1], flags=cv2.INTER_LINEAR)
        inside = cv2.erode(result.masks[0], np.ones((5, 5), np.uint8)) > 0
        assert inside.sum() > 100
        diff = np.abs(result.image[inside].astype(int) - expected[inside].astype(int))
        assert diff.mean() < 2.0


def test_matrix_matches_sampled_parameters():
    engine = make_engine(scale=[0.6, 1.4], theta=[-30, 30])
    for seed in range(20):
        image, masks, labels = make_scene(seed=seed)
        for group in engine.apply(image, masks, labels, np.random.default_rng(seed)).groups:
            linear = group.matrix[:, :2]
            det = np.linalg.det(linear)
            flipped = group.action in ("horizontal", "vertical")
            assert (det < 0) == flipped
            assert abs(abs(det) - group.scale ** 2) < 1e-9
            x0, y0, x1, y1 = group.box
            # The mirror maps the crop centre (w/2, h/2) half a pixel off; unflipped maps it exactly.
            centre = group.matrix @ np.array([(x0 + x1) / 2, (y0 + y1) / 2, 1.0])
            target = np.array([(x0 + x1) / 2 + group.shift[0], (y0 + y1) / 2 + group.shift[1]])
            assert np.abs(centre - target).max() <= (group.scale if flipped else 1e-9)
            if group.action == "normal":
                angle = np.degrees(np.arctan2(linear[1, 0], linear[0, 0]))
                assert abs(angle - group.theta_deg) < 1e-9


def test_instances_pushed_out_are_dropped():
    """Big shifts (dx = dy = 0.25: up to 4 box sizes) push instances out; they are absent."""
    engine = make_engine(dx=0.25, dy=0.25, action_candidate=["normal"], action_prob=[1.0])
    dropped = 0
    for seed in range(30):
        image, masks, labels = make_scene(seed=seed, border_object=True)
        result = engine.apply(image, masks, labels, np.random.default_rng(seed))
        assert check_result(image, masks, labels, result) == []
        dropped += len(masks) - len(result.kept)
        for group in result.groups:
            for idx in group.indices:
                if idx not in result.kept:
                    assert np.count_nonzero(warp_expected(masks[idx], group.matrix)) < MIN_INSTANCE_AREA_PX
    assert dropped > 0


def test_vacated_pixels_do_not_keep_the_object():
    """Where a moved object was and nothing is pasted, the inpainted background shows: no pixel
    keeps the object's colour (a duplicate 'ghost' of it)."""
    engine = make_engine(action_candidate=["normal"], action_prob=[1.0], color_prob=0.0)
    checked = 0
    for seed in range(10):
        image, masks, labels = make_scene(seed=seed)
        result = engine.apply(image, masks, labels, np.random.default_rng(seed))
        covered = result.masks.max(axis=0, initial=0) > 0
        for mask in masks:
            vacated = (mask > 0) & ~covered
            if np.count_nonzero(vacated) >= 20:
                colour = image[mask > 0][0].astype(int)
                same = np.abs(result.image[vacated].astype(int) - colour).max(axis=1) <= 10
                assert same.mean() < 0.05
                checked += 1
    assert checked >= 10


def test_later_groups_are_pasted_on_top():
    """Groups are pasted in the order of their lowest instance index: where two grown groups
    overlap, the later one's pixels show."""
    height, width = 64, 96
    image = np.full((height, width, 3), 128, np.uint8)
    masks = np.zeros((2, height, width), np.uint8)
    masks[0, 20:44, 20:46] = 1   # boxes 2 px apart: scaled by 1.5 about their centres, they overlap
    masks[1, 20:44, 48:74] = 1
    image[masks[0] > 0] = (255, 0, 0)
    image[masks[1] > 0] = (0, 0, 255)
    engine = make_engine(action_candidate=["normal"], action_prob=[1.0], scale=[1.5, 1.5],
                         dx=1e9, dy=1e9, theta=[0, 0], color_prob=0.0)
    result = engine.apply(image, masks, np.array([1, 2], np.int32), np.random.default_rng(0))
    overlap = (result.masks[0] > 0) & (result.masks[1] > 0)
    # away from the pasted edges, where the bilinear alpha blends the colours
    inside = cv2.erode(overlap.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert np.count_nonzero(inside) > 50
    assert np.all(result.image[inside] == (0, 0, 255))


def test_four_channel_alpha_kept_away_from_objects():
    image, masks, labels = make_scene(channels=4)
    out_image, _, _ = make_engine(color_prob=1.0)(image, masks, labels, np.random.default_rng(3))
    far = cv2.dilate(masks.max(axis=0), np.ones((41, 41), np.uint8)) == 0
    assert far.any() and np.all(out_image[:, :, 3][far] == 200)


@pytest.mark.parametrize("heatmap_flag", [False, True])
def test_same_seed_same_output_different_seed_different_output(heatmap_flag):
    image, masks, labels = make_scene(border_object=True)
    engine = make_engine(heatmap_flag=heatmap_flag)
    first = engine(image, masks, labels, np.random.default_rng(7))
    again = engine(image, masks, labels, np.random.default_rng(7))
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    others = [engine(image, masks, labels, np.random.default_rng(seed))[0] for seed in range(8, 12)]
    assert any(not np.array_equal(first[0], other) for other in others)


# --------------------------------------------------------------------------- colour
def pil_reference_jitter(bgr: np.ndarray, factors: ColorFactors) -> np.ndarray:
    """The reference's PIL chain (instaboostfast randomColor) on a BGR image."""
    pil = Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    pil = ImageEnhance.Color(pil).enhance(factors.saturation)
    pil = ImageEnhance.Brightness(pil).enhance(factors.brightness)
    pil = ImageEnhance.Contrast(pil).enhance(factors.contrast)
    pil = ImageEnhance.Sharpness(pil).enhance(factors.sharpness)
    return cv2.cvtColor(np.asarray(pil), cv2.COLOR_RGB2BGR)


@pytest.mark.parametrize("factors", [ColorFactors(2.0, 1.3, 1.5, 2.5), ColorFactors(0.3, 1.0, 1.8, 0.0),
                                     ColorFactors(1.0, 1.7, 1.0, 1.0)])
def test_color_jitter_matches_reference_in_bgr_order(factors):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80]
    bgr = np.stack([xx * 3, np.full_like(xx, 60), 250 - yy * 3], axis=2).astype(np.uint8)
    bgr = np.clip(bgr.astype(int) + rng.integers(-10, 10, bgr.shape), 0, 255).astype(np.uint8)
    ours = apply_color_jitter(bgr, factors).astype(int)
    expected = pil_reference_jitter(bgr, factors).astype(int)
    assert np.abs(ours - expected).mean() < 1.5
    assert np.abs(ours - expected).max() <= 6
    if factors.saturation != 1.0:
        # Treating the BGR image as RGB (swapped luma weights) would be visibly different.
        swapped = apply_color_jitter(bgr[:, :, ::-1].copy(), factors)[:, :, ::-1].astype(int)
        assert np.abs(swapped - expected).mean() > 3 * np.abs(ours - expected).mean() + 1


def test_engine_applies_color_jitter_to_the_whole_image():
    image, masks, labels = make_scene()
    engine = make_engine(color_prob=1.0, action_candidate=["skip"], action_prob=[1.0])
    result = engine.apply(image, masks, labels, np.random.default_rng(5))
    assert result.color is not None
    assert np.array_equal(result.image, apply_color_jitter(image, result.color))
    never = make_engine(color_prob=0.0, action_candidate=["skip"], action_prob=[1.0])
    assert np.array_equal(never(image, masks, labels, np.random.default_rng(5))[0], image)


def test_grayscale_color_jitter_is_brightness_only():
    image, _, _ = make_scene(channels=1)
    factors = ColorFactors(saturation=0.0, brightness=1.4, contrast=2.0, sharpness=3.0)
    out = apply_color_jitter(image, factors)
    expected = np.clip(np.round(image.astype(np.float64) * 1.4), 0, 255)
    assert out.shape == image.shape
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


# --------------------------------------------------------------------------- real data
def load_real_images(name: str):
    """(image (H, W, C) as decoded, C in {1, 3}; masks uint8 (N, H, W); labels) per image."""
    from pycocotools.coco import COCO

    root = shared_data_dir(name)
    coco = COCO(str(root / "annotations.json"))
    samples = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(str(root / "images" / info["file_name"]), cv2.IMREAD_UNCHANGED)
        if image.ndim == 2:
            image = image[:, :, None]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        masks = np.zeros((len(anns),) + image.shape[:2], np.uint8)
        for k, ann in enumerate(anns):
            masks[k] = coco.annToMask(ann)
        labels = np.asarray([ann["category_id"] for ann in anns], dtype=np.int32)
        samples.append((info["file_name"], image, masks, labels))
    return samples


@pytest.fixture(scope="module")
def real_samples():
    return load_real_images("coco128seg") + load_real_images("coco_val10")


@pytest.mark.parametrize("heatmap_flag", [False, True], ids=["jitter", "heatmap"])
def test_real_images_zero_failures_and_exact_masks(real_samples, heatmap_flag):
    assert len(real_samples) == 136
    engine = make_engine(heatmap_flag=heatmap_flag)
    failures, guided, grey = [], 0, 0
    for k, (file_name, image, masks, labels) in enumerate(real_samples):
        result = engine.apply(image, masks, labels, np.random.default_rng(k))
        failures += [f"{file_name}: {p}" for p in check_result(image, masks, labels, result)]
        guided += sum(group.heatmap_guided for group in result.groups)
        grey += image.shape[2] == 1
    assert failures == []
    assert grey >= 1  # coco128seg holds a grayscale JPEG: the (H, W, 1) path ran on real data
    assert (guided > 0) == heatmap_flag
