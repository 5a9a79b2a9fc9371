"""Semantic checks of a composed config, run right after composition, before any data is read.

Types and unknown keys are already enforced by the schemas (:mod:`instaboost.config.schema`);
this module checks what a type cannot say: probabilities in [0, 1], ``action_prob`` summing to
one, ordered ranges, image sizes divisible by the padding divisor, known names.

Every problem is reported as ``"<dotted.key>: <message>"``; :func:`validate` collects all of
them and raises one :class:`ConfigError` whose message starts with the first offending key.
:func:`check_input_paths` then checks that the files the config names exist (the dataset's, a
pretrained backbone's), so that a typo fails before MindSpore loads or any data is read.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Sequence
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from instaboost.config import GENERATED_DATASET, TRACKING_URI_ENV, requested_tracking_uri

# Tolerance of sum(action_prob) == 1 (instaboostfast asserts exact equality; floats from a
# command line such as 0.7,0.2,0.1 sum to 1 only within rounding).
ACTION_PROB_TOLERANCE = 1e-6
INSTABOOST_ACTIONS = ("normal", "horizontal", "vertical", "skip")
INSTABOOST_ENGINES = ("project", "instaboostfast")
CONV_IMPLS = ("native", "unfold", "winograd")
MATMUL_PRECISIONS = ("float32", "bfloat16")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
NORMS = ("bn", "frozen_bn")
LOSS_SCALE_TYPES = ("static", "dynamic", "none")
BACKBONE_TYPES = ("resnet", "resnext")  # ResNeXt = grouped 3x3 convolutions (groups > 1)
# Bottleneck ResNets: their C2..C5 have 256/512/1024/2048 channels, what the FPN expects.
RESNET_DEPTHS = (50, 101, 152)
DETECTOR_NAMES = ("mask_rcnn",)  # what instaboost.builders.build_detector builds
RESNET_STAGES = 4  # backbone outputs C2..C5, one FPN input each
# frozen_stages: -1 trains everything; 0 freezes the stem; k freezes the stem and stages 1..k.
FROZEN_STAGES_RANGE = (-1, 4)
BOX_CODER_LEN = 4
IMG_CHANNELS = 3
# The RoIAlign takes sampling_ratio x sampling_ratio samples per bin (mmdetection's adaptive 0,
# a count per RoI, is not supported).
MIN_SAMPLING_RATIO = 1
# The mask head's 2x2 stride-2 deconvolution doubles its RoI features' side.
MASK_UPSAMPLE_FACTOR = 2
# Tracking URIs of MLflow's file store (a path, or file:): MLflow 3 refuses to open one unless
# this variable is "true".
FILE_STORE_SCHEMES = ("", "file")
# Store names MLflow reads as such, not as a path.
NAMED_STORES = ("databricks", "databricks-uc", "uc")
ALLOW_FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"


class ConfigError(ValueError):
    """A config value is unusable. ``errors`` holds one ``"<key>: <message>"`` per problem."""

    def __init__(self, *errors: str):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def validate(cfg: DictConfig) -> None:
    """Check ``cfg`` (the composed config, without the ``hydra`` node) or raise ConfigError."""
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise ConfigError(
            *(f"{key}: mandatory value is missing; pass it as {key}=<value>" for key in missing)
        )
    undeclared = sorted(_undeclared_keys(cfg))
    if undeclared:
        raise ConfigError(
            *(f"{key}: not a key of its schema (added with '+'? a misspelt key would change "
              f"nothing); see `python run.py --cfg job` for the keys" for key in undeclared)
        )
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as err:
        raise ConfigError(f"{err.full_key}: cannot resolve interpolation ({err.msg})") from err
    checker = _Checker(resolved)
    for check in (
        _check_top,
        _check_detector,
        _check_backbone,
        _check_augmentation,
        _check_schedule,
        _check_hardware,
        _check_dataset,
        _check_tracking,
    ):
        check(checker)
    if checker.errors:
        raise ConfigError(*checker.errors)


def _missing_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys holding ``???`` (interpolations are not followed)."""
    if isinstance(node, DictConfig):
        items: Iterable = ((str(k), k) for k in node.keys())
    elif isinstance(node, ListConfig):
        items = ((str(i), i) for i in range(len(node)))
    else:
        return
    for name, key in items:
        dotted = f"{prefix}.{name}" if prefix else name
        if OmegaConf.is_missing(node, key):
            yield dotted
        elif not OmegaConf.is_interpolation(node, key):
            yield from _missing_keys(node._get_node(key), dotted)


def _undeclared_keys(node: DictConfig, prefix: str = "") -> Iterator[str]:
    """Dotted keys their node's schema does not declare. A typed node refuses an unknown key at
    composition, but ``+group.key=value`` appends one anyway (Hydra opens the node for it)."""
    schema = OmegaConf.get_type(node)
    declared = ({field.name for field in dataclasses.fields(schema)}
                if dataclasses.is_dataclass(schema) else None)
    for key in node.keys():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if declared is not None and key not in declared:
            yield dotted
        elif not (OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key)):
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                yield from _undeclared_keys(child, dotted)


class _Checker:
    """Reads values by dotted key from a resolved container and records problems."""

    def __init__(self, resolved: Mapping[str, Any]):
        self.cfg = resolved
        self.errors: List[str] = []

    def get(self, key: str) -> Any:
        node: Any = self.cfg
        for part in key.split("."):
            node = node[part]
        return node

    def fail(self, key: str, message: str) -> None:
        self.errors.append(f"{key}: {message}")

    def require(self, key: str, predicate: Callable[[Any], bool], message: str) -> bool:
        value = self.get(key)
        ok = predicate(value)
        if not ok:
            self.fail(key, f"{message} (got {value!r})")
        return ok

    # -- helpers --------------------------------------------------------------------------
    def positive(self, *keys: str) -> None:
        for key in keys:
            self.require(key, lambda v: v > 0, "must be > 0")

    def non_negative(self, *keys: str) -> None:
        for key in keys:
            self.require(key, lambda v: v >= 0, "must be >= 0")

    def probability(self, *keys: str) -> None:
        for key in keys:
            self.require(key, lambda v: 0.0 <= v <= 1.0, "must be a probability in [0, 1]")

    def optional_positive(self, *keys: str) -> None:
        for key in keys:
            self.require(key, lambda v: v is None or v > 0, "must be null or > 0")

    def one_of(self, key: str, choices: Sequence[Any]) -> None:
        self.require(key, lambda v: v in choices, f"must be one of {list(choices)}")

    def length(self, key: str, size: int) -> bool:
        return self.require(key, lambda v: len(v) == size, f"must have {size} entries")

    def min_max(self, key: str) -> None:
        """A [min, max] pair with min <= max."""
        if self.length(key, 2):
            self.require(key, lambda v: v[0] <= v[1], "must be [min, max] with min <= max")

    def all_positive(self, key: str) -> None:
        self.require(key, lambda v: all(x > 0 for x in v), "every entry must be > 0")

    def increasing(self, key: str) -> None:
        self.require(
            key,
            lambda v: all(a < b for a, b in zip(v, list(v)[1:])),
            "must be strictly increasing",
        )

    def not_empty(self, key: str) -> None:
        self.require(key, lambda v: bool(v) and bool(str(v).strip()), "must not be empty")


def _check_top(c: _Checker) -> None:
    c.not_empty("task")
    c.non_negative("seed")


def _check_detector(c: _Checker) -> None:
    d = "detector"
    c.one_of(f"{d}.name", DETECTOR_NAMES)
    c.positive(
        f"{d}.num_gts",
        f"{d}.gt_mask_size",
        f"{d}.neck.out_channels",
        f"{d}.neck.num_outs",
        f"{d}.rpn.feat_channels",
        f"{d}.roi.finest_scale",
        f"{d}.bbox_head.roi_feat_size",
        f"{d}.bbox_head.fc_out_channels",
        f"{d}.mask_head.roi_feat_size",
        f"{d}.mask_head.num_convs",
        f"{d}.mask_head.conv_out_channels",
        f"{d}.mask_head.mask_size",
        f"{d}.train_cfg.rcnn.mask_max_pos",
        f"{d}.test_cfg.rcnn.max_per_img",
    )
    c.require(f"{d}.roi.sampling_ratio", lambda v: v >= MIN_SAMPLING_RATIO,
              f"must be >= {MIN_SAMPLING_RATIO}: RoIAlign samples per bin side (mmdetection's "
              "adaptive 0 is not supported; its Mask R-CNN results use 2 here)")
    feat_size = c.get(f"{d}.mask_head.roi_feat_size")
    c.require(f"{d}.mask_head.mask_size", lambda v: v == MASK_UPSAMPLE_FACTOR * feat_size,
              f"must be {MASK_UPSAMPLE_FACTOR} x detector.mask_head.roi_feat_size={feat_size} "
              "(the mask head's deconvolution doubles its RoI features' side)")
    for key in ("rpn.anchor_scales", "rpn.anchor_ratios", "rpn.anchor_strides",
                "roi.featmap_strides"):
        c.require(f"{d}.{key}", lambda v: len(v) > 0, "must not be empty")
        c.all_positive(f"{d}.{key}")
    c.increasing(f"{d}.rpn.anchor_strides")
    c.increasing(f"{d}.roi.featmap_strides")
    c.require(f"{d}.train_cfg.rpn.sampler.add_gt_as_proposals", lambda v: not v,
              "must be false: the RPN samples anchors, and GT boxes are added to the RCNN's "
              "proposals only (detector.train_cfg.rcnn.sampler.add_gt_as_proposals)")
    num_outs = c.get(f"{d}.neck.num_outs")
    c.require(f"{d}.neck.num_outs", lambda v: v is None or v >= RESNET_STAGES,
              f"must be >= {RESNET_STAGES}, one FPN output per ResNet stage and the extra levels")
    c.require(
        f"{d}.rpn.anchor_strides",
        lambda v: len(v) == num_outs,
        f"needs one stride per FPN output (detector.neck.num_outs={num_outs})",
    )
    for head in ("rpn", "bbox_head"):
        c.length(f"{d}.{head}.target_means", BOX_CODER_LEN)
        if c.length(f"{d}.{head}.target_stds", BOX_CODER_LEN):
            c.all_positive(f"{d}.{head}.target_stds")
    c.non_negative(
        f"{d}.rpn.loss_cls_weight",
        f"{d}.rpn.loss_bbox_weight",
        f"{d}.bbox_head.loss_cls_weight",
        f"{d}.bbox_head.loss_bbox_weight",
        f"{d}.mask_head.loss_weight",
    )
    for stage in ("rpn", "rcnn"):
        base = f"{d}.train_cfg.{stage}"
        c.probability(
            f"{base}.assigner.pos_iou_thr",
            f"{base}.assigner.neg_iou_thr",
            f"{base}.assigner.min_pos_iou",
            f"{base}.sampler.pos_fraction",
        )
        neg = c.get(f"{base}.assigner.neg_iou_thr")
        c.require(
            f"{base}.assigner.pos_iou_thr",
            lambda v, neg=neg: v >= neg,
            f"must be >= neg_iou_thr ({neg})",
        )
        c.positive(f"{base}.sampler.num")
    c.probability(f"{d}.train_cfg.rcnn.ignore_iof_thr")
    for proposal in ("train_cfg.rpn_proposal", "test_cfg.rpn"):
        base = f"{d}.{proposal}"
        c.positive(f"{base}.nms_pre", f"{base}.max_per_img")
        c.probability(f"{base}.iou_threshold")
        c.non_negative(f"{base}.min_bbox_size")
    c.probability(
        f"{d}.test_cfg.rcnn.score_thr",
        f"{d}.test_cfg.rcnn.iou_threshold",
        f"{d}.test_cfg.rcnn.mask_thr_binary",
    )


def _check_backbone(c: _Checker) -> None:
    b = "backbone"
    c.one_of(f"{b}.type", BACKBONE_TYPES)
    c.one_of(f"{b}.depth", RESNET_DEPTHS)
    c.one_of(f"{b}.norm", NORMS)
    c.positive(f"{b}.groups", f"{b}.base_width")
    grouped = c.get(f"{b}.groups") > 1
    c.require(f"{b}.type", lambda v: (v == "resnext") == grouped,
              "must be 'resnext' exactly when backbone.groups > 1")
    low, high = FROZEN_STAGES_RANGE
    stages_ok = c.require(f"{b}.frozen_stages", lambda v: low <= v <= high,
                          f"must be in [{low}, {high}]")
    c.require(f"{b}.pretrained", lambda v: v is None or bool(str(v).strip()),
              "must be null or a checkpoint path")
    if not c.get(f"{b}.pretrained"):
        # What only a pretrained backbone has to keep: from scratch the batch norms' running
        # statistics stay at mean 0 and variance 1 (no normalisation at all), and frozen stages
        # keep their random initial weights.
        need = "set backbone.pretrained=<MindSpore .ckpt of backbone weights>"
        if c.get(f"{b}.norm_eval"):
            c.fail(f"{b}.norm_eval", "keeps the running statistics of a pretrained backbone "
                   f"(from scratch they stay mean 0, variance 1: no normalisation); {need}")
        if c.get(f"{b}.norm") == "frozen_bn":
            c.fail(f"{b}.norm", f"frozen_bn keeps a pretrained backbone's statistics and scales; {need}")
        if stages_ok and c.get(f"{b}.frozen_stages") >= 0:
            c.fail(f"{b}.frozen_stages", f"freezes stages of a pretrained backbone (from scratch: "
                   f"its random weights); {need}")


def _check_augmentation(c: _Checker) -> None:
    a = "augmentation"
    c.one_of(f"{a}.engine", INSTABOOST_ENGINES)
    c.probability(f"{a}.aug_prob", f"{a}.color_prob")
    actions = list(c.get(f"{a}.action_candidate"))
    probs = list(c.get(f"{a}.action_prob"))
    if not actions:
        c.fail(f"{a}.action_candidate", "must name at least one action")
    unknown = [name for name in actions if name not in INSTABOOST_ACTIONS]
    if unknown:
        c.fail(f"{a}.action_candidate",
               f"unknown actions {unknown}; known: {list(INSTABOOST_ACTIONS)}")
    if len(set(actions)) != len(actions):
        c.fail(f"{a}.action_candidate", f"actions must be distinct (got {actions})")
    if len(probs) != len(actions):
        c.fail(f"{a}.action_prob",
               f"needs one probability per action_candidate entry ({len(probs)} vs {len(actions)})")
    if any(not 0.0 <= p <= 1.0 for p in probs):
        c.fail(f"{a}.action_prob", f"every entry must be in [0, 1] (got {probs})")
    elif not math.isclose(sum(probs), 1.0, rel_tol=0.0, abs_tol=ACTION_PROB_TOLERANCE):
        c.fail(f"{a}.action_prob",
               f"must sum to 1 within {ACTION_PROB_TOLERANCE} (got sum {sum(probs)!r})")
    c.positive(f"{a}.dx", f"{a}.dy")
    c.min_max(f"{a}.scale")
    c.all_positive(f"{a}.scale")
    c.min_max(f"{a}.theta")
    if c.get(f"{a}.engine") == "instaboostfast":
        # instaboostfast draws whole degrees (random.randint): a fraction cannot reach it.
        c.require(f"{a}.theta", lambda v: all(float(t) == int(t) for t in v),
                  "must be whole degrees with augmentation.engine=instaboostfast")


def _check_schedule(c: _Checker) -> None:
    s = "schedule"
    c.positive(
        f"{s}.epochs",
        f"{s}.batch_size",
        f"{s}.img_height",
        f"{s}.img_width",
        f"{s}.pad_divisor",
        f"{s}.base_lr",
        f"{s}.base_batch_size",
        f"{s}.loss_scale",
        f"{s}.eval_every",
        f"{s}.log_every_steps",
        f"{s}.ckpt_every_steps",
    )
    c.optional_positive(f"{s}.max_steps")
    # keep_checkpoint_max: at least the final weights are kept (0 would delete them as well).
    c.positive(f"{s}.keep_checkpoint_max")
    c.non_negative(f"{s}.weight_decay", f"{s}.warmup_steps", f"{s}.grad_clip",
                   f"{s}.keep_best_checkpoints_max")
    c.require(f"{s}.momentum", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
    c.require(f"{s}.warmup_ratio", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
    divisor = c.get(f"{s}.pad_divisor")
    if divisor > 0:
        for side in ("img_height", "img_width"):
            c.require(f"{s}.{side}", lambda v: v % divisor == 0,
                      f"must be divisible by schedule.pad_divisor={divisor}")
    c.all_positive(f"{s}.lr_steps")
    c.increasing(f"{s}.lr_steps")
    epochs = c.get(f"{s}.epochs")
    if epochs > 0:
        c.require(f"{s}.lr_steps", lambda v: all(step < epochs for step in v),
                  f"every entry must be < schedule.epochs={epochs}: the learning rate is divided "
                  "by 10 when each listed epoch starts, and one at or past the last epoch never "
                  "comes (shorten lr_steps with epochs, or set [])")
    c.one_of(f"{s}.loss_scale_type", LOSS_SCALE_TYPES)


def _check_hardware(c: _Checker) -> None:
    h = "hardware"
    c.one_of(f"{h}.device_target", DEVICE_TARGETS)
    c.one_of(f"{h}.conv_impl", CONV_IMPLS)
    # The Winograd transforms are C++ kernels for host memory (MindSpore AOT ops for the CPU).
    if c.get(f"{h}.conv_impl") == "winograd" and c.get(f"{h}.device_target") in DEVICE_TARGETS:
        c.require(f"{h}.device_target", lambda v: v == "CPU",
                  "must be CPU with hardware.conv_impl=winograd (a CPU-only kernel)")
    c.one_of(f"{h}.matmul_precision", MATMUL_PRECISIONS)
    # bfloat16 products exist only in the project's matmul kernel (MindSpore's CPU MatMul has
    # none), which only conv_impl=winograd uses.
    if c.get(f"{h}.matmul_precision") == "bfloat16":
        c.require(f"{h}.conv_impl", lambda v: v == "winograd",
                  "must be winograd with hardware.matmul_precision=bfloat16 (the bfloat16 "
                  "products are the project's C++ matmul kernel)")
    c.positive(f"{h}.num_workers")
    # The key exists so the learning rate already scales with it; the train task has no gradient
    # reducer or data sharding yet, so more than one device is refused rather than silently wrong.
    c.require(f"{h}.device_num", lambda v: v == 1, "must be 1: data-parallel training is not available yet")


def _check_dataset(c: _Checker) -> None:
    ds = "dataset"
    for key in ("name", "train_images", "train_annotations", "val_images", "val_annotations"):
        c.not_empty(f"{ds}.{key}")
    c.optional_positive(f"{ds}.max_images")
    c.probability(f"{ds}.flip_ratio")
    c.length(f"{ds}.img_mean", IMG_CHANNELS)
    if c.length(f"{ds}.img_std", IMG_CHANNELS):
        c.all_positive(f"{ds}.img_std")
    for key in ("num_train", "num_val", "image_size"):
        if key in c.get(ds):
            c.positive(f"{ds}.{key}")


def _check_tracking(c: _Checker) -> None:
    c.not_empty("tracking.experiment_name")
    for key in ("uri", "run_name", "artifact_root"):
        c.require(f"tracking.{key}", lambda v: v is None or bool(str(v).strip()),
                  "must be null or a non-empty string")
    setting = c.get("tracking.uri")
    source = "" if setting else f"null takes {TRACKING_URI_ENV} from the environment: "
    uri = requested_tracking_uri(setting)
    if (uri and str(uri) not in NAMED_STORES and urlparse(str(uri)).scheme in FILE_STORE_SCHEMES
            and os.environ.get(ALLOW_FILE_STORE_ENV, "").lower() != "true"):
        c.fail("tracking.uri", f"{source}{uri!r} is MLflow's file store, which MLflow 3 does not "
               f"open (set {ALLOW_FILE_STORE_ENV}=true to allow it); use "
               "sqlite:////<absolute path>.db, a tracking server's http(s):// address, or null "
               "for the SQLite store in paths.output_root")


def check_input_paths(cfg: DictConfig) -> None:
    """Raise ConfigError, naming each key and path, for the input files and folders of ``cfg``
    (a validated config) that do not exist: the dataset's (except the generated demo set's) and
    ``backbone.pretrained``."""
    expected = []   # (key, value, "folder" or "file")
    if cfg.dataset.name != GENERATED_DATASET:
        expected += [(f"dataset.{key}", cfg.dataset[key], "folder")
                     for key in ("train_images", "val_images")]
        expected += [(f"dataset.{key}", cfg.dataset[key], "file")
                     for key in ("train_annotations", "val_annotations")]
    if cfg.backbone.pretrained:
        expected.append(("backbone.pretrained", cfg.backbone.pretrained, "file"))
    exists = {"folder": Path.is_dir, "file": Path.is_file}
    errors = [f"{key}: {kind} {value} does not exist" for key, value, kind in expected
              if not exists[kind](Path(str(value)).expanduser())]
    if errors:
        raise ConfigError(*errors)


__all__ = ["ConfigError", "check_input_paths", "validate"]
