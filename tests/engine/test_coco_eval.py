import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from mindspore import Tensor
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from instaboost.evaluation.coco_eval import (STAT_NAMES, detections_to_coco, evaluate_coco, paste_mask,
                                             per_category_table)
from instaboost.evaluation.inference import predict_coco
from tests.helpers import shared_data_dir


def _load_gt(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_ground_truth_scores_perfectly_against_itself():
    gt = _load_gt(shared_data_dir("coco_val10") / "annotations.json")
    results = []
    for ann in gt.dataset["annotations"]:
        rle = mask_utils.encode(np.asfortranarray(gt.annToMask(ann)))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"],
                        "score": 1.0, "segmentation": rle})
    # a box clipped to no width (an empty mask), scored below every true detection
    ann = gt.dataset["annotations"][0]
    empty = mask_utils.encode(np.zeros((gt.imgs[ann["image_id"]]["height"],
                                        gt.imgs[ann["image_id"]]["width"]), np.uint8, order="F"))
    empty["counts"] = empty["counts"].decode("ascii")
    results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                    "bbox": [0.0, 5.0, 0.0, 10.0], "score": 0.5, "segmentation": empty})
    metrics, per_category, summary = evaluate_coco(gt, results, gt.getImgIds())
    assert set(metrics) == {f"{t}/{n}" for t in ("bbox", "segm") for n in STAT_NAMES}
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)
    table = per_category_table(per_category)
    assert "| 1 | person | 1.0000 | 1.0000 |" in table
    assert "Average Precision" in summary


def test_no_detections_gives_zero_where_there_is_ground_truth_and_minus_one_where_not():
    gt = _load_gt(shared_data_dir("coco_val10") / "annotations.json")
    metrics, per_category, summary = evaluate_coco(gt, [], gt.getImgIds())
    assert metrics["segm/AP"] == 0.0 and metrics["bbox/AR100"] == 0.0
    assert "Average Precision" in summary
    present = {ann["category_id"] for ann in gt.dataset["annotations"]}
    for _, rows in per_category.items():
        assert {cid for cid, _, ap in rows if ap == 0.0} == present
        assert all(ap == -1.0 for cid, _, ap in rows if cid not in present)


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_segm_size_ranges_use_the_detections_mask_area():
    # One medium object (40x40 square). A false positive whose mask is medium (two thin strips,
    # about 1,900 pixels) but whose box is large (190 x 180) outscores the right detection: in the
    # medium range it must count, so segm/APm is 0.5 (a box-area range would ignore it: 1.0).
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 200, "width": 200}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1600.0,
                         "bbox": [40.0, 40.0, 40.0, 40.0],
                         "segmentation": [[40, 40, 80, 40, 80, 80, 40, 80]]}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    right = np.zeros((200, 200), bool)
    right[40:80, 40:80] = True
    strips = np.zeros((200, 200), bool)
    strips[5:10, 5:195] = True
    strips[5:185, 5:10] = True
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [40.0, 40.0, 40.0, 40.0], "score": 0.5,
         "segmentation": _rle(right)},
        {"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 190.0, 180.0], "score": 0.9,
         "segmentation": _rle(strips)},
    ]
    metrics, _, _ = evaluate_coco(gt, results, [1])
    assert metrics["segm/APm"] == pytest.approx(0.5)
    assert metrics["segm/APl"] == -1.0
    assert metrics["bbox/APm"] == pytest.approx(1.0)   # the box is large: out of the medium range
    assert "area" not in results[0]                    # the caller's results are left as they were


def test_paste_mask_follows_the_box():
    probs = np.ones((28, 28), np.float32)
    mask = paste_mask(probs, np.array([10.0, 5.0, 30.0, 25.0]), 40, 50, 0.5)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (10, 29, 5, 24)
    clipped = paste_mask(probs, np.array([-5.0, -5.0, 10.0, 10.0]), 40, 50, 0.5)
    assert clipped[:10, :10].all() and clipped.sum() == 100


def test_paste_mask_stays_inside_a_fractional_box():
    # The map spreads over the box's exact extent, sampled at pixel centres (mmdetection's
    # _do_paste_mask): only pixels whose centre is inside the box can be set.
    ones = np.ones((28, 28), np.float32)
    mask = paste_mask(ones, np.array([10.6, 10.6, 30.4, 30.4]), 40, 40, 0.5)
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (11, 29, 11, 29) and mask.sum() == 19 * 19
    assert paste_mask(ones, np.array([3.9, 3.9, 6.1, 6.1]), 10, 10, 0.5).sum() == 4
    # a left-half map over x 10.9-20.9 has its edge at x = 15.9: columns 11-15
    left_half = np.zeros((28, 28), np.float32)
    left_half[:, :14] = 1.0
    mask = paste_mask(left_half, np.array([10.9, 0.0, 20.9, 10.0]), 10, 30, 0.5)
    assert np.flatnonzero(mask.any(axis=0)).tolist() == [11, 12, 13, 14, 15]
    assert paste_mask(ones, np.array([5.0, 5.0, 5.0, 9.0]), 10, 10, 0.5).sum() == 0


def test_detection_clipped_to_no_width_is_kept():
    # Decoded past the right edge and clipped there: a false positive, written with w = 0.
    meta = np.array([[7, 100, 200, 50, 100]], np.float32)
    boxes = np.array([[[10, 10, 30, 20], [100, 10, 100, 20]]], np.float32)
    results = detections_to_coco(boxes, np.array([[0.9, 0.8]]), np.array([[2, 2]]),
                                 np.array([[True, True]]), np.ones((1, 2, 28, 28), np.float32),
                                 meta, {2: 18}, 0.5)
    assert len(results) == 2
    assert results[1]["bbox"] == pytest.approx([200, 20, 0, 20])
    assert mask_utils.area(results[1]["segmentation"]) == 0


def test_detections_map_back_to_original_pixels():
    # Image 100x200 resized by 0.5 to 50x100: a box at (10,10,30,20) resized is (20,20,60,40) originally.
    meta = np.array([[7, 100, 200, 50, 100]], np.float32)
    boxes = np.array([[[10, 10, 30, 20], [0, 0, 0, 0]]], np.float32)
    results = detections_to_coco(boxes, np.array([[0.9, 0.0]]), np.array([[2, 0]]), np.array([[True, False]]),
                                 np.ones((1, 2, 28, 28), np.float32), meta, {2: 18}, 0.5)
    assert len(results) == 1
    r = results[0]
    assert r["image_id"] == 7 and r["category_id"] == 18 and r["score"] == pytest.approx(0.9)
    assert r["bbox"] == pytest.approx([20, 20, 40, 20])
    assert mask_utils.area(r["segmentation"]) == 40 * 20


# COCOeval.summarize's order of its 12 statistics (pycocotools), written out independently.
COCO_SUMMARY_ORDER = ["AP", "AP50", "AP75", "APs", "APm", "APl",
                      "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _gt_results(gt, image_ids, jitter=0.0, seed=0):
    """The GT of `image_ids` as detections, boxes shifted by up to `jitter` of their size."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt.loadAnns(gt.getAnnIds(imgIds=list(image_ids), iscrowd=False)):
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-jitter, jitter, 2) * (w, h)
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + dx, y + dy, w, h], "score": float(rng.uniform(0.1, 1.0)),
                        "segmentation": _rle(gt.annToMask(ann))})
    return results


def test_metrics_carry_cocoeval_statistics_under_their_own_names():
    gt = _load_gt(shared_data_dir("coco_val10") / "annotations.json")
    results = _gt_results(gt, gt.getImgIds(), jitter=0.3)
    metrics, _, _ = evaluate_coco(gt, results, gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = dict(zip(COCO_SUMMARY_ORDER, evaluator.stats))
    assert len({round(v, 6) for v in expected.values()}) >= 8   # the statistics differ here
    for name, value in expected.items():
        assert metrics[f"bbox/{name}"] == pytest.approx(value), name


def test_only_the_evaluated_images_count():
    """dataset.max_images=5: the GT of the other images is no miss."""
    gt = _load_gt(shared_data_dir("coco_val10") / "annotations.json")
    first = sorted(gt.getImgIds())[:5]
    metrics, _, _ = evaluate_coco(gt, _gt_results(gt, first), first)
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)


def test_per_category_table_puts_each_type_in_its_column():
    table = per_category_table({"bbox": [(1, "person", 0.25)], "segm": [(1, "person", 0.75)]})
    assert "| 1 | person | 0.2500 | 0.7500 |" in table


class _StubDetector:
    """forward_test of a batch of 2: one detection per image, its score 0.3 + image index."""

    def forward_test(self, image, img_meta):
        batch = image.shape[0]
        boxes = np.tile(np.array([[[10, 10, 30, 20]]], np.float32), (batch, 1, 1))
        scores = (0.3 + np.arange(batch, dtype=np.float32)).reshape(batch, 1) / 2
        return (Tensor(boxes), Tensor(scores), Tensor(np.full((batch, 1), 2, np.int32)),
                Tensor(np.ones((batch, 1), bool)), Tensor(np.ones((batch, 1, 28, 28), np.float32)))


def test_predict_coco_keeps_every_image_of_a_batch():
    meta = np.array([[7, 100, 200, 50, 100], [9, 50, 100, 50, 100]], np.float32)
    batches = [(Tensor(np.zeros((2, 3, 64, 64), np.float32)), Tensor(meta))]
    results, image_ids = predict_coco(_StubDetector(), batches, label_to_category={2: 18},
                                      mask_threshold=0.5)
    assert image_ids == [7, 9]
    assert [(r["image_id"], r["category_id"]) for r in results] == [(7, 18), (9, 18)]
    assert [r["score"] for r in results] == pytest.approx([0.15, 0.65])

