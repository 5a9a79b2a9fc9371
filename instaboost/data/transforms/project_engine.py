"""The project's InstaBoost engine: the method of instaboostfast 0.1.2, fast and robust.

Per image (``ProjectInstaBoostEngine.apply``):

1. Instances with an empty mask are dropped; none left -> the image passes through unchanged.
2. Groups: instances whose tight boxes overlap (transitively) move together; groups are
   ordered by their lowest instance index (the reference's order of pasting).
3. Background: the union of all masks is inpainted (``inpaint.inpaint_background``).
4. Per group, in order: draw an action from ``action_candidate`` / ``action_prob``
   (``skip`` = untouched), then a similarity jitter: scale ``U[scale_min, scale_max]``, an integer
   shift uniform in ``[-floor(box_w / dx), floor(box_w / dx)]`` (``dy`` likewise), an angle in
   ``[theta_min, theta_max]`` degrees (integer degrees when both bounds are integers, as the
   reference's ``random.randint``), about the group box centre.
   Border rule (reference ``get_restriction``): a group box closer than ``BORDER_MARGIN_PX`` to a
   side never flips (flip actions are removed and the rest renormalised; nothing left ->
   ``normal``), is not rotated, not shrunk (``s = max(s, 1)``) and shifts only *towards* that
   side (e.g. left side: ``tx <= 0``), so the cut edge of a truncated object stays outside the
   image.  Heatmap mode: the group centre goes to a position drawn from the appearance
   heatmap (``heatmap.HeatmapGuide``) instead of the random shift -- for groups that are
   neither skipped nor at a border (the reference also moves those; that reveals the cut
   edges of truncated objects and moves "skipped" groups).
5. Paste: the group's pixels (premultiplied by its mask) and mask are warped on the group's
   destination region only (``cv2.warpAffine``, bilinear) and alpha-composited; every member
   mask is warped bilinearly and thresholded at one half.
6. Instances whose new area is below ``min(MIN_INSTANCE_AREA_PX, original area)`` (pushed out,
   shrunk to nothing) are dropped.  Masks are not cut by groups pasted later (as the reference).
7. With probability ``color_prob`` the whole image is colour-jittered (``color_jitter``).

Output instances keep the input order (the reference orders them by group).  All randomness
comes from the ``np.random.Generator`` passed per call: the same generator state gives the
same output.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from instaboost.data.transforms.color_jitter import ColorFactors, apply_color_jitter, sample_color_factors
from instaboost.data.transforms.heatmap import HeatmapGuide
from instaboost.data.transforms.inpaint import inpaint_background
from instaboost.data.transforms.paste import IDENTITY_2X3, Box, forward_matrix, paste_unchanged, paste_warped

ACTIONS = ("normal", "horizontal", "vertical", "skip")
FLIP_ACTIONS = ("horizontal", "vertical")
PROB_SUM_TOLERANCE = 1e-6
BORDER_MARGIN_PX = 10
MIN_INSTANCE_AREA_PX = 4
SIDES = ("left", "right", "up", "down")


@dataclass(frozen=True)
class GroupTransform:
    """What happened to one group of overlapping instances.

    ``matrix`` (float64 (2, 3)) maps source image pixel coordinates (x, y) to destination
    pixel coordinates, flip included; identity for ``skip``.  ``shift`` is the move of the
    group box centre in pixels (heatmap-guided or random); ``border_sides`` the sides the
    group touched (within ``BORDER_MARGIN_PX``).
    """

    indices: tuple[int, ...]
    box: Box
    action: str
    scale: float
    theta_deg: float
    shift: tuple[float, float]
    border_sides: tuple[str, ...]
    heatmap_guided: bool
    matrix: np.ndarray


@dataclass
class _GroupPlan:
    """Mutable per-group state while an image is processed (identity until jittered)."""

    members: np.ndarray
    box: Box
    alpha: np.ndarray          # uint8 (h, w) 0/1: union of the members' masks in ``box``
    sides: tuple[str, ...]
    action: str
    scale: float = 1.0
    tx: float = 0.0
    ty: float = 0.0
    theta: float = 0.0
    guided: bool = False


@dataclass(frozen=True)
class InstaBoostResult:
    """Output of ``ProjectInstaBoostEngine.apply``.

    image uint8 (H, W, C); masks uint8 (M, H, W) binary; labels int32 (M,); kept int64 (M,):
    input index of each output instance; groups: per group transforms in paste order;
    color: the colour-jitter factors, or None when not applied.
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    kept: np.ndarray
    groups: tuple[GroupTransform, ...]
    color: ColorFactors | None


def _pair(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        items = [] if isinstance(value, (str, bytes)) else list(value)
    except TypeError as exc:
        raise ValueError(f"{name} must be [min, max], got {value!r}") from exc
    if len(items) != 2:
        raise ValueError(f"{name} must be [min, max], got {value!r}")
    low, high = (float(v) for v in items)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low > high:
        raise ValueError(f"{name}: min {low} > max {high}")
    return low, high


def _positive(name: str, value: float) -> float:
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _number_repr(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


class ProjectInstaBoostEngine:
    """InstaBoost engine (CONTRACTS.md "InstaBoost engine contract").

    Args (seed names): action_candidate: actions from normal|horizontal|vertical|skip;
    action_prob: their probabilities (sum 1 within 1e-6); scale: [min, max] scale factor;
    dx, dy: max shift = box width / dx, box height / dy; theta: [min, max] degrees;
    color_prob: probability of colour jitter; heatmap_flag: heatmap-guided positions.
    """

    def __init__(self, *, action_candidate: Sequence[str], action_prob: Sequence[float],
                 scale: Sequence[float], dx: float, dy: float, theta: Sequence[float],
                 color_prob: float, heatmap_flag: bool) -> None:
        if isinstance(action_candidate, (str, bytes)):
            raise ValueError(f"action_candidate must be a list of action names, got {action_candidate!r}")
        actions = tuple(str(a) for a in action_candidate)
        if not actions:
            raise ValueError("action_candidate is empty")
        unknown = [a for a in actions if a not in ACTIONS]
        if unknown:
            raise ValueError(f"unknown action(s) {unknown}; choose from {list(ACTIONS)}")
        if len(set(actions)) != len(actions):
            raise ValueError(f"duplicate actions in action_candidate {list(actions)}")
        probs = np.asarray([float(p) for p in action_prob], dtype=np.float64)
        if probs.shape != (len(actions),):
            raise ValueError(f"action_prob has {probs.size} entries for {len(actions)} actions")
        if not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise ValueError(f"action_prob must be finite and >= 0, got {list(probs)}")
        if abs(probs.sum() - 1.0) > PROB_SUM_TOLERANCE:
            raise ValueError(f"action_prob must sum to 1 (within {PROB_SUM_TOLERANCE}), sums to {probs.sum()}")
        scale_pair = _pair("scale", scale)
        if scale_pair[0] <= 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        color = float(color_prob)
        if not 0.0 <= color <= 1.0:
            raise ValueError(f"color_prob must be in [0, 1], got {color_prob!r}")
        if not isinstance(heatmap_flag, (bool, np.bool_)):
            raise ValueError(f"heatmap_flag must be a bool, got {heatmap_flag!r}")
        self.action_candidate = actions
        self.action_prob = tuple(float(p) for p in probs / probs.sum())
        self.scale = scale_pair
        self.dx = _positive("dx", dx)
        self.dy = _positive("dy", dy)
        self.theta = _pair("theta", theta)
        self.color_prob = color
        self.heatmap_flag = bool(heatmap_flag)
        self._integer_theta = all(float(t).is_integer() for t in self.theta)

    def __repr__(self) -> str:
        pairs = {
            "action_candidate": repr(list(self.action_candidate)),
            "action_prob": repr(list(self.action_prob)),
            "scale": "[" + ", ".join(_number_repr(v) for v in self.scale) + "]",
            "dx": _number_repr(self.dx),
            "dy": _number_repr(self.dy),
            "theta": "[" + ", ".join(_number_repr(v) for v in self.theta) + "]",
            "color_prob": _number_repr(self.color_prob),
            "heatmap_flag": repr(self.heatmap_flag),
        }
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v}" for k, v in pairs.items()) + ")"

    def __call__(self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Augment one image: uint8 (H, W, C), uint8 (N, H, W), int32 (N,) -> same kinds, M <= N."""
        result = self.apply(image, masks, labels, rng)
        return result.image, result.masks, result.labels

    # ------------------------------------------------------------------ sampling
    def sample_action(self, border_sides: Sequence[str], rng: np.random.Generator) -> str:
        """Draw an action; flips are excluded for a group at a border (reference rule)."""
        actions = np.asarray(self.action_candidate)
        probs = np.asarray(self.action_prob)
        if border_sides:
            keep = ~np.isin(actions, FLIP_ACTIONS)
            actions, probs = actions[keep], probs[keep]
            if probs.sum() <= 0:
                return "normal"
            probs = probs / probs.sum()
        return str(actions[rng.choice(len(actions), p=probs)])

    def sample_jitter(self, box_size: tuple[int, int], border_sides: Sequence[str],
                      rng: np.random.Generator) -> tuple[float, float, float, float]:
        """Draw (scale, tx, ty, theta_deg) for a group of box (width, height), border rules applied."""
        width, height = box_size
        scale = float(rng.uniform(*self.scale))
        max_x = int(width // self.dx)
        max_y = int(height // self.dy)
        tx = float(rng.integers(-max_x, max_x + 1))
        ty = float(rng.integers(-max_y, max_y + 1))
        if self._integer_theta:
            theta = float(rng.integers(int(self.theta[0]), int(self.theta[1]) + 1))
        else:
            theta = float(rng.uniform(*self.theta))
        if border_sides:
            scale = max(scale, 1.0)
            theta = 0.0
        if "left" in border_sides:
            tx = min(tx, 0.0)
        if "right" in border_sides:
            tx = max(tx, 0.0)
        if "up" in border_sides:
            ty = min(ty, 0.0)
        if "down" in border_sides:
            ty = max(ty, 0.0)
        return scale, tx, ty, theta

    def _plan_group(self, members: np.ndarray, box: Box, alpha: np.ndarray, image_size: tuple[int, int],
                    rng: np.random.Generator) -> "_GroupPlan":
        sides = _border_sides(box, *image_size)
        action = self.sample_action(sides, rng)
        plan = _GroupPlan(members=members, box=box, alpha=alpha, sides=sides, action=action)
        if action != "skip":
            size = (box[2] - box[0], box[3] - box[1])
            plan.scale, plan.tx, plan.ty, plan.theta = self.sample_jitter(size, sides, rng)
        return plan

    @staticmethod
    def _guide_with_heatmap(plans: list["_GroupPlan"], image: np.ndarray, union: np.ndarray,
                            rng: np.random.Generator) -> None:
        """Replace the random shift of every moved, border-free group by a heatmap draw."""
        guide = None
        for plan in plans:
            if plan.action == "skip" or plan.sides:
                continue
            if guide is None:
                guide = HeatmapGuide(image, union)
            centre = guide.sample_centre(plan.box, plan.alpha, rng)
            if centre is not None:
                plan.tx = centre[0] - (plan.box[0] + plan.box[2]) / 2
                plan.ty = centre[1] - (plan.box[1] + plan.box[3]) / 2
                plan.guided = True

    # ------------------------------------------------------------------ main
    def apply(self, image: np.ndarray, masks: np.ndarray, labels: np.ndarray,
              rng: np.random.Generator) -> InstaBoostResult:
        """Augment one image and report what was done (see the module docstring)."""
        image, masks, labels = _check_inputs(image, masks, labels, rng)
        height, width = image.shape[:2]
        n = masks.shape[0]
        boxes = np.zeros((n, 4), dtype=np.int64)
        areas = np.zeros(n, dtype=np.int64)
        for i in range(n):
            x, y, w, h = cv2.boundingRect(masks[i])
            boxes[i] = (x, y, x + w, y + h)
            areas[i] = cv2.countNonZero(masks[i]) if w > 0 else 0
        present = np.flatnonzero(areas > 0)
        if present.size == 0:
            empty = np.zeros((0, height, width), dtype=np.uint8)
            return InstaBoostResult(image, empty if n else masks, labels[:0], present, (), None)

        groups = _group_overlapping(boxes, present)
        union = np.zeros((height, width), dtype=np.uint8)
        plans = []
        for members in groups:
            box = _union_box(boxes[members])
            x0, y0, x1, y1 = box
            alpha = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
            for i in members:
                np.bitwise_or(alpha, masks[i, y0:y1, x0:x1], out=alpha)
            union[y0:y1, x0:x1] |= alpha
            plans.append(self._plan_group(members, box, alpha, (width, height), rng))
        canvas = inpaint_background(image, union)
        if self.heatmap_flag:
            self._guide_with_heatmap(plans, image, union, rng)

        out_masks = np.zeros((n, height, width), dtype=np.uint8)
        records = []
        for plan in plans:
            if plan.action == "skip":
                matrix = IDENTITY_2X3
                paste_unchanged(canvas, image, masks, out_masks, plan.members, plan.box, plan.alpha)
            else:
                flip = plan.action if plan.action in FLIP_ACTIONS else None
                matrix = forward_matrix(plan.box, flip, plan.scale, plan.theta, plan.tx, plan.ty)
                paste_warped(canvas, image, masks, out_masks, plan.members, boxes, plan.box,
                             plan.alpha, matrix)
            records.append(GroupTransform(
                indices=tuple(int(i) for i in plan.members), box=plan.box, action=plan.action,
                scale=plan.scale, theta_deg=plan.theta, shift=(plan.tx, plan.ty),
                border_sides=plan.sides, heatmap_guided=plan.guided, matrix=matrix[:2].copy()))

        new_areas = np.count_nonzero(out_masks.reshape(n, -1), axis=1)
        keep = (new_areas > 0) & (new_areas >= np.minimum(MIN_INSTANCE_AREA_PX, areas))
        kept = np.flatnonzero(keep)
        color = None
        if rng.random() < self.color_prob:
            color = sample_color_factors(rng)
            canvas = apply_color_jitter(canvas, color)
        if kept.size < n:
            out_masks = out_masks[kept]
        return InstaBoostResult(canvas, out_masks, labels[kept], kept, tuple(records), color)


# ---------------------------------------------------------------------- helpers
def _check_inputs(image, masks, labels, rng):
    """Validate the engine inputs; returns contiguous (image, 0/1 uint8 masks, int32 labels)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    image = np.asarray(image)
    masks = np.asarray(masks)
    labels = np.asarray(labels)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (N, H, W) with (H, W) = {image.shape[:2]}, got {masks.shape}")
    if labels.shape != (masks.shape[0],):
        raise ValueError(f"labels must be ({masks.shape[0]},), got {labels.shape}")
    if masks.dtype != np.uint8 or masks.max(initial=0) > 1:
        masks = (masks != 0).astype(np.uint8)   # any nonzero value marks the instance
    return np.ascontiguousarray(image), np.ascontiguousarray(masks), labels.astype(np.int32, copy=False)


def _group_overlapping(boxes: np.ndarray, present: np.ndarray) -> list[np.ndarray]:
    """Connected components of box overlap among ``present`` indices, ordered by lowest index.

    Boxes are half-open (x0, y0, x1, y1): they overlap when they share a pixel.
    """
    b = boxes[present]
    overlap = ((b[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < b[:, None, 2])
               & (b[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < b[:, None, 3]))
    parent = list(range(len(present)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(overlap, 1))):
        root_i, root_j = find(int(i)), find(int(j))
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    components: dict[int, list[int]] = {}
    for k in range(len(present)):
        components.setdefault(find(k), []).append(int(present[k]))
    return [np.asarray(members) for members in sorted(components.values(), key=min)]


def _union_box(boxes: np.ndarray) -> Box:
    return (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max()))


def _border_sides(box: Box, width: int, height: int) -> tuple[str, ...]:
    """Sides the box is closer than BORDER_MARGIN_PX to (reference ``get_restriction``)."""
    x0, y0, x1, y1 = box
    touches = (x0 < BORDER_MARGIN_PX, x1 > width - BORDER_MARGIN_PX,
               y0 < BORDER_MARGIN_PX, y1 > height - BORDER_MARGIN_PX)
    return tuple(side for side, hit in zip(SIDES, touches) if hit)
