"""InstaBoost as one pipeline step: `InstaBoostAug(engine, aug_prob)(sample, rng) -> sample`.

InstaBoost (Fang et al., ICCV 2019, https://arxiv.org/abs/1908.07801; reference code
https://github.com/GothicAi/Instaboost) inpaints the background where instances were, jitters
each group of overlapping instances with a random similarity transform and pastes it back.

Required keys (sample contract, CONTRACTS.md):
    image   uint8 (H, W, 3) BGR
    masks   uint8 (N, H, W) binary
    labels  int32 (N,) 1..K
    iscrowd bool (N,)
    boxes   float32 (N, 4) xyxy
Modified keys: image, masks, labels, iscrowd, boxes (recomputed as tight boxes of the masks).
Added key: "instaboost_applied" (bool).

Crowd regions are never passed to the engine: they are re-appended untouched after the jittered
instances (the engine may repaint pixels under them; they stay ignore regions). Instances the
engine returns with an empty mask or a box thinner than one pixel are dropped and counted.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from instaboost.data.coco import masks_to_boxes
from instaboost.data.stats import DataStats

# engine(image uint8 (H,W,C), masks uint8 (N,H,W), labels int32 (N,), rng) -> (image, masks, labels)
Engine = Callable[[np.ndarray, np.ndarray, np.ndarray, np.random.Generator],
                  "tuple[np.ndarray, np.ndarray, np.ndarray]"]
# A kept instance's tight box must be at least this wide and high (pixels).
MIN_BOX_SIDE = 1.0


class InstaBoostAug:
    """Apply an InstaBoost engine to a sample with probability `aug_prob`.

    Args:
        engine: an InstaBoost engine (see `build_instaboost_engine`), e.g. `InstaBoostFastEngine`.
        aug_prob: probability that a sample is augmented (the seed's `aug_prob`; mmdetection's
            `aug_ratio`). The apply/skip coin is drawn from the caller's Generator.
        stats: counters for the tracker ("instaboost_applied", "instaboost_no_instances",
            "instaboost_dropped_instances"); default: a new `DataStats`.
    """

    def __init__(self, engine: Engine, aug_prob: float, *, stats: DataStats | None = None):
        if not 0.0 <= float(aug_prob) <= 1.0:
            raise ValueError(f"aug_prob must lie in [0, 1], got {aug_prob}")
        self.engine = engine
        self.aug_prob = float(aug_prob)
        self.stats = stats if stats is not None else DataStats()

    @property
    def counts(self) -> dict[str, int]:
        """Counters of this step: applied samples and dropped instances, for the tracker."""
        return {name: self.stats.get(name) for name in
                ("instaboost_applied", "instaboost_no_instances", "instaboost_dropped_instances")}

    def __call__(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = dict(sample)
        out["instaboost_applied"] = False
        # The coin is drawn for every sample so a sample's stream does not depend on its content.
        if rng.random() >= self.aug_prob:
            return out
        crowd = np.asarray(sample["iscrowd"], dtype=bool)
        targets = np.flatnonzero(~crowd)
        if targets.size == 0:
            self.stats.add("instaboost_no_instances")
            return out
        image, masks, labels = self.engine(sample["image"], sample["masks"][targets],
                                           sample["labels"][targets], rng)
        if image.shape != sample["image"].shape or image.dtype != np.uint8:
            raise ValueError(f"engine {self.engine!r} returned image {image.dtype} {image.shape}, "
                             f"expected uint8 {sample['image'].shape}")
        boxes = masks_to_boxes(masks)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (widths >= MIN_BOX_SIDE) & (heights >= MIN_BOX_SIDE)
        dropped = targets.size - int(keep.sum())
        self.stats.add("instaboost_applied")
        self.stats.add("instaboost_dropped_instances", max(dropped, 0))
        crowd_idx = np.flatnonzero(crowd)
        out.update({
            "image": image,
            "masks": np.concatenate([masks[keep].astype(np.uint8), sample["masks"][crowd_idx]]),
            "labels": np.concatenate([np.asarray(labels, dtype=np.int32)[keep],
                                      sample["labels"][crowd_idx]]).astype(np.int32),
            "boxes": np.concatenate([boxes[keep], sample["boxes"][crowd_idx]]).astype(np.float32),
            "iscrowd": np.concatenate([np.zeros(int(keep.sum()), dtype=np.bool_),
                                       crowd[crowd_idx]]),
            "instaboost_applied": True,
        })
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(engine={self.engine!r}, aug_prob={self.aug_prob})"
