"""COCO evaluation: detections in resized-image pixels -> COCO results JSON -> COCOeval bbox and segm.

Shape shorthand: B images per batch, D detections per image (fixed, with a valid mask), M = 28 mask
resolution of the mask head.
"""
import contextlib
import io
import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

# The order of COCOeval.stats, under the metric names logged to the tracker.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")
AREA_ALL = 0        # index of area range "all" in COCOeval.params.areaRng
MAX_DETS_LAST = -1  # COCOeval's last maxDets entry (100)


def _sampling_weights(first: int, count: int, low: float, high: float, cells: int) -> np.ndarray:
    """(count, cells) bilinear weights that sample a row of `cells` values spread evenly over
    [low, high) at the pixel centres first + 0.5, ..., first + count - 0.5; a neighbour beyond the
    row weighs nothing (zero padding, as grid_sample's with align_corners=False)."""
    centres = np.arange(first, first + count, dtype=np.float64) + 0.5
    position = (centres - low) / (high - low) * cells - 0.5   # in cell-centre units
    left = np.floor(position).astype(np.int64)
    right_weight = position - left
    weights = np.zeros((count, cells), dtype=np.float64)
    rows = np.arange(count)
    for index, weight in ((left, 1.0 - right_weight), (left + 1, right_weight)):
        inside = (index >= 0) & (index < cells)
        weights[rows[inside], index[inside]] = weight[inside]
    return weights


def paste_mask(mask_probs: np.ndarray, box: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """Paste an (M, M) probability map predicted inside `box` (xyxy, original pixels) into an image mask.

    Returns uint8 (height, width). Each image pixel near the box samples the map, spread over the
    box's exact (fractional) extent, bilinearly at its centre, as mmdetection's ``_do_paste_mask``
    does; a pixel is set where that is >= threshold. So the mask never reaches past the box: at
    threshold 0.5 only pixels whose centre lies inside it can be set. A box without area pastes
    nothing.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    out = np.zeros((height, width), dtype=np.uint8)
    if not (x2 > x1 and y2 > y1):
        return out
    # One pixel of margin: beyond it no pixel centre is within half a map cell of the box.
    left, top = max(int(np.floor(x1)) - 1, 0), max(int(np.floor(y1)) - 1, 0)
    right, bottom = min(int(np.ceil(x2)) + 1, width), min(int(np.ceil(y2)) + 1, height)
    if right <= left or bottom <= top:
        return out
    cells_y, cells_x = mask_probs.shape
    rows = _sampling_weights(top, bottom - top, y1, y2, cells_y)
    columns = _sampling_weights(left, right - left, x1, x2, cells_x)
    sampled = rows @ mask_probs.astype(np.float64) @ columns.T
    out[top:bottom, left:right] = sampled >= threshold
    return out


def detections_to_coco(det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray,
                       det_valid: np.ndarray, det_masks: np.ndarray, img_meta: np.ndarray,
                       label_to_category: Dict[int, int], mask_threshold: float) -> List[dict]:
    """Convert one batch of fixed-size detector outputs into COCO result dicts.

    det_boxes (B, D, 4) xyxy resized pixels, det_scores (B, D), det_labels (B, D) int 1..K,
    det_valid (B, D) bool, det_masks (B, D, M, M) probabilities, img_meta (B, 5)
    [image_id, orig_h, orig_w, resized_h, resized_w]. Boxes are mapped back to original pixels.
    """
    results = []
    for b in range(det_boxes.shape[0]):
        image_id, orig_h, orig_w, resized_h, resized_w = img_meta[b].tolist()
        height, width = int(round(orig_h)), int(round(orig_w))
        scale = np.array([resized_w / orig_w, resized_h / orig_h] * 2, dtype=np.float32)
        for d in np.flatnonzero(det_valid[b]):
            box = det_boxes[b, d] / scale
            # A box clipped to no width or height is still a detection (mmdetection writes it
            # too): a false positive with an empty mask, not one to drop from the results.
            box = np.clip(box, 0, [width, height, width, height])
            mask = paste_mask(det_masks[b, d], box, height, width, mask_threshold)
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({
                "image_id": int(round(image_id)),
                "category_id": int(label_to_category[int(det_labels[b, d])]),
                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                "score": float(det_scores[b, d]),
                "segmentation": rle,
            })
    return results


def _per_category_ap(evaluator: COCOeval, category_names: Dict[int, str]) -> List[Tuple[int, str, float]]:
    """AP averaged over IoU thresholds and recall for each category (area all, 100 detections); -1 = no GT."""
    precision = evaluator.eval["precision"]  # (T IoUs, R recalls, K categories, A areas, M maxDets)
    rows = []
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, AREA_ALL, MAX_DETS_LAST]
        values = values[values > -1]
        ap = float(values.mean()) if values.size else -1.0
        rows.append((category_id, category_names.get(category_id, str(category_id)), ap))
    return rows


def _detections(coco_gt: COCO, results: Sequence[dict], iou_type: str) -> COCO:
    """The results as pycocotools' detection set for one IoU type.

    For segm the results go in without their boxes: given a box, ``loadRes`` takes a detection's
    area from it, and COCOeval would then sort the detections into its small / medium / large
    ranges by box area while it sorts the ground truth by mask area (segm APs..ARl wrong). No
    results give an empty set, which COCOeval scores as it scores any other: 0 where there is
    ground truth, -1 where there is none.
    """
    if not results:
        detections = COCO()
        detections.dataset = {"images": list(coco_gt.dataset.get("images", [])),
                              "categories": list(coco_gt.dataset.get("categories", [])),
                              "annotations": []}
        with contextlib.redirect_stdout(io.StringIO()):
            detections.createIndex()
        return detections
    drop = {"bbox"} if iou_type == "segm" else set()
    copies = [{key: value for key, value in result.items() if key not in drop} for result in results]
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_gt.loadRes(copies)   # copies: loadRes adds "area" and "id" to what it gets


def evaluate_coco(coco_gt: COCO, results: Sequence[dict], image_ids: Sequence[int]
                  ) -> Tuple[Dict[str, float], Dict[str, List[Tuple[int, str, float]]], str]:
    """Run COCOeval for bbox and segm on `image_ids`.

    Returns (metrics {"bbox/AP": .., "segm/AR100": .., 24 in all}, per-category AP rows per IoU type,
    the printed summaries). With no detections at all COCOeval still scores the empty set: 0 where
    there is ground truth, -1 where there is none (a size range or a category without any).
    """
    metrics: Dict[str, float] = {}
    per_category: Dict[str, List[Tuple[int, str, float]]] = {}
    summaries = []
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    if not results:
        log.warning("evaluation: the model made no detection on %d images; every AP is 0 where "
                    "there is ground truth", len(image_ids))
    for iou_type in IOU_TYPES:
        evaluator = COCOeval(coco_gt, _detections(coco_gt, results, iou_type), iou_type)
        evaluator.params.imgIds = list(image_ids)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        summaries.append(f"== {iou_type} ==\n" + "\n".join(
            line for line in buffer.getvalue().splitlines() if line.strip().startswith("Average")))
        # COCOeval reports -1 where no ground truth exists in an area range; keep it as is: it is not 0.
        metrics.update({f"{iou_type}/{name}": float(v) for name, v in zip(STAT_NAMES, evaluator.stats)})
        per_category[iou_type] = _per_category_ap(evaluator, names)
    return metrics, per_category, "\n".join(summaries)


def per_category_table(per_category: Dict[str, List[Tuple[int, str, float]]]) -> str:
    """Markdown table: one row per category with bbox and segm AP (-1 = category absent from the GT)."""
    bbox = {cid: ap for cid, _, ap in per_category.get("bbox", [])}
    lines = ["| category_id | name | bbox AP | segm AP |", "|---:|---|---:|---:|"]
    for cid, name, segm_ap in per_category.get("segm", []):
        lines.append(f"| {cid} | {name} | {bbox.get(cid, -1.0):.4f} | {segm_ap:.4f} |")
    return "\n".join(lines) + "\n"
