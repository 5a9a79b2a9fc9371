"""SortedNms: the C++ kernel makes the same keep decisions as MindSpore's NMSWithMask path and a
NumPy greedy reference, per image of a batch, on crowded boxes, duplicates and degenerate ones."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, ops

from instaboost.models.layers.nms import SortedNms, sorted_nms_keep
from tests.models.test_boxes import random_boxes, reference_nms

ms.runtime.launch_blocking()


def crowded_boxes(rng: np.random.Generator, num: int) -> np.ndarray:
    """Boxes jittered around a few centres (most pairs overlap, as RPN proposals do), then some
    exact duplicates, zero-area boxes and reversed (x2 < x1) ones."""
    centres = rng.uniform(20, 180, (6, 2))
    centre = centres[rng.integers(0, len(centres), num)] + rng.normal(0, 6, (num, 2))
    half = rng.uniform(4, 40, (num, 2))
    boxes = np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)
    if num >= 8:
        boxes[num // 2] = boxes[1]                             # duplicate of a kept box
        boxes[num // 3, 2:] = boxes[num // 3, :2]              # zero area
        boxes[num // 4, [0, 2]] = boxes[num // 4, [2, 0]]      # x2 < x1
    return boxes


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("num", [1, 2, 17, 300, 2000])
def test_kernel_keeps_what_nms_with_mask_keeps(num, threshold):
    rng = np.random.default_rng(num)
    batch = np.stack([crowded_boxes(rng, num), crowded_boxes(rng, num),
                      random_boxes(rng, num, size=200.0)])
    kernel = SortedNms(threshold, impl="kernel")(Tensor(batch)).asnumpy()
    mindspore = SortedNms(threshold, impl="mindspore")(Tensor(batch)).asnumpy()
    assert kernel.shape == (3, num) and kernel.dtype == np.bool_
    np.testing.assert_array_equal(kernel, mindspore)
    for image, keep in zip(batch, kernel):
        np.testing.assert_array_equal(keep, reference_nms(image, threshold))
    if num >= 300:
        assert 0 < kernel[0].sum() < num, "crowded boxes: some kept, some suppressed"


def test_later_duplicate_is_suppressed_and_nan_boxes_suppress_nothing():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [np.nan, 0, 10, 10], [1, 1, 10, 10]],
                     np.float32)
    expected = [True, False, True, False]
    for impl in ("kernel", "mindspore"):
        keep = SortedNms(0.5, impl=impl)(Tensor(boxes[None])).asnumpy()[0]
        np.testing.assert_array_equal(keep, expected, err_msg=impl)


def test_sorted_nms_keep_matches_greedy_reference_even_with_tied_scores():
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 40, size=60.0)
    boxes[10] = boxes[3]  # exact duplicate -> suppressed by the earlier one
    nms = ops.NMSWithMask(0.5)
    keep = sorted_nms_keep(nms, Tensor(boxes)).asnumpy()
    np.testing.assert_array_equal(keep, reference_nms(boxes, 0.5))
    assert not keep[10]


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="nms impl"):
        SortedNms(0.5, impl="cuda")
