"""The generated demo data set: deterministic, cached, COCO-loadable, realistic layouts."""
import multiprocessing

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from instaboost.data.coco import CocoSource
from instaboost.data.demo_data import CLASS_NAMES, ensure_demo_dataset

SMALL = dict(num_train=10, num_val=3, image_size=96, seed=5)


def test_same_seed_gives_identical_files(tmp_path):
    first = ensure_demo_dataset(tmp_path / "a", **SMALL)
    second = ensure_demo_dataset(tmp_path / "b", **SMALL)
    for one, two in ((first[1], second[1]), (first[3], second[3])):
        assert one.read_bytes() == two.read_bytes()
    for image in sorted(first[0].iterdir()):
        assert image.read_bytes() == (second[0] / image.name).read_bytes()
    other = ensure_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 6})
    assert other[1].read_bytes() != first[1].read_bytes()


def test_cached_and_regenerated_when_parameters_change(tmp_path):
    root = tmp_path / "demo"
    train_images, train_ann, _, _ = ensure_demo_dataset(root, **SMALL)
    stamp = train_ann.stat().st_mtime_ns
    ensure_demo_dataset(root, **SMALL)
    assert train_ann.stat().st_mtime_ns == stamp
    ensure_demo_dataset(root, **{**SMALL, "num_train": 4})
    assert len(list(train_images.iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]  # no temp leftovers


def test_a_folder_that_is_not_a_demo_set_is_never_replaced(tmp_path):
    # dataset.root=/data/coco with the default dataset=demo must not delete the user's data.
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(ValueError, match=r"dataset.root: .*coco exists and is not a demo data set"):
        ensure_demo_dataset(root, **SMALL)
    assert (root / "annotations" / "instances_train2017.json").read_text() == "{}"
    (root / "params.json").write_text("{not json")      # nor one with a foreign params.json
    with pytest.raises(ValueError, match="dataset.root"):
        ensure_demo_dataset(root, **SMALL)
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "params.json"]
    empty = tmp_path / "empty"                            # an empty folder is used as it is
    empty.mkdir()
    assert ensure_demo_dataset(empty, **SMALL)[1].is_file()


def _generate(root, queue):
    queue.put(str(ensure_demo_dataset(root, **SMALL)[1]))


def test_concurrent_generation_is_safe(tmp_path):
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like two training jobs
    queue = context.Queue()
    workers = [context.Process(target=_generate, args=(tmp_path / "demo", queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    results = {queue.get(timeout=5) for _ in workers}
    assert len(results) == 1
    assert len(COCO(results.pop()).getImgIds()) == SMALL["num_train"]


def test_loads_with_pycocotools_and_has_overlaps_and_border_objects(tmp_path):
    train_images, train_ann, val_images, val_ann = ensure_demo_dataset(
        tmp_path / "demo", num_train=16, num_val=4, image_size=128, seed=0)
    assert {p.suffix for p in train_images.iterdir()} == {".jpg"}
    assert {p.suffix for p in val_images.iterdir()} == {".png"}
    coco = COCO(str(train_ann))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
    source = CocoSource(train_images, train_ann)
    touching_border = adjacent_pairs = 0
    kernel = np.ones((3, 3), np.uint8)
    for i in range(len(source)):
        sample = source.load(i)
        masks, boxes = sample["masks"], sample["boxes"]
        assert len(masks) >= 1 and masks.reshape(len(masks), -1).any(axis=1).all()
        # visible masks never overlap (up to the odd boundary pixel of two rasterised polygons)
        overlap = (masks.sum(axis=0) > 1).sum()
        assert overlap <= 0.01 * masks.sum()
        touching_border += int(((boxes[:, :2] <= 0) | (boxes[:, 2:] >= 128)).any(axis=1).sum())
        for a in range(len(masks)):
            grown = cv2.dilate(masks[a], kernel, iterations=2)
            adjacent_pairs += sum(int((grown & masks[b]).any()) for b in range(a + 1, len(masks)))
    assert touching_border >= 3 and adjacent_pairs >= 3
    assert len(CocoSource(val_images, val_ann)) == 4
