"""Max-IoU assigner and random sampler (instaboost/models/assigner.py, sampler.py)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, ops

from instaboost.models.assigner import MaxIoUAssigner, assign_gt_candidates_to_themselves
from instaboost.models.sampler import RandomSampler
from instaboost.structures.boxes import np_pairwise_iou

ms.set_device("CPU")
ms.runtime.launch_blocking()  # synchronous PyNative is several times faster on a busy 2-core CPU

RPN_RULES = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)


@pytest.fixture(params=["mindspore", "kernel"])
def impl(request):
    """Every assigner rule holds for both implementations (MindSpore operations, C++ kernel)."""
    return request.param


def np_iof(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=-1)
    area = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
    return inter / np.maximum(area[:, None], 1e-6)


def reference_assign(boxes, cand_valid, gt_boxes, gt_valid, gt_crowd, *, pos_iou_thr, neg_iou_thr,
                     min_pos_iou, match_low_quality, ignore_iof_thr):
    """Sequential mmdetection-style assignment of one image (plain loops, for comparison)."""
    targets = [g for g in range(len(gt_boxes)) if gt_valid[g] and not gt_crowd[g]]
    result = np.full(len(boxes), -1, np.int32)
    if not targets:
        result[:] = 0
    else:
        iou = np_pairwise_iou(boxes, gt_boxes[targets])
        iou[~cand_valid] = -1.0
        best = iou.max(axis=1)
        arg = iou.argmax(axis=1)
        result[(best >= 0) & (best < neg_iou_thr)] = 0
        pos = best >= pos_iou_thr
        result[pos] = np.asarray(targets)[arg[pos]] + 1
        if match_low_quality:
            for j, g in enumerate(targets):
                gt_best = iou[:, j].max()
                if gt_best >= min_pos_iou:
                    result[np.abs(iou[:, j] - gt_best) < 1e-6] = g + 1
    crowds = [g for g in range(len(gt_boxes)) if gt_valid[g] and gt_crowd[g]]
    if ignore_iof_thr > 0 and crowds:
        inside = (np_iof(boxes, gt_boxes[crowds]) > ignore_iof_thr).any(axis=1)
        result[inside & (result <= 0)] = -1
    result[~cand_valid] = -1
    return result


def assign_one(assigner, boxes, gt_boxes, gt_valid=None, gt_crowd=None, cand_valid=None):
    n, g = len(boxes), len(gt_boxes)
    gt_valid = np.ones(g, bool) if gt_valid is None else np.asarray(gt_valid)
    gt_crowd = np.zeros(g, bool) if gt_crowd is None else np.asarray(gt_crowd)
    cand_valid = np.ones(n, bool) if cand_valid is None else np.asarray(cand_valid)
    out = assigner.assign(Tensor(np.asarray(boxes, np.float32)[None]), Tensor(cand_valid[None]),
                          Tensor(np.asarray(gt_boxes, np.float32).reshape(1, g, 4)),
                          Tensor(gt_valid[None]), Tensor(gt_crowd[None]))
    return out.gt_inds.asnumpy()[0]


def test_docstring_example_positive_ignore_negative_and_low_quality(impl):
    assigner = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.3, impl=impl)
    gt = [[0.0, 0, 10, 10]]
    # IoUs with the GT: 0.6, 0.45, 0.2 (boxes sharing the GT's top-left corner, area 100 / IoU)
    boxes = [[0, 0, 10, 6], [0, 0, 10, 4.5], [0, 0, 10, 2]]
    np.testing.assert_array_equal(assign_one(assigner, boxes, gt), [1, -1, 0])
    # best IoU 0.35 < pos_iou_thr: low-quality matching still gives the GT its best candidate
    boxes = [[0, 0, 10, 3.5], [0, 0, 10, 1], [0, 0, 10, 2]]
    np.testing.assert_array_equal(assign_one(assigner, boxes, gt), [1, 0, 0])
    strict = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.3,
                            match_low_quality=False, impl=impl)
    np.testing.assert_array_equal(assign_one(strict, boxes, gt), [0, 0, 0])


def test_thresholds_at_their_exact_values_as_mmdetection(impl):
    """IoU == pos_iou_thr is positive (>=), IoU == neg_iou_thr is not negative (<: ignored), and
    a GT whose best IoU equals min_pos_iou still gets its low-quality match (>=). Boxes with
    integer corners hit these values exactly."""
    gt = [[0.0, 0, 10, 10]]
    boxes = [[0, 0, 10, 5], [0, 0, 10, 3], [0, 0, 10, 2]]   # IoU 0.5, 0.3, 0.2
    strict = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.3, min_pos_iou=0.3,
                            match_low_quality=False, impl=impl)
    np.testing.assert_array_equal(assign_one(strict, boxes, gt), [1, -1, 0])
    low_quality = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.2, min_pos_iou=0.3, impl=impl)
    np.testing.assert_array_equal(assign_one(low_quality, [[0, 0, 10, 3], [20, 20, 30, 30]], gt),
                                  [1, 0])


def test_gt_candidates_are_their_own_gts_positives_even_when_duplicated(impl):
    # add_gt_as_proposals: candidates [gt0, gt1, gt2 (crowd), proposal] with gt0 == gt1. By IoU
    # alone both duplicates go to gt1; each must be its own GT's positive (mmdetection's add_gt_).
    assigner = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, impl=impl)
    gt = np.array([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    boxes = np.concatenate([gt, [[0, 0, 10, 9]]]).astype(np.float32)
    crowd = np.array([False, False, True])
    result = assigner.assign(Tensor(boxes[None]), Tensor(np.ones((1, 4), bool)), Tensor(gt[None]),
                             Tensor(np.ones((1, 3), bool)), Tensor(crowd[None]))
    np.testing.assert_array_equal(result.gt_inds.asnumpy()[0, :2], [2, 2])
    target = Tensor(np.logical_not(crowd)[None])
    fixed = assign_gt_candidates_to_themselves(result, target)
    np.testing.assert_array_equal(fixed.gt_inds.asnumpy()[0],
                                  [1, 2, result.gt_inds.asnumpy()[0, 2], result.gt_inds.asnumpy()[0, 3]])
    np.testing.assert_array_equal(fixed.max_iou.asnumpy()[0, :2], [1.0, 1.0])


def test_zero_gts_and_all_padding_make_every_valid_candidate_negative(impl):
    assigner = MaxIoUAssigner(**RPN_RULES, impl=impl)
    boxes = [[0.0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 1, 1]]
    padding = np.zeros((3, 4), np.float32)
    np.testing.assert_array_equal(
        assign_one(assigner, boxes, padding, gt_valid=[False] * 3, cand_valid=[True, True, False]),
        [0, 0, -1])
    empty = assigner.assign(Tensor(np.asarray(boxes, np.float32)[None]), Tensor([[True] * 3]),
                            Tensor(np.zeros((1, 0, 4), np.float32)),
                            Tensor(np.zeros((1, 0), bool)), Tensor(np.zeros((1, 0), bool)))
    np.testing.assert_array_equal(empty.gt_inds.asnumpy(), [[0, 0, 0]])


def test_crowd_regions_are_ignored_and_never_matched(impl):
    assigner = MaxIoUAssigner(**RPN_RULES, ignore_iof_thr=0.5, impl=impl)
    gt = [[0.0, 0, 10, 10], [50, 50, 100, 100]]
    crowd = [False, True]
    boxes = [[50.0, 50, 100, 100],   # identical to the crowd box: never positive -> ignored
             [60, 60, 70, 70],       # inside the crowd region -> ignored
             [0, 0, 10, 10],         # matches the real GT -> positive
             [200, 200, 220, 220]]   # far away -> negative
    np.testing.assert_array_equal(assign_one(assigner, boxes, gt, gt_crowd=crowd), [-1, -1, 1, 0])
    # a positive inside a crowd region stays positive
    gt = [[60.0, 60, 70, 70], [50, 50, 100, 100]]
    np.testing.assert_array_equal(assign_one(assigner, [[60.0, 60, 70, 70]], gt, gt_crowd=crowd),
                                  [1])
    no_ignore = MaxIoUAssigner(**RPN_RULES, impl=impl)
    np.testing.assert_array_equal(
        assign_one(no_ignore, [[60.0, 60, 70, 70]], [[50.0, 50, 100, 100]], gt_crowd=[True]), [0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assigner_matches_sequential_reference(seed, impl):
    rng = np.random.default_rng(seed)
    num_boxes, num_gts = 60, 6
    xy = rng.uniform(0, 80, (num_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(4, 40, (num_boxes, 2))], 1).astype(np.float32)
    gt_xy = rng.uniform(0, 80, (num_gts, 2))
    gts = np.concatenate([gt_xy, gt_xy + rng.uniform(8, 40, (num_gts, 2))], 1).astype(np.float32)
    boxes[:num_gts] = gts + rng.normal(0, 1.5, gts.shape).astype(np.float32)  # some near-matches
    gt_valid = np.array([True, True, True, True, True, False])
    gt_crowd = np.array([False, False, False, False, True, False])
    cand_valid = rng.uniform(size=num_boxes) > 0.1
    rules = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.3, match_low_quality=True,
                 ignore_iof_thr=0.5)
    got = assign_one(MaxIoUAssigner(**rules, impl=impl), boxes, gts, gt_valid, gt_crowd, cand_valid)
    want = reference_assign(boxes, cand_valid, gts, gt_valid, gt_crowd, **rules)
    np.testing.assert_array_equal(got, want)
    assert (got > 0).any() and (got == 0).any()


@pytest.mark.parametrize("rules", [
    dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True,
         ignore_iof_thr=0.5),
    dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True),
    dict(pos_iou_thr=0.6, neg_iou_thr=0.2, min_pos_iou=0.0, match_low_quality=False,
         ignore_iof_thr=0.3),
], ids=["rpn-crowd", "rcnn", "no-low-quality"])
def test_kernel_assigner_equals_mindspore_assigner_bit_for_bit(rules):
    """Batched anchors on a grid (exact IoU ties between a GT's best anchors), duplicated and
    zero-area GTs, padding and crowd slots, invalid candidates, and an image without targets: the
    C++ kernel gives the same labels and the same max IoUs, bit for bit."""
    rng = np.random.default_rng(7)
    batch, num_gts = 3, 12
    grid = np.arange(0, 192, 8, dtype=np.float32)
    xs, ys = np.meshgrid(grid, grid)
    sizes = np.array([16, 32, 64], np.float32)
    anchors = np.concatenate([np.stack([xs.ravel(), ys.ravel(), xs.ravel() + s, ys.ravel() + s], 1)
                              for s in sizes]).astype(np.float32)
    boxes = np.repeat(anchors[None], batch, 0)
    boxes[1] += rng.normal(0, 2, boxes[1].shape).astype(np.float32)   # off-grid candidates
    xy = rng.uniform(0, 160, (batch, num_gts, 2))
    gts = np.concatenate([xy, xy + rng.uniform(2, 80, (batch, num_gts, 2))], 2).astype(np.float32)
    gts[:, 1] = gts[:, 0]                      # a duplicated GT
    gts[:, 2, 2:] = gts[:, 2, :2]              # a zero-area GT
    gt_valid = rng.uniform(size=(batch, num_gts)) > 0.2
    gt_valid[:, :3] = True
    gt_valid[2] = False                        # the last image has no GT at all
    gt_crowd = rng.uniform(size=(batch, num_gts)) > 0.75
    gt_crowd[:, :3] = False
    cand_valid = rng.uniform(size=boxes.shape[:2]) > 0.05
    inputs = [Tensor(a) for a in (boxes, cand_valid, gts, gt_valid, gt_crowd)]
    want = MaxIoUAssigner(**rules, impl="mindspore").assign(*inputs)
    got = MaxIoUAssigner(**rules, impl="kernel").assign(*inputs)
    assert got.gt_inds.dtype == ms.int32 and got.max_iou.dtype == ms.float32
    np.testing.assert_array_equal(got.gt_inds.asnumpy(), want.gt_inds.asnumpy())
    np.testing.assert_array_equal(got.max_iou.asnumpy(), want.max_iou.asnumpy())
    labels = want.gt_inds.asnumpy()
    assert (labels[:2] > 0).sum() > 20 and (labels == 0).any() and (labels == -1).any()
    assert (labels[2] <= 0).all()


def test_kernel_assigner_reads_broadcast_anchors_as_the_rpn_passes_them():
    """The RPN hands the assigner one anchor set broadcast over the batch (a view, not a copy):
    the kernel must see every image's candidates, as the MindSpore implementation does."""
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 100, (500, 2))
    anchors = Tensor(np.concatenate([xy, xy + rng.uniform(8, 60, (500, 2))], 1).astype(np.float32))
    batch = 3
    boxes = ops.broadcast_to(anchors.reshape(1, 500, 4), (batch, 500, 4))
    gt_xy = rng.uniform(0, 100, (batch, 5, 2))
    gts = Tensor(np.concatenate([gt_xy, gt_xy + rng.uniform(10, 50, (batch, 5, 2))], 2).astype(np.float32))
    valid = Tensor(np.ones((batch, 500), bool))
    gt_valid, gt_crowd = Tensor(np.ones((batch, 5), bool)), Tensor(np.zeros((batch, 5), bool))
    want = MaxIoUAssigner(**RPN_RULES, impl="mindspore").assign(boxes, valid, gts, gt_valid, gt_crowd)
    got = MaxIoUAssigner(**RPN_RULES, impl="kernel").assign(boxes, valid, gts, gt_valid, gt_crowd)
    np.testing.assert_array_equal(got.gt_inds.asnumpy(), want.gt_inds.asnumpy())
    np.testing.assert_array_equal(got.max_iou.asnumpy(), want.max_iou.asnumpy())
    assert all((want.gt_inds.asnumpy()[b] > 0).any() for b in range(batch))


def test_assigner_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="assigner impl"):
        MaxIoUAssigner(**RPN_RULES, impl="cuda")


def draw_gt_inds(rng, batch, num, pos_prob, neg_prob):
    u = rng.uniform(size=(batch, num))
    gt_inds = np.where(u < pos_prob, rng.integers(1, 5, (batch, num)),
                       np.where(u < pos_prob + neg_prob, 0, -1))
    return gt_inds.astype(np.int32)


@pytest.mark.parametrize("pos_prob", [0.0, 0.05, 0.6])
def test_sampler_respects_positive_fraction_and_total(pos_prob):
    rng = np.random.default_rng(7)
    gt_inds = draw_gt_inds(rng, 3, 300, pos_prob, 0.3)
    sampler = RandomSampler(num=64, pos_fraction=0.25, seed=3)
    out = sampler.sample(Tensor(gt_inds))
    inds, valid, pos = (x.asnumpy() for x in out)
    assert inds.shape == valid.shape == pos.shape == (3, 64)
    for b in range(3):
        chosen = inds[b][valid[b]]
        assert len(set(chosen.tolist())) == len(chosen)  # no duplicates
        num_pos = pos[b].sum()
        assert num_pos <= 16
        assert num_pos == min(16, (gt_inds[b] > 0).sum())
        assert np.all(gt_inds[b][inds[b][pos[b]]] > 0)
        neg_slots = valid[b] & ~pos[b]
        assert np.all(gt_inds[b][inds[b][neg_slots]] == 0)
        # negatives fill the remainder when available; valid slots come first, positives first
        assert valid[b].sum() == min(64, num_pos + (gt_inds[b] == 0).sum())
        assert np.all(np.diff(valid[b].astype(int)) <= 0)
        assert np.all(np.diff(pos[b].astype(int)) <= 0)


def test_sampler_small_candidate_sets_and_determinism():
    gt_inds = Tensor(np.array([[1, 0, -1, 0, 2]], np.int32))
    a = RandomSampler(num=8, pos_fraction=0.5, seed=11).sample(gt_inds)
    b = RandomSampler(num=8, pos_fraction=0.5, seed=11).sample(gt_inds)
    assert a.inds.shape == (1, 5)  # R = min(num, N)
    np.testing.assert_array_equal(a.inds.asnumpy(), b.inds.asnumpy())
    assert a.valid.asnumpy().sum() == 4 and a.positive.asnumpy().sum() == 2
    assert 2 not in a.inds.asnumpy()[a.valid.asnumpy()]


def test_sampler_draws_differ_between_calls():
    sampler = RandomSampler(num=16, pos_fraction=0.5, seed=5)
    gt_inds = Tensor(np.zeros((1, 400), np.int32))
    first = sampler.sample(gt_inds).inds.asnumpy()
    second = sampler.sample(gt_inds).inds.asnumpy()
    assert not np.array_equal(first, second)


def test_sampler_with_zero_positive_fraction_takes_only_negatives():
    gt_inds = Tensor(np.array([[1, 0, 2, 0, 0, -1]], np.int32))
    out = RandomSampler(num=4, pos_fraction=0.0, seed=2).sample(gt_inds)
    assert not out.positive.asnumpy().any()
    assert out.valid.asnumpy().sum() == 3
    assert set(out.inds.asnumpy()[out.valid.asnumpy()].tolist()) == {1, 3, 4}
