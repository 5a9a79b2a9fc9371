"""Random positive/negative sampler with fixed output size.

Shape shorthand: B images, N candidates per image, R = min(num, N) sampled slots per image.

Given ``gt_inds`` from an assigner (-1 ignore, 0 negative, g + 1 positive), pick at most
``int(num * pos_fraction)`` positives uniformly at random and fill the rest of ``num`` with random
negatives (mmdetection v2 ``RandomSampler`` semantics). Randomness comes from a seeded MindSpore
``UniformReal`` op: each candidate gets a random key and a fixed-k ``top_k`` over masked keys does
the choosing, so there is no boolean indexing and every shape is static.

Outputs are compacted so that valid positives come first, then valid negatives, then unused slots
(``valid == False``; their index is an arbitrary candidate and must be masked by the caller).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.structures.boxes import index_range

# Key given to candidates that must not be chosen; random keys are in [0, 1).
EXCLUDED_KEY = -1.0


class SampleResult(NamedTuple):
    """inds int32 (B, R) candidate indices; valid bool (B, R); positive bool (B, R)."""

    inds: Tensor
    valid: Tensor
    positive: Tensor


class RandomSampler(nn.Cell):
    """Fixed-size random sampler.

    Args:
        num: total samples per image (positives + negatives).
        pos_fraction: upper bound on the positive share of ``num``.
        add_gt_as_proposals: read by the RoI head: prepend the GT boxes to the candidates.
        seed: seed of the sampler's random op (two samplers should use different seeds).
    """

    def __init__(self, *, num: int, pos_fraction: float, add_gt_as_proposals: bool = False,
                 seed: int = 0):
        super().__init__()
        if num <= 0 or not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"need num > 0 and 0 <= pos_fraction <= 1, got {num}, {pos_fraction}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.add_gt_as_proposals = bool(add_gt_as_proposals)
        self.seed = int(seed)
        # seed2 != 0 makes the op deterministic for a given seed even when seed == 0.
        self._uniform = ops.UniformReal(seed=self.seed, seed2=self.seed + 1)

    @property
    def max_positives(self) -> int:
        return int(self.num * self.pos_fraction)

    def num_samples(self, num_candidates: int) -> int:
        """R, the static number of sampled slots for N candidates."""
        return min(self.num, num_candidates)

    def construct(self, gt_inds):
        """Same as :meth:`sample`."""
        return self.sample(gt_inds)

    def sample(self, gt_inds: Tensor) -> SampleResult:
        """Sample candidates of every image. gt_inds int32 (B, N) -> SampleResult (B, R)."""
        batch, num_cand = gt_inds.shape
        # At least one positive slot keeps shapes non-empty; the rank test below disables it
        # when max_positives == 0.
        num_pos_slots = max(1, min(self.max_positives, num_cand))
        num_neg_slots = min(self.num, num_cand)
        num_out = self.num_samples(num_cand)

        keys = self._uniform((batch, num_cand))
        positive = gt_inds > 0
        negative = gt_inds == 0

        _, pos_idx = ops.topk(ops.where(positive, keys, EXCLUDED_KEY), num_pos_slots)
        pos_rank = index_range(0, num_pos_slots).reshape(1, -1)
        pos_take = ops.logical_and(ops.gather_elements(positive.astype(ms.int32), 1, pos_idx) > 0,
                                   pos_rank < self.max_positives)
        num_pos = pos_take.astype(ms.int32).sum(axis=1, keepdims=True)
        _, neg_idx = ops.topk(ops.where(negative, keys, EXCLUDED_KEY), num_neg_slots)
        neg_rank = index_range(0, num_neg_slots).reshape(1, -1)
        neg_take = ops.logical_and(ops.gather_elements(negative.astype(ms.int32), 1, neg_idx) > 0,
                                   neg_rank < (self.num - num_pos))
        all_idx = ops.concat([pos_idx, neg_idx], axis=1).astype(ms.int32)
        all_take = ops.concat([pos_take, neg_take], axis=1)
        is_pos = ops.concat([ops.ones((batch, num_pos_slots), ms.bool_),
                             ops.zeros((batch, num_neg_slots), ms.bool_)], axis=1)

        # Compact: taken slots first, in their current order (positives, then negatives).
        total = all_idx.shape[1]
        order = index_range(0, total, np.float32).reshape(1, -1)
        compact_key = ops.where(all_take, 2.0 * total - order, -order)
        _, slot = ops.topk(compact_key, num_out)
        inds = ops.gather_elements(all_idx, 1, slot)
        valid = ops.gather_elements(all_take.astype(ms.int32), 1, slot) > 0
        pos_out = ops.logical_and(ops.gather_elements(is_pos.astype(ms.int32), 1, slot) > 0, valid)
        return SampleResult(inds, valid, pos_out)

    def extend_repr(self) -> str:
        return (f"num={self.num}, pos_fraction={self.pos_fraction}, "
                f"add_gt_as_proposals={self.add_gt_as_proposals}, seed={self.seed}")
