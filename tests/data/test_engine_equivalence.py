"""The project engine samples and moves like the reference (instaboostfast 0.1.2).

Statistical comparisons draw a few thousand samples from both samplers (the reference's own
`get_restriction` / `get_transform`, seeded through its global `random` / `np.random`) and test
them with two-sample tests at a 1e-3 level; geometry and heatmap comparisons call the
reference's functions on tiny synthetic images.
"""
from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
from scipy import stats

from instaboost.data.transforms.heatmap import SHRINK, HeatmapGuide
from instaboost.data.transforms.paste import forward_matrix, warp_mask
from instaboost.data.transforms.project_engine import (
    BORDER_MARGIN_PX,
    ProjectInstaBoostEngine,
    _border_sides,
)

pytest.importorskip("instaboostfast")
import instaboostfast  # noqa: E402
from instaboostfast import affine_transform as ref_affine  # noqa: E402
from instaboostfast import help_functions as ref_help  # noqa: E402
from instaboostfast import pointByHeatmap as ref_heatmap  # noqa: E402
from instaboostfast import single_image_process as ref_sampling  # noqa: E402

DRAWS = 3000
P_LEVEL = 1e-3
# Probabilities whose no-flip renormalisation is exact in binary floating point (the reference
# asserts an exact unit sum after dropping the flips at a border).
ACTIONS = ["normal", "horizontal", "vertical", "skip"]
ACTION_PROB = [0.375, 0.25, 0.25, 0.125]
PARAMS = dict(action_candidate=ACTIONS, action_prob=ACTION_PROB, scale=[0.8, 1.2], dx=15, dy=15,
              theta=[-10, 10], color_prob=0.5, heatmap_flag=False)
IMAGE_W, IMAGE_H = 400, 300
# Group boxes (x0, y0, x1, y1) in an IMAGE_W x IMAGE_H image: free, and at borders.
BOXES = {
    "free": (100, 80, 250, 170),
    "left": (3, 80, 153, 170),
    "right_down": (250, 200, 395, 298),
    "left_right": (0, 100, 400, 190),
    "up": (100, 5, 250, 95),
}
SIDE_KEYS = {"left": "restrict_left", "right": "restrict_right", "up": "restrict_up", "down": "restrict_down"}


def reference_config(**overrides):
    params = {**PARAMS, **overrides}
    return instaboostfast.InstaBoostConfig(
        action_candidate=tuple(params["action_candidate"]), action_prob=tuple(params["action_prob"]),
        scale=tuple(params["scale"]), dx=params["dx"], dy=params["dy"], theta=tuple(params["theta"]),
        color_prob=params["color_prob"], heatmap_flag=params["heatmap_flag"])


def reference_draws(box, n, seed=0, **overrides):
    """n draws of (action, s, tx, ty, theta_deg) from the reference for a group box."""
    config = reference_config(**overrides)
    restricts = ref_sampling.get_restriction(list(box), IMAGE_W, IMAGE_H)
    random.seed(seed)
    np.random.seed(seed)
    dummy = np.zeros((2, 2, 4), np.uint8)
    draws = []
    for _ in range(n):
        before = random.getstate()
        _, t = ref_sampling.get_transform(dummy, restricts, config)
        # 'skip' returns the identity without touching `random`; the others draw s, tx, ty, theta.
        action = "skip" if random.getstate() == before else t.get("flip", "normal")
        draws.append((action, float(t["s"]), float(t["tx"]), float(t["ty"]), round(float(np.degrees(t["theta"])), 6)))
    return draws


def project_draws(box, n, seed=0, **overrides):
    engine = ProjectInstaBoostEngine(**{**PARAMS, **overrides})
    sides = _border_sides(box, IMAGE_W, IMAGE_H)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n):
        action = engine.sample_action(sides, rng)
        if action == "skip":
            draws.append(("skip", 1.0, 0.0, 0.0, 0.0))
            continue
        s, tx, ty, theta = engine.sample_jitter((box[2] - box[0], box[3] - box[1]), sides, rng)
        draws.append((action, s, tx, ty, theta))
    return draws


def same_discrete_distribution(a, b) -> float:
    """p-value of a chi-square test that two samples of discrete values share a distribution."""
    values = sorted(set(a) | set(b))
    if len(values) == 1:
        return 1.0
    table = np.array([[a.count(v) for v in values], [b.count(v) for v in values]])
    return stats.chi2_contingency(table)[1]


# --------------------------------------------------------------------------- border rules
def test_border_sides_match_reference_restrictions():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        x0, x1 = sorted(rng.integers(0, IMAGE_W + 1, 2))
        y0, y1 = sorted(rng.integers(0, IMAGE_H + 1, 2))
        box = (int(x0), int(y0), int(x1) + 1, int(y1) + 1)
        restricts = ref_sampling.get_restriction(list(box), IMAGE_W, IMAGE_H)
        expected = {side for side, key in SIDE_KEYS.items() if restricts.get(key) == 1}
        assert set(_border_sides(box, IMAGE_W, IMAGE_H)) == expected
        assert (restricts.get("noflip") == 1) == bool(expected)
    assert _border_sides((BORDER_MARGIN_PX, 50, 60, 90), IMAGE_W, IMAGE_H) == ()
    assert _border_sides((BORDER_MARGIN_PX - 1, 50, 60, 90), IMAGE_W, IMAGE_H) == ("left",)


@pytest.mark.parametrize("box_name", sorted(BOXES))
def test_jitter_distribution_matches_reference(box_name):
    box = BOXES[box_name]
    ours = project_draws(box, DRAWS)
    ref = reference_draws(box, DRAWS)
    assert same_discrete_distribution([d[0] for d in ours], [d[0] for d in ref]) > P_LEVEL
    moved_ours = [d for d in ours if d[0] != "skip"]
    moved_ref = [d for d in ref if d[0] != "skip"]
    for column in (2, 3, 4):  # tx, ty, theta: integer-valued, same support and frequencies
        a = [d[column] for d in moved_ours]
        b = [d[column] for d in moved_ref]
        assert set(a) == set(b)
        assert same_discrete_distribution(a, b) > P_LEVEL
    scale_ours = np.array([d[1] for d in moved_ours])
    scale_ref = np.array([d[1] for d in moved_ref])
    assert stats.ks_2samp(scale_ours, scale_ref).pvalue > P_LEVEL
    assert scale_ours.min() >= 0.8 and scale_ours.max() <= 1.2


@pytest.mark.parametrize("box_name", sorted(BOXES))
def test_border_rules_hold_like_the_reference(box_name):
    """At a border: never flipped, rotated or shrunk; shifted only towards that border."""
    box = BOXES[box_name]
    sides = _border_sides(box, IMAGE_W, IMAGE_H)
    for draws in (project_draws(box, DRAWS, seed=1), reference_draws(box, DRAWS, seed=1)):
        actions = [d[0] for d in draws]
        if not sides:
            assert {"horizontal", "vertical"} <= set(actions)
            continue
        assert not {"horizontal", "vertical"} & set(actions)
        moved = [d for d in draws if d[0] != "skip"]
        assert all(d[1] >= 1.0 and d[4] == 0.0 for d in moved)
        assert all(d[2] <= 0 for d in moved) if "left" in sides else True
        assert all(d[2] >= 0 for d in moved) if "right" in sides else True
        assert all(d[3] <= 0 for d in moved) if "up" in sides else True
        assert all(d[3] >= 0 for d in moved) if "down" in sides else True


def test_only_flip_actions_at_a_border_fall_back_to_normal():
    engine = ProjectInstaBoostEngine(**{**PARAMS, "action_candidate": ["horizontal"], "action_prob": [1.0]})
    rng = np.random.default_rng(0)
    assert {engine.sample_action(("left",), rng) for _ in range(50)} == {"normal"}
    assert {engine.sample_action((), rng) for _ in range(50)} == {"horizontal"}


def test_engine_level_border_rules_and_action_frequencies():
    """Whole-engine draws on a 64x64 scene: one free object, one at the left border."""
    image = np.full((64, 64, 3), 90, np.uint8)
    masks = np.zeros((2, 64, 64), np.uint8)
    masks[0, 20:36, 24:44] = 1
    masks[1, 30:46, 0:12] = 1
    engine = ProjectInstaBoostEngine(**{**PARAMS, "scale": [0.5, 1.5], "theta": [-20, 20], "color_prob": 0.0})
    free_actions = []
    for seed in range(400):
        result = engine.apply(image, masks, np.array([1, 2], np.int32), np.random.default_rng(seed))
        free, border = sorted(result.groups, key=lambda g: g.indices)
        free_actions.append(free.action)
        assert border.border_sides == ("left",)
        assert border.action in ("normal", "skip")
        assert border.scale >= 1.0 and border.theta_deg == 0.0 and border.shift[0] <= 0
    counts = np.array([free_actions.count(a) for a in ACTIONS])
    expected = np.array(ACTION_PROB) * len(free_actions)
    assert stats.chisquare(counts, expected).pvalue > P_LEVEL


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("flip", [None, "horizontal", "vertical"])
def test_geometry_matches_reference_transform(flip):
    """Our forward matrix moves a mask where the reference's ndimage transform does."""
    reference_transform = getattr(ref_affine, "__transform_img")
    height, width = 120, 160
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(mask, (70, 60), (30, 14), 35, 0, 360, 1, -1)
    mask[40:50, 60:100] = 1
    x, y, w, h = cv2.boundingRect(mask)
    box = (x, y, x + w, y + h)
    rng = np.random.default_rng(0)
    for _ in range(8):
        s, theta = float(rng.uniform(0.7, 1.3)), float(rng.integers(-30, 31))
        tx, ty = float(rng.integers(-10, 11)), float(rng.integers(-10, 11))
        crop = mask[box[1]:box[3], box[0]:box[2]]
        if flip == "horizontal":
            crop = crop[:, ::-1]
        elif flip == "vertical":
            crop = crop[::-1, :]
        params = {"s": s, "theta": np.radians(theta), "tx": tx + (box[0] + box[2]) / 2,
                  "ty": ty + (box[1] + box[3]) / 2}
        expected = reference_transform(np.ascontiguousarray(crop), params, (height, width), order=0) > 0
        ours = np.zeros((height, width), np.uint8)
        warp_mask(mask[box[1]:box[3], box[0]:box[2]], box, forward_matrix(box, flip, s, theta, tx, ty), ours)
        ours = ours > 0
        assert np.count_nonzero(ours & expected) / np.count_nonzero(ours | expected) > 0.95


# --------------------------------------------------------------------------- heatmap
def heatmap_scene():
    """160x120 image of coloured vertical bands with one object: the heat varies across bands."""
    height, width = 120, 160
    band = (np.arange(width) // 20) % 4
    palette = np.array([[40, 120, 200], [200, 60, 60], [60, 200, 90], [230, 230, 230]], np.uint8)
    image = np.ascontiguousarray(np.broadcast_to(palette[band][None], (height, width, 3)))
    image = np.clip(image.astype(int) + np.random.default_rng(0).integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    cv2.circle(mask, (50, 60), 14, 1, -1)
    image[mask > 0] = (10, 10, 10)
    return image, mask


def reference_heat(image, background_grid, mask):
    """The reference's per-position loop (pointByHeatmap._get_paste_pos steps 1-3)."""
    grid = (image.shape[1] // SHRINK, image.shape[0] // SHRINK)
    small_image = cv2.resize(image, grid)
    trimap = ref_heatmap._get_trimap(mask.astype(np.int32) * 255)
    small_trimap = cv2.resize(trimap.astype(np.uint8), grid)
    x, y, w, h = cv2.boundingRect(mask)
    centre = [int((y + y + h) / 2 / SHRINK), int((x + x + w) / 2 / SHRINK)]
    rings_coords = ref_help.getTrimap(small_trimap)
    rings = ref_help.getRings(small_image, rings_coords)
    heat = np.zeros((grid[1], grid[0]), np.float32)
    for i in range(grid[1]):
        for j in range(grid[0]):
            heat[i, j] = ref_heatmap.getHeatpoint(rings_coords, rings, background_grid, centre, [i, j])
    return small_trimap, heat


def test_heatmap_matches_reference_loop():
    image, mask = heatmap_scene()
    guide = HeatmapGuide(image, mask)
    # Same background for both, built the reference's way (full-res inpaint, then shrunk).
    dilated = cv2.dilate(mask.astype(np.float64) * 255, np.ones((5, 5), np.uint8), iterations=2)
    background = cv2.inpaint(image, np.uint8(dilated), 5, cv2.INPAINT_NS)
    grid_background = cv2.resize(background, (guide.grid_w, guide.grid_h))
    guide.grid_background = grid_background.astype(np.float32)
    x, y, w, h = cv2.boundingRect(mask)
    box = (x, y, x + w, y + h)
    ref_trimap, ref_heat = reference_heat(image, grid_background, mask)
    assert np.array_equal(guide._grid_trimap(box, mask[y:y + h, x:x + w]), ref_trimap)
    ours = guide.heat(box, mask[y:y + h, x:x + w])
    assert np.array_equal(ours < 0, ref_heat < 0)
    assert np.allclose(ours, ref_heat, rtol=1e-4, atol=1e-4)
    assert np.ptp(ref_heat[ref_heat >= 0]) > 1.0  # the scene makes the heat informative

    # Sampled centres fall where the reference's normalised, upsampled score is > 150.
    score = cv2.resize(ref_help.normalize(ref_heat.copy()), image.shape[1::-1])
    rng = np.random.default_rng(0)
    centres = [guide.sample_centre(box, mask[y:y + h, x:x + w], rng) for _ in range(200)]
    assert all(c is not None and score[int(c[1]), int(c[0])] > 150 for c in centres)
    high = np.mean([score[int(c[1]), int(c[0])] > 200 for c in centres])
    assert high >= 0.5  # > 200 is used with probability 0.6, > 150 otherwise


def test_engine_pastes_guided_groups_where_the_heatmap_scores_high():
    """In the engine, a guided group's box centre goes to the guide's draw: a position the
    reference's normalised score puts above 150."""
    image, mask = heatmap_scene()
    x, y, w, h = cv2.boundingRect(mask)
    box = (x, y, x + w, y + h)
    heat = HeatmapGuide(image, mask).heat(box, mask[y:y + h, x:x + w])
    score = cv2.resize(ref_help.normalize(heat.copy()), image.shape[1::-1])
    engine = ProjectInstaBoostEngine(**{**PARAMS, "action_candidate": ["normal"],
                                        "action_prob": [1.0], "scale": [1, 1], "theta": [0, 0],
                                        "color_prob": 0.0, "heatmap_flag": True})
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, 1.0])
    for seed in range(20):
        (group,) = engine.apply(image, mask[None], np.array([1], np.int32),
                                np.random.default_rng(seed)).groups
        assert group.heatmap_guided
        pasted_x, pasted_y = group.matrix @ centre
        assert score[int(pasted_y), int(pasted_x)] > 150, (seed, pasted_x, pasted_y)
