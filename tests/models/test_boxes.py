"""Box ops, box coder and anchors (instaboost/structures/boxes.py and friends)."""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from instaboost.models.anchors import AnchorGenerator
from instaboost.models.box_coder import DEFAULT_SCALE_CLAMP, DeltaXYWHBoxCoder
from instaboost.structures.boxes import (batched_gather, box_area, clip_boxes, np_pairwise_iou,
                                         pairwise_iof, pairwise_iou)

ms.set_device("CPU")
ms.runtime.launch_blocking()  # synchronous PyNative is several times faster on a busy 2-core CPU


def random_boxes(rng: np.random.Generator, num: int, size: float = 100.0) -> np.ndarray:
    """Valid xyxy boxes (x2 >= x1, y2 >= y1) inside [0, size]."""
    xy = rng.uniform(0, size * 0.8, (num, 2))
    wh = rng.uniform(1, size * 0.5, (num, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def reference_nms(boxes: np.ndarray, threshold: float) -> np.ndarray:
    """Plain greedy NMS over boxes sorted by descending score. -> keep bool (N,)."""
    iou = np_pairwise_iou(boxes, boxes)
    keep = np.ones(len(boxes), bool)
    for i in range(len(boxes)):
        if keep[i]:
            suppressed = iou[i] > threshold
            suppressed[: i + 1] = False
            keep &= ~suppressed
    return keep


def test_iou_of_a_box_with_itself_is_one():
    boxes = random_boxes(np.random.default_rng(0), 6)
    iou = pairwise_iou(Tensor(boxes), Tensor(boxes)).asnumpy()
    np.testing.assert_allclose(np.diag(iou), 1.0, rtol=1e-6)
    assert np.all(iou <= 1.0 + 1e-6) and np.all(iou >= 0.0)


def test_iou_matches_numpy_twin_and_known_values():
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    np.testing.assert_allclose(pairwise_iou(Tensor(a), Tensor(b)).asnumpy(),
                               np_pairwise_iou(a, b), rtol=1e-5, atol=1e-6)
    # [0,0,10,10] vs [5,0,15,10]: intersection 50, union 150.
    known = pairwise_iou(Tensor([[0.0, 0, 10, 10]]), Tensor([[5.0, 0, 15, 10], [20.0, 20, 30, 30]]))
    np.testing.assert_allclose(known.asnumpy(), [[1.0 / 3.0, 0.0]], rtol=1e-6)


def test_iou_broadcasts_over_batch():
    rng = np.random.default_rng(2)
    a = np.stack([random_boxes(rng, 4), random_boxes(rng, 4)])
    b = np.stack([random_boxes(rng, 3), random_boxes(rng, 3)])
    out = pairwise_iou(Tensor(a), Tensor(b)).asnumpy()
    assert out.shape == (2, 4, 3)
    np.testing.assert_allclose(out[1], np_pairwise_iou(a[1], b[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, m", [(0, 3), (3, 0), (0, 0)])
def test_empty_inputs_give_empty_results(n, m):
    a = Tensor(np.zeros((n, 4), np.float32))
    b = Tensor(random_boxes(np.random.default_rng(3), m) if m else np.zeros((0, 4), np.float32))
    assert pairwise_iou(a, b).shape == (n, m)
    assert pairwise_iof(a, b).shape == (n, m)


def test_degenerate_boxes_have_zero_iou_not_nan():
    zero = Tensor(np.zeros((2, 4), np.float32))
    iou = pairwise_iou(zero, zero).asnumpy()
    assert np.all(iou == 0.0)
    assert float(box_area(Tensor([[5.0, 5, 3, 9]])).asnumpy()[0]) == 0.0  # malformed -> 0


def test_iof_is_fraction_of_first_box_inside_second():
    inner = Tensor([[10.0, 10, 20, 20], [0.0, 0, 20, 10]])
    crowd = Tensor([[0.0, 0, 100, 15]])
    np.testing.assert_allclose(pairwise_iof(inner, crowd).asnumpy(), [[0.5], [1.0]], rtol=1e-6)


def test_clip_boxes_with_per_image_sizes():
    boxes = Tensor(np.array([[[-5.0, -5, 50, 50]], [[-5.0, -5, 50, 50]]], np.float32))
    clipped = clip_boxes(boxes, Tensor([[40.0], [20.0]]), Tensor([[30.0], [60.0]])).asnumpy()
    np.testing.assert_array_equal(clipped[0, 0], [0, 0, 30, 40])
    np.testing.assert_array_equal(clipped[1, 0], [0, 0, 50, 20])


def test_box_coder_known_deltas():
    coder = DeltaXYWHBoxCoder()
    deltas = coder.encode(Tensor([[0.0, 0, 10, 20]]), Tensor([[5.0, 10, 25, 30]])).asnumpy()
    # centres (5, 10) -> (15, 20); sizes (10, 20) -> (20, 20)
    np.testing.assert_allclose(deltas, [[1.0, 0.5, math.log(2.0), 0.0]], rtol=1e-6, atol=1e-6)
    normalised = DeltaXYWHBoxCoder(means=(0.1, 0, 0, 0), stds=(0.1, 0.1, 0.2, 0.2)).encode(
        Tensor([[0.0, 0, 10, 20]]), Tensor([[5.0, 10, 25, 30]])).asnumpy()
    np.testing.assert_allclose(normalised, [[9.0, 5.0, math.log(2.0) / 0.2, 0.0]], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("means, stds", [((0, 0, 0, 0), (1, 1, 1, 1)),
                                         ((0.1, -0.2, 0.05, 0), (0.1, 0.1, 0.2, 0.2))])
def test_box_coder_round_trip(means, stds):
    rng = np.random.default_rng(4)
    src, dst = random_boxes(rng, 50), random_boxes(rng, 50)
    coder = DeltaXYWHBoxCoder(means=means, stds=stds)
    decoded = coder.decode(Tensor(src), coder.encode(Tensor(src), Tensor(dst))).asnumpy()
    np.testing.assert_allclose(decoded, dst, rtol=1e-4, atol=1e-3)


def test_box_coder_decode_clamps_and_clips():
    coder = DeltaXYWHBoxCoder()
    src = Tensor([[10.0, 10, 20, 20]])
    huge = coder.decode(src, Tensor([[0.0, 0, 100.0, 100.0]])).asnumpy()
    side = 10.0 * math.exp(DEFAULT_SCALE_CLAMP)
    np.testing.assert_allclose(huge[0, 2] - huge[0, 0], side, rtol=1e-4)
    clipped = coder.decode(src, Tensor([[0.0, 0, 100.0, 100.0]]), max_shape=(40, 30)).asnumpy()
    np.testing.assert_allclose(clipped[0], [0, 0, 30, 40])


def test_anchor_generator_layout():
    gen = AnchorGenerator(strides=[4, 8], ratios=[0.5, 1.0, 2.0], scales=[8])
    np.testing.assert_allclose(gen.base_anchors(0)[1], [-16, -16, 16, 16])
    w, h = gen.base_anchors(0)[0, 2] * 2, gen.base_anchors(0)[0, 3] * 2
    np.testing.assert_allclose([w * h, h / w], [32 * 32, 0.5], rtol=1e-5)  # ratio = h / w
    level0, level1 = gen.grid_anchors([(3, 5), (2, 3)])
    assert level0.shape == (3 * 5 * 3, 4) and level1.shape == (2 * 3 * 3, 4)
    # index (y * W + x) * A + a; centre at (stride * x, stride * y)
    y, x, a = 2, 4, 1
    np.testing.assert_allclose(level0[(y * 5 + x) * 3 + a], [16 - 16, 8 - 16, 16 + 16, 8 + 16])
    assert gen.grid_anchors([(3, 5), (2, 3)])[0] is level0  # cached


def test_batched_gather():
    values = Tensor(np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2))
    out = batched_gather(values, Tensor(np.array([[3, 0], [1, 1]], np.int32))).asnumpy()
    np.testing.assert_array_equal(out, [[[6, 7], [0, 1]], [[10, 11], [10, 11]]])
