"""mindspore.dataset pipelines: batch contract shapes/dtypes, workers, epochs, reproducibility."""
import multiprocessing
import pickle

import numpy as np
import pytest

from instaboost.data.coco import CocoSource
from instaboost.data.demo_data import ensure_demo_dataset
from instaboost.data.stats import DataStats
from instaboost.data.pipeline import (EVAL_COLUMNS, SAMPLE_COUNTS_COLUMN, TRAIN_COLUMNS, EpochSampler,
                                      TrainSampleSource, TrainTransform, build_eval_dataset,
                                      build_train_dataset, trained_batch)
from instaboost.data.transforms import build_instaboost_step
from instaboost.utils.seed import sample_seed, seed_everything
from tests.helpers import shared_data_dir

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
H, W, G, M, B = 64, 128, 6, 14, 2
GEOMETRY = dict(img_height=H, img_width=W, pad_divisor=32, img_mean=MEAN, img_std=STD)
AUG_PARAMS = dict(engine="instaboostfast", aug_prob=0.5, action_candidate=["normal", "horizontal", "skip"],
                  action_prob=[1.0, 0.0, 0.0], scale=[0.8, 1.2], dx=15, dy=15, theta=[-1, 1],
                  color_prob=0.5, heatmap_flag=False)
EXPECTED = {
    "image": ((B, 3, H, W), np.float32), "img_meta": ((B, 5), np.float32),
    "gt_boxes": ((B, G, 4), np.float32), "gt_labels": ((B, G), np.int32),
    "gt_masks": ((B, G, M, M), np.uint8), "gt_valid": ((B, G), np.bool_), "gt_crowd": ((B, G), np.bool_),
}


@pytest.fixture(scope="module")
def demo_source(tmp_path_factory):
    paths = ensure_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=6, num_val=3, image_size=96, seed=1)
    return paths


def _train(source, num_workers, **overrides):
    kwargs = dict(augment=build_instaboost_step(AUG_PARAMS, stats=source.stats), batch_size=B,
                  flip_ratio=0.5, num_gts=G, gt_mask_size=M, num_workers=num_workers, seed=3, **GEOMETRY)
    kwargs.update(overrides)
    return build_train_dataset(source, **kwargs)


def _epochs(dataset, num_epochs):
    iterator = dataset.create_dict_iterator(num_epochs=num_epochs, output_numpy=True)
    return [[batch for batch in iterator] for _ in range(num_epochs)]


def test_train_batches_match_the_contract_with_0_and_2_workers(demo_source):
    runs = {}
    for workers in (0, 2):
        source = CocoSource(demo_source[0], demo_source[1])
        dataset = _train(source, workers)
        assert dataset.get_dataset_size() == 3  # asking the size does not consume an epoch
        runs[workers] = _epochs(dataset, 2)
        batch = runs[workers][0][0]
        assert list(batch) == [*TRAIN_COLUMNS, SAMPLE_COUNTS_COLUMN]
        for name, (shape, dtype) in EXPECTED.items():
            assert batch[name].shape == shape and batch[name].dtype == dtype, name
        assert len(runs[workers][0]) == 3  # 6 images / batch 2
        # each sample's counters travel with it (made inside the worker processes too); none is
        # counted in the source before the training loop takes its batch (trained_batch)
        samples = source.stats.names.index("samples")
        assert sum(int(b[SAMPLE_COUNTS_COLUMN][:, samples].sum()) for e in runs[workers] for b in e) == 12
        assert source.stats.get("samples") == 0
        ids = sorted(int(i) for epoch in runs[workers][:1] for b in epoch for i in b["img_meta"][:, 0])
        assert ids == list(range(1, 7))
    for epoch_a, epoch_b in zip(runs[0], runs[2]):  # reproducible for any worker count
        for batch_a, batch_b in zip(epoch_a, epoch_b):
            for name in TRAIN_COLUMNS:
                np.testing.assert_array_equal(batch_a[name], batch_b[name])
    first, second = runs[0]
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, second))
    # each row is the (epoch, image index) sample of TrainSampleSource: the workers knew the epoch
    source = CocoSource(demo_source[0], demo_source[1])
    transform = TrainTransform(flip_ratio=0.5, num_gts=G, gt_mask_size=M,
                               augment=build_instaboost_step(AUG_PARAMS), **GEOMETRY)
    items = TrainSampleSource(source, transform, seed=3)
    for epoch, batches in enumerate(runs[2]):
        row = batches[0]
        index = source.image_ids.index(int(row["img_meta"][0, 0]))
        np.testing.assert_array_equal(row["image"][0], items.sample(epoch, index)["image"])


def test_real_coco_batches_with_workers():
    root = shared_data_dir("coco_val10")
    source = CocoSource(root / "images", root / "annotations_with_crowd.json", max_images=4)
    (epoch,) = _epochs(_train(source, 2, num_gts=40), 1)
    assert len(epoch) == 2
    expected = {name: ((B, 40) + shape[2:] if shape[1:2] == (G,) else shape, dtype)
                for name, (shape, dtype) in EXPECTED.items()}
    for batch in epoch:
        for name, (shape, dtype) in expected.items():
            assert batch[name].shape == shape and batch[name].dtype == dtype, name
        assert (batch["gt_labels"][batch["gt_valid"]] >= 1).all()


def test_same_seed_same_sample_other_epoch_or_index_differs(demo_source):
    source = CocoSource(demo_source[0], demo_source[1])
    step = build_instaboost_step({**AUG_PARAMS, "aug_prob": 1.0})
    transform = TrainTransform(flip_ratio=0.5, num_gts=G, gt_mask_size=M, augment=step, **GEOMETRY)
    items = TrainSampleSource(source, transform, seed=3)
    first, again = items.sample(0, 2), items.sample(0, 2)
    for name in TRAIN_COLUMNS:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["image"], items.sample(1, 2)["image"])
    assert not np.array_equal(first["image"], TrainSampleSource(source, transform, seed=4).sample(0, 2)["image"])
    by_global_id = items[1 * len(source) + 2]
    np.testing.assert_array_equal(by_global_id[0], items.sample(1, 2)["image"])
    seeds = {sample_seed(3, epoch, index) for epoch in range(3) for index in range(50)}
    assert len(seeds) == 150


def test_epoch_sampler_counts_passes_and_shards():
    sampler = EpochSampler(5, seed=0, start_epoch=2)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(10, 15)) and sorted(second) == list(range(15, 20))
    assert list(EpochSampler(5, seed=0, start_epoch=2)) == first
    shards = [list(EpochSampler(5, seed=0, num_shards=2, shard_id=i)) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3 and set(shards[0]) | set(shards[1]) == set(range(5))
    assert list(EpochSampler(4, seed=0, shuffle=False)) == [0, 1, 2, 3]


def test_epoch_sampler_shuffles_each_epoch_anew():
    sampler = EpochSampler(50, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(i % 50 for i in first) == sorted(i % 50 for i in second) == list(range(50))
    assert [i % 50 for i in first] != [i % 50 for i in second]


def test_eval_dataset_in_order_and_padded(demo_source):
    source = CocoSource(demo_source[2], demo_source[3])
    for workers, pad in ((0, False), (2, True)):
        dataset = build_eval_dataset(source, batch_size=2, num_workers=workers, pad_last_batch=pad, **GEOMETRY)
        (batches,) = _epochs(dataset, 1)
        assert list(batches[0]) == list(EVAL_COLUMNS)
        assert batches[0]["image"].shape == (2, 3, H, W) and batches[0]["image"].dtype == np.float32
        ids = [int(i) for b in batches for i in b["img_meta"][:, 0]]
        assert ids == ([1, 2, 3, -1] if pad else [1, 2, 3])
        np.testing.assert_array_equal(batches[0]["img_meta"][0], [1, 96, 96, 64, 64])


def test_builder_errors(demo_source):
    source = CocoSource(demo_source[0], demo_source[1])
    with pytest.raises(ValueError, match="divisible by pad_divisor"):
        _train(source, 0, img_height=70)
    with pytest.raises(ValueError, match="cannot fill one batch"):
        _train(source, 0, batch_size=8)


def test_seed_everything_is_repeatable():
    import random

    seed_everything(123)
    first = (random.random(), np.random.random())
    seed_everything(123)
    assert (random.random(), np.random.random()) == first
    with pytest.raises(ValueError):
        seed_everything(-1)


def _count(stats, times):
    for _ in range(times):
        stats.add("samples")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_data_stats_add_up_across_processes(method):
    stats = DataStats()
    context = multiprocessing.get_context(method)
    workers = [context.Process(target=_count, args=(stats, 300)) for _ in range(2)]
    for worker in workers:
        worker.start()
    _count(stats, 300)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert stats.get("samples") == 900
    with pytest.raises(KeyError, match="known"):
        stats.add("sampels")


def test_train_transform_pickles_with_the_reference_engine(demo_source):
    source = CocoSource(demo_source[0], demo_source[1])
    step = build_instaboost_step({**AUG_PARAMS, "aug_prob": 1.0}, stats=source.stats)
    transform = TrainTransform(flip_ratio=0.5, num_gts=G, gt_mask_size=M, augment=step,
                               stats=source.stats, **GEOMETRY)
    copy = pickle.loads(pickle.dumps(transform))
    sample = source.load(0)
    out, out_copy = transform(sample, np.random.default_rng(2)), copy(sample, np.random.default_rng(2))
    for name in TRAIN_COLUMNS:
        np.testing.assert_array_equal(out[name], out_copy[name])
    # the copy counts into the same shared counters
    assert source.stats.get("samples") == 2 and source.stats.get("instaboost_applied") == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_samples_count_when_trained_not_when_prefetched(demo_source, workers):
    # Take one batch of the three of an epoch: the workers have made (prefetched) more than it.
    source = CocoSource(demo_source[0], demo_source[1])
    dataset = _train(source, workers, augment=build_instaboost_step(
        {**AUG_PARAMS, "aug_prob": 1.0}, stats=source.stats))
    iterator = dataset.create_tuple_iterator(num_epochs=1)
    batch = trained_batch(next(iterator), source.stats)
    assert len(batch) == len(TRAIN_COLUMNS)
    assert source.stats.get("samples") == B
    assert 0 < source.stats.get("instaboost_applied") + source.stats.get("instaboost_no_instances") <= B
    for rest in iterator:
        trained_batch(rest, source.stats)
    assert source.stats.get("samples") == 6


def test_train_dataset_refuses_a_step_counting_elsewhere(demo_source):
    source = CocoSource(demo_source[0], demo_source[1])
    with pytest.raises(ValueError, match="stats=source.stats"):
        _train(source, 0, augment=build_instaboost_step(AUG_PARAMS, stats=DataStats()))
