"""The `train` task: config -> data, detector, optimizer -> training loop with evaluation -> tracker.

This is the one place where the composed config becomes objects for a training run; everything it
calls takes explicit arguments.
"""
import json
import logging
from pathlib import Path
from typing import Dict

import mindspore as ms
import numpy as np
from omegaconf import DictConfig, OmegaConf

from instaboost.builders import build_detector, layer_impl_for, uses_cpu_kernels
from instaboost.config import GENERATED_DATASET
from instaboost.config.validate import ConfigError
from instaboost.data.coco import CocoSource
from instaboost.data.demo_data import ensure_demo_dataset
from instaboost.data.pipeline import build_eval_dataset, build_train_dataset, trained_batch
from instaboost.data.transforms import build_instaboost_step
from instaboost.engine.checkpoint import CheckpointManager
from instaboost.engine.finite import build_finite_check
from instaboost.engine.lr_schedule import multistep_with_warmup, scaled_learning_rate
from instaboost.engine.optimizer import build_sgd
from instaboost.engine.train_step import build_loss_scaler, make_train_step
from instaboost.engine.trainer import LoopSettings, Trainer
from instaboost.evaluation.coco_eval import evaluate_coco, per_category_table
from instaboost.evaluation.inference import predict_coco
from instaboost.models.layers.gemm import set_matmul_precision
from instaboost.utils.seed import sample_seed, seed_everything
from instaboost.visualization import augmentation_grid

log = logging.getLogger(__name__)

GRID_SAMPLES = 4  # training samples shown before/after augmentation in the tracker


def select_device(device_target: str) -> None:
    """``ms.set_device``; MindSpore's refusal (e.g. ``hardware=gpu`` where its GPU backend cannot
    load) becomes a ConfigError that names the key, with MindSpore's reason."""
    try:
        ms.set_device(device_target)
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or ["no reason given"])[0]
        raise ConfigError(
            f"hardware.device_target: MindSpore cannot run on {device_target!r} on this machine "
            f"({reason}). Its GPU backend needs CUDA 11.x, cuDNN 8 and MindSpore's GPU wheel; "
            f"hardware=cpu runs anywhere") from error


def train(cfg: DictConfig, *, tracker, output_dir: Path) -> Dict[str, float]:
    seed_everything(cfg.seed)
    select_device(cfg.hardware.device_target)
    if cfg.hardware.device_target == "CPU":
        # Measured at 256 px, batch 2: PyNative's asynchronous op dispatch on 2 cores costs about
        # half of a training step (11.7 s async vs 5.7 s blocking); each op runs multi-threaded anyway.
        ms.runtime.launch_blocking()
    set_matmul_precision(cfg.hardware.matmul_precision)
    train_source, val_source = build_sources(cfg)
    categories = train_source.categories
    log.info("data: %d training images, %d validation images, %d classes", len(train_source),
             len(val_source), categories.num_classes)
    if len(train_source) < cfg.schedule.batch_size:
        raise ConfigError(f"schedule.batch_size: {len(train_source)} training images "
                          f"({cfg.dataset.train_annotations}) cannot fill one batch of "
                          f"{cfg.schedule.batch_size}")

    augment = build_instaboost_step(OmegaConf.to_container(cfg.augmentation, resolve=True),
                                    stats=train_source.stats)
    label_names = categories.label_names()
    label_to_category = categories.label_to_coco_id()
    # The grid's samples are not training samples: what its loads and InstaBoost step count is
    # captured and dropped, as a training sample's counts are until it is trained on.
    with train_source.stats.capture():
        grid = sample_grid(train_source, augment, cfg.seed, label_names)
    tracker.log_image(grid, "augmentation/samples.png")

    network = build_detector(cfg.detector, cfg.backbone, num_classes=categories.num_classes,
                             conv_impl=cfg.hardware.conv_impl, seed=cfg.seed)
    schedule = cfg.schedule
    train_data = build_train_dataset(train_source, augment=augment, **data_arguments(cfg), seed=cfg.seed)
    eval_data = build_eval_dataset(val_source, batch_size=schedule.batch_size,
                                   img_height=schedule.img_height, img_width=schedule.img_width,
                                   pad_divisor=schedule.pad_divisor, img_mean=list(cfg.dataset.img_mean),
                                   img_std=list(cfg.dataset.img_std), num_workers=cfg.hardware.num_workers)

    steps_per_epoch = train_data.get_dataset_size()
    total_steps = schedule.epochs * steps_per_epoch
    if schedule.max_steps is not None:
        total_steps = min(total_steps, schedule.max_steps)
    epochs = -(-total_steps // steps_per_epoch)
    # One iterator over all epochs: the dataset's sampler numbers the epochs, so every sample's
    # augmentation seed depends on (seed, epoch, index) and workers never race on an epoch counter.
    batches = train_data.create_tuple_iterator(num_epochs=epochs)

    def epoch_batches(epoch: int):
        # Each batch's data counters are counted as it goes to the train step (not when prefetched).
        return (trained_batch(batch, train_source.stats) for batch in batches)

    lr = scaled_learning_rate(schedule.base_lr, schedule.base_batch_size, schedule.batch_size,
                              cfg.hardware.device_num)
    learning_rates = multistep_with_warmup(lr=lr, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                                           lr_steps=list(schedule.lr_steps), warmup_steps=schedule.warmup_steps,
                                           warmup_ratio=schedule.warmup_ratio)
    optimizer = build_sgd(network.trainable_params(), learning_rate=ms.Tensor(learning_rates),
                          momentum=schedule.momentum, weight_decay=schedule.weight_decay,
                          impl=layer_impl_for(cfg.hardware.conv_impl))
    step_fn = make_train_step(network.forward_train, optimizer, loss_names=network.loss_names,
                              scaler=build_loss_scaler(schedule.loss_scale_type, schedule.loss_scale),
                              clip_norm=schedule.grad_clip or None,
                              finite_check=build_finite_check(uses_cpu_kernels(cfg.hardware.conv_impl)))
    checkpoints = CheckpointManager(output_dir / "checkpoints", keep_latest=schedule.keep_checkpoint_max,
                                    keep_best=schedule.keep_best_checkpoints_max)
    results_path = output_dir / "coco_results.json"
    table_path = output_dir / "per_category_ap.md"

    def evaluate() -> Dict[str, float]:
        results, image_ids = predict_coco(network, eval_data.create_tuple_iterator(num_epochs=1),
                                          label_to_category=label_to_category,
                                          mask_threshold=cfg.detector.test_cfg.rcnn.mask_thr_binary)
        metrics, per_category, summary = evaluate_coco(val_source.coco, results, image_ids)
        results_path.write_text(json.dumps(results))
        table_path.write_text(per_category_table(per_category))
        log.info("COCO evaluation on %d images, %d detections\n%s", len(image_ids), len(results), summary)
        return metrics

    settings = LoopSettings(epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                            batch_size=schedule.batch_size, log_every_steps=schedule.log_every_steps,
                            ckpt_every_steps=schedule.ckpt_every_steps, eval_every_epochs=schedule.eval_every)
    log.info("training %d steps (%d epochs of %d), lr %.5f, batch %d, %dx%d, conv %s, matmul %s",
             total_steps, epochs, steps_per_epoch, lr, schedule.batch_size, schedule.img_height,
             schedule.img_width, cfg.hardware.conv_impl, cfg.hardware.matmul_precision)
    trainer = Trainer(network=network, optimizer=optimizer, train_step=step_fn, loss_names=network.loss_names,
                      epoch_batches=epoch_batches, evaluate=evaluate, checkpoints=checkpoints,
                      tracker=tracker, settings=settings, learning_rates=learning_rates)
    metrics = trainer.fit()

    data_counts = train_source.stats.as_dict(prefix="data/")
    # Evaluation counts into the validation source's counters (its own json, even in one folder).
    data_counts["data/eval_samples"] = val_source.stats.get("eval_samples")
    tracker.log_metrics({k: float(v) for k, v in data_counts.items()}, step=trainer.step)
    for path in checkpoints.kept():
        tracker.log_artifact(path, "checkpoints")
    for path in (results_path, table_path):
        if path.exists():
            tracker.log_artifact(path, "evaluation")
    return metrics


def build_sources(cfg: DictConfig):
    """Training and validation sources; the demo dataset is generated on first use."""
    data = cfg.dataset
    if data.name == GENERATED_DATASET:
        ensure_demo_dataset(Path(data.root), num_train=data.num_train, num_val=data.num_val,
                            image_size=data.image_size, seed=data.demo_seed)
    train_source = CocoSource(Path(data.train_images), Path(data.train_annotations), max_images=data.max_images)
    val_source = CocoSource(Path(data.val_images), Path(data.val_annotations), max_images=data.max_images)
    if val_source.categories.coco_ids != train_source.categories.coco_ids:
        raise ValueError(f"dataset: the categories of {data.val_annotations} differ from those of "
                         f"{data.train_annotations}; labels would not match")
    return train_source, val_source


def data_arguments(cfg: DictConfig) -> dict:
    schedule, data = cfg.schedule, cfg.dataset
    return dict(batch_size=schedule.batch_size, img_height=schedule.img_height, img_width=schedule.img_width,
                pad_divisor=schedule.pad_divisor, flip_ratio=data.flip_ratio, img_mean=list(data.img_mean),
                img_std=list(data.img_std), num_gts=cfg.detector.num_gts, gt_mask_size=cfg.detector.gt_mask_size,
                num_workers=cfg.hardware.num_workers)


def sample_grid(source, augment, seed: int, names) -> np.ndarray:
    """The first training samples before and after this run's InstaBoost step, as training sees them
    in epoch 0 (same per-sample seed, so at aug_prob 0.5 about half of them change)."""
    pairs = []
    for index in range(min(GRID_SAMPLES, len(source))):
        before = source.load(index)
        after = before if augment is None else augment(before, np.random.default_rng(sample_seed(seed, 0, index)))
        pairs.append((before, after))
    return augmentation_grid(pairs, names)
