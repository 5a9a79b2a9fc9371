"""Typed schemas of the Hydra config tree (``conf/``).

Each group's yaml starts with a defaults list naming its schema (``- <name>_schema`` then
``- _self_``), so Hydra merges the yaml into a typed structured config: an unknown key or a
value of the wrong type fails at composition, before any data is read. Semantic checks
(ranges, sums, known names) live in :mod:`instaboost.config.validate`.

Defaults below are the seed recipe's values (Mask R-CNN R50 FPN, InstaBoost 4x); the yaml files
spell every value out again so a reader sees the whole option in one file.

Registered names (group / name):
    config_schema                 top level (task, seed, paths)
    detector/mask_rcnn_schema     DetectorConfig
    backbone/resnet_schema        BackboneConfig
    augmentation/augmentation_schema  AugmentationConfig
    schedule/schedule_schema      ScheduleConfig
    hardware/hardware_schema      HardwareConfig
    dataset/demo_schema, dataset/coco_folder_schema, dataset/coco2017_schema
    tracking/mlflow_schema        TrackingConfig
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# ----------------------------------------------------------------------------- detector


@dataclass
class NeckConfig:
    """FPN neck: ``num_outs`` maps P2..P6 of ``out_channels`` channels each."""

    out_channels: int = 256
    num_outs: int = 5


@dataclass
class RpnConfig:
    """RPN head, anchors and its box coder / loss weights (seed section ``rpn``)."""

    feat_channels: int = 256
    anchor_scales: List[float] = field(default_factory=lambda: [8.0])
    anchor_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    anchor_strides: List[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    target_means: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    target_stds: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0


@dataclass
class RoiConfig:
    """RoIAlign extractor: FPN level of a RoI = floor(log2(sqrt(area) / finest_scale))."""

    featmap_strides: List[int] = field(default_factory=lambda: [4, 8, 16, 32])
    finest_scale: int = 56
    sampling_ratio: int = 2


@dataclass
class BBoxHeadConfig:
    """Shared 2-fc box head, box coder and loss weights."""

    roi_feat_size: int = 7
    fc_out_channels: int = 1024
    reg_class_agnostic: bool = False
    target_means: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    target_stds: List[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0


@dataclass
class MaskHeadConfig:
    """FCN mask head: ``num_convs`` 3x3 convs, 2x deconv, ``mask_size`` x ``mask_size`` logits."""

    roi_feat_size: int = 14
    num_convs: int = 4
    conv_out_channels: int = 256
    mask_size: int = 28
    loss_weight: float = 1.0


@dataclass
class AssignerConfig:
    """Max-IoU assigner thresholds."""

    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.5
    match_low_quality: bool = True


@dataclass
class SamplerConfig:
    """Random sampler: ``num`` samples per image, at most ``pos_fraction`` positives."""

    num: int = 512
    pos_fraction: float = 0.25
    add_gt_as_proposals: bool = False


@dataclass
class ProposalConfig:
    """Proposal generation: top ``nms_pre`` per level, NMS, keep ``max_per_img``."""

    nms_pre: int = 1000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0


@dataclass
class RpnTrainConfig:
    assigner: AssignerConfig = field(
        default_factory=lambda: AssignerConfig(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
    )
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(num=256, pos_fraction=0.5)
    )


@dataclass
class RcnnTrainConfig:
    assigner: AssignerConfig = field(default_factory=AssignerConfig)
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(num=512, pos_fraction=0.25, add_gt_as_proposals=True)
    )
    mask_max_pos: int = 128
    ignore_iof_thr: float = 0.5


@dataclass
class TrainCfg:
    rpn: RpnTrainConfig = field(default_factory=RpnTrainConfig)
    rpn_proposal: ProposalConfig = field(
        default_factory=lambda: ProposalConfig(nms_pre=2000, max_per_img=1000)
    )
    rcnn: RcnnTrainConfig = field(default_factory=RcnnTrainConfig)


@dataclass
class RcnnTestConfig:
    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    mask_thr_binary: float = 0.5


@dataclass
class TestCfg:
    rpn: ProposalConfig = field(default_factory=ProposalConfig)
    rcnn: RcnnTestConfig = field(default_factory=RcnnTestConfig)


@dataclass
class DetectorConfig:
    """Mask R-CNN with FPN (seed names). ``num_gts`` = G of the batch contract."""

    name: str = "mask_rcnn"
    num_gts: int = 100
    gt_mask_size: int = 56
    neck: NeckConfig = field(default_factory=NeckConfig)
    rpn: RpnConfig = field(default_factory=RpnConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    bbox_head: BBoxHeadConfig = field(default_factory=BBoxHeadConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    train_cfg: TrainCfg = field(default_factory=TrainCfg)
    test_cfg: TestCfg = field(default_factory=TestCfg)


# ----------------------------------------------------------------------------- backbone


@dataclass
class BackboneConfig:
    """ResNet backbone. ``pretrained``: path of a MindSpore .ckpt of backbone weights or None."""

    name: str = "resnet50"
    type: str = "resnet"
    depth: int = 50
    groups: int = 1
    base_width: int = 64
    norm: str = "bn"
    norm_eval: bool = False
    frozen_stages: int = -1
    pretrained: Optional[str] = None


# ----------------------------------------------------------------------------- augmentation


@dataclass
class AugmentationConfig:
    """InstaBoost parameters under the seed's names (``aug_prob`` 0 turns it off)."""

    name: str = "instaboost"
    engine: str = "project"
    aug_prob: float = 0.5
    action_candidate: List[str] = field(default_factory=lambda: ["normal", "horizontal", "skip"])
    action_prob: List[float] = field(default_factory=lambda: [1.0, 0.0, 0.0])
    scale: List[float] = field(default_factory=lambda: [0.8, 1.2])
    dx: float = 15.0
    dy: float = 15.0
    theta: List[float] = field(default_factory=lambda: [-1.0, 1.0])
    color_prob: float = 0.5
    heatmap_flag: bool = False


# ----------------------------------------------------------------------------- schedule


@dataclass
class ScheduleConfig:
    """Optimisation schedule; lr = base_lr * batch_size * device_num / base_batch_size.

    ``lr_steps`` are epochs at which lr is divided by 10; ``max_steps`` (int) caps the total
    number of steps; ``grad_clip`` 0 turns clipping off.
    """

    name: str = "1x"
    epochs: int = 12
    max_steps: Optional[int] = None
    batch_size: int = 2
    img_height: int = 1024
    img_width: int = 1024
    pad_divisor: int = 64
    base_lr: float = 0.02
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 0.0001   # on every trained parameter, norms' gamma/beta too (mmdetection)
    warmup_steps: int = 500
    warmup_ratio: float = 0.001
    lr_steps: List[int] = field(default_factory=lambda: [8, 11])
    grad_clip: float = 0.0
    loss_scale_type: str = "static"
    loss_scale: float = 1.0
    eval_every: int = 1
    log_every_steps: int = 10
    ckpt_every_steps: int = 100
    keep_checkpoint_max: int = 5
    keep_best_checkpoints_max: int = 5


# ----------------------------------------------------------------------------- hardware


@dataclass
class HardwareConfig:
    """Device and execution: ``conv_impl`` "winograd" / "unfold" are the fast CPU convolutions;
    ``matmul_precision`` "bfloat16" rounds the operands of the C++ matmul kernel's products."""

    name: str = "cpu"
    device_target: str = "CPU"
    conv_impl: str = "winograd"
    matmul_precision: str = "float32"
    num_workers: int = 2
    device_num: int = 1


# ----------------------------------------------------------------------------- dataset


@dataclass
class DatasetConfig:
    """Keys every dataset option provides to the loader (COCO json + image folders)."""

    name: str = MISSING
    train_images: str = MISSING
    train_annotations: str = MISSING
    val_images: str = MISSING
    val_annotations: str = MISSING
    max_images: Optional[int] = None
    flip_ratio: float = 0.5
    img_mean: List[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    img_std: List[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])


@dataclass
class DemoDatasetConfig(DatasetConfig):
    """Synthetic COCO-format dataset generated under ``root`` on first use."""

    root: str = MISSING
    num_train: int = 48
    num_val: int = 16
    image_size: int = 256
    demo_seed: int = 0


@dataclass
class CocoFolderDatasetConfig(DatasetConfig):
    """A folder with ``images/`` and ``annotations.json`` (val defaults to the train folder)."""

    train_root: str = MISSING
    val_root: str = MISSING


@dataclass
class Coco2017DatasetConfig(DatasetConfig):
    """The official COCO 2017 layout under ``root``."""

    root: str = MISSING


# ----------------------------------------------------------------------------- tracking


@dataclass
class TrackingConfig:
    """MLflow store. ``uri`` None -> env MLFLOW_TRACKING_URI, else sqlite in paths.output_root."""

    uri: Optional[str] = None
    experiment_name: str = "instaboost"
    run_name: Optional[str] = None
    artifact_root: Optional[str] = None


# ----------------------------------------------------------------------------- top level


@dataclass
class PathsConfig:
    output_root: str = MISSING
    cache_dir: str = MISSING


@dataclass
class Config:
    """Top level. Group nodes are typed by their own schemas (Any here keeps them open to
    every option of the group, e.g. the dataset variants)."""

    task: str = "train"
    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig)
    detector: Any = MISSING
    backbone: Any = MISSING
    augmentation: Any = MISSING
    schedule: Any = MISSING
    hardware: Any = MISSING
    dataset: Any = MISSING
    tracking: Any = MISSING


# Each schema by the name its yaml files put first in their defaults list. They are stored at
# the top level, not in their groups, so that neither `--help` nor a `group=...` override offers
# a bare schema as an option: a group's yaml pulls its schema in as `/name@_here_`.
SCHEMAS = {
    "config_schema": Config,
    "mask_rcnn_schema": DetectorConfig,
    "resnet_schema": BackboneConfig,
    "augmentation_schema": AugmentationConfig,
    "schedule_schema": ScheduleConfig,
    "hardware_schema": HardwareConfig,
    "demo_schema": DemoDatasetConfig,
    "coco_folder_schema": CocoFolderDatasetConfig,
    "coco2017_schema": Coco2017DatasetConfig,
    "mlflow_schema": TrackingConfig,
}


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent: re-storing replaces)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)
