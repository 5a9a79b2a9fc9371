"""From a `CocoSource` to fixed-shape `mindspore.dataset` batches (batch contract, CONTRACTS.md).

    image     float32 (B, 3, Hp, Wp)  RGB, normalized, zero padded bottom/right
    img_meta  float32 (B, 5)          [image_id, orig_h, orig_w, resized_h, resized_w]
    gt_boxes  float32 (B, G, 4)       xyxy in resized-image pixels; zeros for padding
    gt_labels int32   (B, G)          1..K; 0 for padding
    gt_masks  uint8   (B, G, M, M)    each GT's mask cropped to its box, resized to M x M
    gt_valid  bool    (B, G)          real entry (target or crowd)
    gt_crowd  bool    (B, G)          crowd/ignore region

The training dataset yields one more column, `sample_counts` int64 (B, number of data counters):
each sample's data counters, made while it was made. The training loop takes it off with
`trained_batch`, which adds it to the source's counters: samples count when they are trained on,
not when a worker prefetches them (see `instaboost.data.stats`).

Randomness and epochs. Every training sample draws from its own Generator seeded with
`sample_seed(seed, epoch, index)` (index = image index in the source), so a run is reproducible
for any worker count and workers never share a stream. The epoch reaches the worker processes
(forked or spawned) through the sample ids themselves: `EpochSampler` runs in the main process, counts its passes
and yields global ids `epoch * len(source) + index`; the worker-side `TrainSampleSource` splits
an id back with divmod. Nothing has to be sent to the workers between epochs, and prefetching
the next epoch cannot race with an epoch counter.

Use it either way:
  * one iterator for the whole run: `ds.create_dict_iterator(num_epochs=E)`, iterated E times
    (MindSpore's usual pattern); the sampler's k-th pass is epoch start_epoch + k;
  * or a new dataset per epoch with `start_epoch=epoch` (e.g. after resuming).
Every new iterator over the same dataset object continues the count (the sampler is shared,
not copied, when MindSpore copies the pipeline), so no epoch repeats another's shuffle.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import mindspore.dataset as ds
import numpy as np

from instaboost.data.coco import MAX_IMAGE_ID, CocoSource
from instaboost.data.stats import DataStats
from instaboost.data.transforms.geometric import (box_aligned_masks, check_pad_shape, hflip_boxes,
                                                  keep_ratio_size, normalize_to_chw, pad_chw,
                                                  resize_image, scale_boxes, select_largest)
from instaboost.utils.seed import sample_seed

TRAIN_COLUMNS = ("image", "img_meta", "gt_boxes", "gt_labels", "gt_masks", "gt_valid", "gt_crowd")
# The training dataset's last column, after TRAIN_COLUMNS (module docstring).
SAMPLE_COUNTS_COLUMN = "sample_counts"
EVAL_COLUMNS = ("image", "img_meta")
META_SIZE = 5  # [image_id, orig_h, orig_w, resized_h, resized_w]
# image_id written into img_meta for the filler samples of a padded last eval batch.
PADDING_IMAGE_ID = -1
CHANNELS_RGB = 3


def _meta(image_id: int, orig_h: int, orig_w: int, new_h: int, new_w: int) -> np.ndarray:
    if not 0 <= image_id < MAX_IMAGE_ID:
        raise ValueError(f"image id {image_id} cannot be carried exactly by float32 img_meta "
                         f"(must lie in [0, 2**24))")
    return np.array([image_id, orig_h, orig_w, new_h, new_w], dtype=np.float32)


class TrainTransform:
    """One training sample -> the batch contract's per-sample arrays (pure numpy, picklable).

    Steps: InstaBoost (optional `augment` step), resize keeping the aspect ratio to fit
    (img_height, img_width), horizontal flip with probability flip_ratio, BGR -> RGB and
    normalisation, zero padding to (img_height, img_width); ground truth scaled and flipped,
    masks cropped to their boxes at M x M, padded to num_gts (the largest kept, targets first).

    Args:
        img_height, img_width: padded size (Hp, Wp), each divisible by pad_divisor.
        pad_divisor: e.g. 64 (stride of the coarsest FPN level that must tile the image).
        flip_ratio: probability of a horizontal flip.
        img_mean, img_std: RGB mean / std of the normalisation (0-255 scale).
        num_gts: G, ground-truth slots per image.
        gt_mask_size: M.
        augment: an `InstaBoostAug`-like step `(sample, rng) -> sample`, or None.
        stats: counters ("samples", "gts_dropped_over_limit"); default: a new `DataStats`.
    """

    def __init__(self, *, img_height: int, img_width: int, pad_divisor: int, flip_ratio: float,
                 img_mean: Sequence[float], img_std: Sequence[float], num_gts: int,
                 gt_mask_size: int, augment=None, stats: DataStats | None = None):
        check_pad_shape(img_height, img_width, pad_divisor)
        if not 0.0 <= flip_ratio <= 1.0:
            raise ValueError(f"flip_ratio must lie in [0, 1], got {flip_ratio}")
        if num_gts < 1 or gt_mask_size < 1:
            raise ValueError(f"num_gts and gt_mask_size must be >= 1, got {num_gts}, {gt_mask_size}")
        if len(img_mean) != 3 or len(img_std) != 3 or min(img_std) <= 0:
            raise ValueError(f"img_mean/img_std need 3 values (std > 0), got {img_mean}, {img_std}")
        self.img_height, self.img_width, self.pad_divisor = int(img_height), int(img_width), int(pad_divisor)
        self.flip_ratio = float(flip_ratio)
        self.img_mean = [float(v) for v in img_mean]
        self.img_std = [float(v) for v in img_std]
        self.num_gts, self.gt_mask_size = int(num_gts), int(gt_mask_size)
        self.augment = augment
        self.stats = stats if stats is not None else DataStats()

    def __call__(self, sample: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Returns {column: array} for TRAIN_COLUMNS without the batch axis."""
        orig_h, orig_w = sample["image"].shape[:2]
        if self.augment is not None:
            sample = self.augment(sample, rng)
        flip = bool(rng.random() < self.flip_ratio)
        new_h, new_w = keep_ratio_size(orig_h, orig_w, self.img_height, self.img_width)
        resized = resize_image(sample["image"], new_h, new_w)
        if flip:
            resized = resized[:, ::-1]
        image = pad_chw(normalize_to_chw(resized, self.img_mean, self.img_std),
                        self.img_height, self.img_width)

        G, M = self.num_gts, self.gt_mask_size
        gt_boxes = np.zeros((G, 4), dtype=np.float32)
        gt_labels = np.zeros((G,), dtype=np.int32)
        gt_masks = np.zeros((G, M, M), dtype=np.uint8)
        gt_valid = np.zeros((G,), dtype=np.bool_)
        gt_crowd = np.zeros((G,), dtype=np.bool_)
        masks, boxes = sample["masks"], sample["boxes"]
        num = len(sample["labels"])
        if num:
            keep = np.arange(num)
            if num > G:
                areas = masks.reshape(num, -1).sum(axis=1)
                keep = select_largest(areas, sample["iscrowd"], G)
                self.stats.add("gts_dropped_over_limit", num - G)
            kept = len(keep)
            scaled = scale_boxes(boxes[keep], new_w / orig_w, new_h / orig_h, new_h, new_w)
            gt_boxes[:kept] = hflip_boxes(scaled, new_w) if flip else scaled
            gt_labels[:kept] = sample["labels"][keep]
            gt_masks[:kept] = box_aligned_masks(masks[keep], boxes[keep], M, hflip=flip)
            gt_valid[:kept] = True
            gt_crowd[:kept] = sample["iscrowd"][keep]
        self.stats.add("samples")
        return {
            "image": image,
            "img_meta": _meta(int(sample["image_id"]), orig_h, orig_w, new_h, new_w),
            "gt_boxes": gt_boxes, "gt_labels": gt_labels, "gt_masks": gt_masks,
            "gt_valid": gt_valid, "gt_crowd": gt_crowd,
        }

    def __repr__(self) -> str:
        return (f"TrainTransform(img_height={self.img_height}, img_width={self.img_width}, "
                f"pad_divisor={self.pad_divisor}, flip_ratio={self.flip_ratio}, "
                f"img_mean={self.img_mean}, img_std={self.img_std}, num_gts={self.num_gts}, "
                f"gt_mask_size={self.gt_mask_size}, augment={self.augment!r})")


class EvalTransform:
    """One evaluation sample -> {"image": float32 (3, Hp, Wp), "img_meta": float32 (5,)}.

    Resize keeping the aspect ratio, BGR -> RGB, normalise, zero pad; no randomness.
    """

    def __init__(self, *, img_height: int, img_width: int, pad_divisor: int,
                 img_mean: Sequence[float], img_std: Sequence[float], stats: DataStats | None = None):
        check_pad_shape(img_height, img_width, pad_divisor)
        self.img_height, self.img_width, self.pad_divisor = int(img_height), int(img_width), int(pad_divisor)
        self.img_mean = [float(v) for v in img_mean]
        self.img_std = [float(v) for v in img_std]
        self.stats = stats if stats is not None else DataStats()

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, np.ndarray]:
        orig_h, orig_w = sample["image"].shape[:2]
        new_h, new_w = keep_ratio_size(orig_h, orig_w, self.img_height, self.img_width)
        resized = resize_image(sample["image"], new_h, new_w)
        image = pad_chw(normalize_to_chw(resized, self.img_mean, self.img_std),
                        self.img_height, self.img_width)
        self.stats.add("eval_samples")
        return {"image": image,
                "img_meta": _meta(int(sample["image_id"]), orig_h, orig_w, new_h, new_w)}

    def padding_sample(self) -> dict[str, np.ndarray]:
        """A filler sample (zero image, image_id -1, zero sizes) for padding a last batch."""
        meta = np.zeros((META_SIZE,), dtype=np.float32)
        meta[0] = PADDING_IMAGE_ID
        return {"image": np.zeros((CHANNELS_RGB, self.img_height, self.img_width), dtype=np.float32),
                "img_meta": meta}

    def __repr__(self) -> str:
        return (f"EvalTransform(img_height={self.img_height}, img_width={self.img_width}, "
                f"pad_divisor={self.pad_divisor}, img_mean={self.img_mean}, img_std={self.img_std})")


class TrainSampleSource:
    """Random-access source for `GeneratorDataset`: global id -> tuple in TRAIN_COLUMNS order.

    A global id is `epoch * len(source) + index` (see `EpochSampler`). Picklable when the
    source and the transform are.
    """

    def __init__(self, source: CocoSource, transform: TrainTransform, seed: int):
        self.source = source
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.source)

    def sample(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """The transformed sample `index` of `epoch` (what the dataset yields for it)."""
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        return self.transform(self.source.load(index), rng)

    def __getitem__(self, global_id: int) -> tuple[np.ndarray, ...]:
        """TRAIN_COLUMNS, then the sample's own data counters (SAMPLE_COUNTS_COLUMN)."""
        epoch, index = divmod(int(global_id), len(self.source))
        with self.source.stats.capture() as counts:
            out = self.sample(epoch, index)
        return tuple(out[name] for name in TRAIN_COLUMNS) + (counts,)


def trained_batch(batch: Sequence[Any], stats: DataStats) -> tuple:
    """A training dataset's batch (a tuple, TRAIN_COLUMNS then SAMPLE_COUNTS_COLUMN) as the train
    step takes it, without the counts, which are added to `stats`: these samples are trained."""
    *columns, counts = batch
    stats.add_counts(counts.asnumpy() if hasattr(counts, "asnumpy") else counts)
    return tuple(columns)


class EvalSampleSource:
    """Random-access source for `GeneratorDataset`: index -> (image, img_meta).

    With `padded_length` > len(source), indices past the end give filler samples (image_id -1).
    """

    def __init__(self, source: CocoSource, transform: EvalTransform, padded_length: int | None = None):
        self.source = source
        self.transform = transform
        self.length = len(source) if padded_length is None else max(int(padded_length), len(source))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = int(index)
        if index >= len(self.source):
            out = self.transform.padding_sample()
        else:
            out = self.transform(self.source.load(index))
        return out["image"], out["img_meta"]


class EpochSampler(ds.Sampler):
    """MindSpore sampler yielding global ids `epoch * num_items + index`, one pass per epoch.

    Runs in the main process. Its k-th pass is epoch `start_epoch + k`; with shuffle the order
    is a permutation seeded by (seed, epoch). With num_shards > 1 each shard takes every
    num_shards-th id of the pass (padded by wrapping so all shards yield the same count).
    Copies share the pass counter (`__deepcopy__` returns the sampler itself), so every
    iterator MindSpore builds from the dataset continues the same epoch sequence.
    """

    def __init__(self, num_items: int, *, seed: int, shuffle: bool = True, start_epoch: int = 0,
                 num_shards: int = 1, shard_id: int = 0):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must lie in [0, num_shards={num_shards}), got {shard_id}")
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_shards, self.shard_id = int(num_shards), int(shard_id)
        self.next_epoch = int(start_epoch)
        self.per_shard = -(-self.num_items // self.num_shards)  # ceil division
        super().__init__(num_samples=self.per_shard)

    def epoch_ids(self, epoch: int) -> np.ndarray:
        """int64 global ids of this shard's pass for `epoch`."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        total = self.per_shard * self.num_shards
        order = np.resize(order, total)  # wraps around to pad
        return order[self.shard_id::self.num_shards].astype(np.int64) + epoch * self.num_items

    def __iter__(self) -> Iterator[int]:
        epoch = self.next_epoch
        self.next_epoch += 1
        for global_id in self.epoch_ids(epoch):
            yield int(global_id)

    def __len__(self) -> int:
        return self.per_shard

    def __deepcopy__(self, memo):
        return self


def build_train_dataset(source: CocoSource, *, augment, batch_size: int, img_height: int,
                        img_width: int, pad_divisor: int, flip_ratio: float,
                        img_mean: Sequence[float], img_std: Sequence[float], num_gts: int,
                        gt_mask_size: int, num_workers: int, seed: int, drop_remainder: bool = True,
                        start_epoch: int = 0, shuffle: bool = True, num_shards: int = 1,
                        shard_id: int = 0):
    """`mindspore.dataset` of training batches in the batch contract (module docstring).

    Args:
        source: the training `CocoSource`; its `stats` receive the pipeline's counters (the
            transform's and the InstaBoost step's must be the same object: each sample's counts
            are kept apart from it and travel with the sample, see the module docstring).
        augment: InstaBoost step (`InstaBoostAug`) or None.
        num_workers: 0 or 1 -> one in-process worker; > 1 -> that many worker processes
            (MindSpore's start method, 'fork' by default; 'spawn' works too).
        seed: base seed of the shuffle and of every sample's Generator.
        start_epoch: epoch of the first pass (resume, or a dataset built per epoch).
        num_shards, shard_id: data-parallel sharding (one shard per device).
    Other arguments: see `TrainTransform`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step_stats = getattr(augment, "stats", source.stats)
    if step_stats is not source.stats:
        raise ValueError("the InstaBoost step must count into the training source's stats "
                         "(build it with stats=source.stats)")
    transform = TrainTransform(img_height=img_height, img_width=img_width, pad_divisor=pad_divisor,
                               flip_ratio=flip_ratio, img_mean=img_mean, img_std=img_std,
                               num_gts=num_gts, gt_mask_size=gt_mask_size, augment=augment,
                               stats=source.stats)
    sampler = EpochSampler(len(source), seed=seed, shuffle=shuffle, start_epoch=start_epoch,
                           num_shards=num_shards, shard_id=shard_id)
    if drop_remainder and sampler.per_shard < batch_size:
        raise ValueError(f"{sampler.per_shard} training images per shard cannot fill one batch of "
                         f"{batch_size} with drop_remainder=True")
    workers = max(1, int(num_workers))
    dataset = ds.GeneratorDataset(TrainSampleSource(source, transform, seed),
                                  [*TRAIN_COLUMNS, SAMPLE_COUNTS_COLUMN],
                                  sampler=sampler, num_parallel_workers=workers,
                                  python_multiprocessing=workers > 1)
    return dataset.batch(batch_size, drop_remainder=drop_remainder)


def build_eval_dataset(source: CocoSource, *, batch_size: int, img_height: int, img_width: int,
                       pad_divisor: int, img_mean: Sequence[float], img_std: Sequence[float],
                       num_workers: int, pad_last_batch: bool = False):
    """`mindspore.dataset` of (image float32 (B, 3, Hp, Wp), img_meta float32 (B, 5)), in source order.

    The last batch is smaller unless `pad_last_batch` (then filler rows carry image_id -1 in
    img_meta[:, 0], to skip; fixed shapes avoid a graph recompile).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = EvalTransform(img_height=img_height, img_width=img_width, pad_divisor=pad_divisor,
                              img_mean=img_mean, img_std=img_std, stats=source.stats)
    length = len(source)
    padded = -(-length // batch_size) * batch_size if pad_last_batch else None
    workers = max(1, int(num_workers))
    dataset = ds.GeneratorDataset(EvalSampleSource(source, transform, padded), list(EVAL_COLUMNS),
                                  shuffle=False, num_parallel_workers=workers,
                                  python_multiprocessing=workers > 1)
    return dataset.batch(batch_size, drop_remainder=False)
