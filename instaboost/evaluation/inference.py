"""Run a detector over an evaluation set and collect COCO-format results."""
from typing import Dict, Iterable, List, Tuple

from instaboost.evaluation.coco_eval import detections_to_coco


def predict_coco(network, batches: Iterable, *, label_to_category: Dict[int, int],
                 mask_threshold: float) -> Tuple[List[dict], List[int]]:
    """Forward every (image, img_meta) batch through `network.forward_test`.

    Returns the COCO result dicts and the ids of every image seen (an image with no detection still
    counts in the evaluation: its objects are misses).
    """
    results: List[dict] = []
    image_ids: List[int] = []
    for image, img_meta in batches:
        boxes, scores, labels, valid, masks = network.forward_test(image, img_meta)
        meta = img_meta.asnumpy()
        image_ids.extend(int(round(v)) for v in meta[:, 0])
        results.extend(detections_to_coco(boxes.asnumpy(), scores.asnumpy(), labels.asnumpy(), valid.asnumpy(),
                                          masks.asnumpy(), meta, label_to_category, mask_threshold))
    return results, image_ids
