"""Turn config sections into model objects (the one place where config meets model code).

Sections are read with ``cfg["key"]`` so plain dicts and OmegaConf DictConfigs both work; key
names are the seed's (see docs of ``conf/detector/mask_rcnn.yaml`` and
``conf/backbone/resnet50.yaml``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from instaboost.config.validate import DETECTOR_NAMES
from instaboost.models.anchors import AnchorGenerator
from instaboost.models.assigner import MaxIoUAssigner
from instaboost.models.backbone.resnet import ResNet
from instaboost.models.bbox_head import Shared2FCBBoxHead
from instaboost.models.box_coder import DeltaXYWHBoxCoder
from instaboost.models.detector import MaskRCNN
from instaboost.models.layers.native_kernels import layer_impl_for, uses_cpu_kernels
from instaboost.models.mask_head import FCNMaskHead
from instaboost.models.necks.fpn import FPN
from instaboost.models.roi_extractor import RoIExtractor
from instaboost.models.roi_heads import StandardRoIHeads
from instaboost.models.rpn import ProposalConfig, RPNHead
from instaboost.models.sampler import RandomSampler

# The RCNN sampler's seed is offset from the RPN sampler's so their random streams differ.
RCNN_SAMPLER_SEED_OFFSET = 1000
# RoIAlign implementation: the gather path is exact (same numerics as ops.ROIAlign) and has a
# correct, fast backward on any device; MindSpore 2.10's CPU ROIAlign backward gives wrong
# gradients. With conv_impl "winograd" the project's C++ CPU kernels are in use, and RoIAlign
# runs on its C++ kernel too (same grid, 2-2.5x faster forward+backward, measured), the box
# head's two shared FCs run on the C++ matmul kernel (layers/linear.py), the NMS of the
# proposals and detections runs on its kernel (layers/nms.py), so do the max-IoU assignments
# (models/assigner.py), and the train step checks its gradients with one kernel call
# (engine/finite.py).
DEFAULT_ROI_ALIGN_IMPL = "gather"
ROI_ALIGN_IMPL_WITH_CPU_KERNELS = "kernel"


def _proposal_cfg(section: Mapping[str, Any]) -> ProposalConfig:
    return ProposalConfig(nms_pre=int(section["nms_pre"]),
                          max_per_img=int(section["max_per_img"]),
                          iou_threshold=float(section["iou_threshold"]),
                          min_bbox_size=float(section["min_bbox_size"]))


def _assigner(section: Mapping[str, Any], ignore_iof_thr: float, impl: str) -> MaxIoUAssigner:
    return MaxIoUAssigner(pos_iou_thr=float(section["pos_iou_thr"]),
                          neg_iou_thr=float(section["neg_iou_thr"]),
                          min_pos_iou=float(section["min_pos_iou"]),
                          match_low_quality=bool(section["match_low_quality"]),
                          ignore_iof_thr=ignore_iof_thr, impl=impl)


def _build_backbone(backbone_cfg: Mapping[str, Any], *, conv_impl: str) -> ResNet:
    """ResNet from the backbone section; loads ``pretrained`` (a MindSpore .ckpt of backbone
    weights, keys without prefix) when set -- a mismatching file raises ValueError."""
    backbone = ResNet(depth=int(backbone_cfg["depth"]), groups=int(backbone_cfg["groups"]),
                      base_width=int(backbone_cfg["base_width"]), conv_impl=conv_impl,
                      norm=str(backbone_cfg["norm"]), norm_eval=bool(backbone_cfg["norm_eval"]),
                      frozen_stages=int(backbone_cfg["frozen_stages"]))
    pretrained = backbone_cfg["pretrained"]
    if pretrained:
        backbone.load_pretrained(str(pretrained))
    return backbone


def build_detector(detector_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any], *,
                   num_classes: int, conv_impl: str, seed: int = 0,
                   roi_align_impl: Optional[str] = None,
                   trim_empty_slots: bool = True) -> MaskRCNN:
    """Mask R-CNN from the ``detector`` and ``backbone`` config sections.

    Args:
        detector_cfg: the detector section (neck, rpn, roi, bbox_head, mask_head, train_cfg,
            test_cfg).
        backbone_cfg: the backbone section.
        num_classes: K foreground classes.
        conv_impl: "native" | "unfold" | "winograd" (see ``build_conv2d``).
        seed: seeds the RPN and RCNN samplers' random ops.
        roi_align_impl: "gather" | "kernel" (C++, CPU) | "native" (``ops.ROIAlign``); None:
            "kernel" with conv_impl "winograd", else "gather".
        trim_empty_slots: mask branch on the real positives/detections only (see
            ``StandardRoIHeads``): on, as every step runs in PyNative mode; off runs every slot
            with fixed shapes (what graph mode would need; the benchmark's ``--fixed-slots``).
    """
    if detector_cfg["name"] not in DETECTOR_NAMES:
        raise ValueError(f"detector.name: one of {DETECTOR_NAMES} is built here, got "
                         f"{detector_cfg['name']!r}")
    if roi_align_impl is None:
        roi_align_impl = (ROI_ALIGN_IMPL_WITH_CPU_KERNELS if uses_cpu_kernels(conv_impl)
                          else DEFAULT_ROI_ALIGN_IMPL)
    backbone = _build_backbone(backbone_cfg, conv_impl=conv_impl)
    neck_cfg = detector_cfg["neck"]
    fpn_channels = int(neck_cfg["out_channels"])
    neck = FPN(in_channels=list(backbone.out_channels), out_channels=fpn_channels,
               num_outs=int(neck_cfg["num_outs"]), conv_impl=conv_impl)

    rpn_cfg = detector_cfg["rpn"]
    train_cfg = detector_cfg["train_cfg"]
    test_cfg = detector_cfg["test_cfg"]
    rcnn_train = train_cfg["rcnn"]
    # One crowd-region threshold (train_cfg.rcnn.ignore_iof_thr) serves both stages.
    ignore_iof_thr = float(rcnn_train["ignore_iof_thr"])
    anchor_strides = [int(s) for s in rpn_cfg["anchor_strides"]]
    if len(anchor_strides) != int(neck_cfg["num_outs"]):
        raise ValueError(f"detector.rpn.anchor_strides: {len(anchor_strides)} levels but the neck "
                         f"has num_outs={neck_cfg['num_outs']}")
    rpn_head = RPNHead(
        in_channels=fpn_channels, feat_channels=int(rpn_cfg["feat_channels"]),
        anchor_generator=AnchorGenerator(strides=anchor_strides,
                                         ratios=[float(r) for r in rpn_cfg["anchor_ratios"]],
                                         scales=[float(s) for s in rpn_cfg["anchor_scales"]]),
        box_coder=DeltaXYWHBoxCoder(means=list(rpn_cfg["target_means"]),
                                    stds=list(rpn_cfg["target_stds"])),
        assigner=_assigner(train_cfg["rpn"]["assigner"], ignore_iof_thr, layer_impl_for(conv_impl)),
        sampler=RandomSampler(num=int(train_cfg["rpn"]["sampler"]["num"]),
                              pos_fraction=float(train_cfg["rpn"]["sampler"]["pos_fraction"]),
                              seed=seed),
        train_proposal=_proposal_cfg(train_cfg["rpn_proposal"]),
        test_proposal=_proposal_cfg(test_cfg["rpn"]),
        loss_cls_weight=float(rpn_cfg["loss_cls_weight"]),
        loss_bbox_weight=float(rpn_cfg["loss_bbox_weight"]),
        conv_impl=conv_impl, nms_impl=layer_impl_for(conv_impl))

    roi_cfg = detector_cfg["roi"]
    bbox_cfg = detector_cfg["bbox_head"]
    mask_cfg = detector_cfg["mask_head"]
    rcnn_test = test_cfg["rcnn"]
    featmap_strides = [int(s) for s in roi_cfg["featmap_strides"]]
    sampling_ratio = int(roi_cfg["sampling_ratio"])

    def extractor(out_size: int) -> RoIExtractor:
        return RoIExtractor(out_size=out_size, featmap_strides=featmap_strides,
                            finest_scale=float(roi_cfg["finest_scale"]),
                            sampling_ratio=sampling_ratio, impl=roi_align_impl)

    bbox_head = Shared2FCBBoxHead(in_channels=fpn_channels,
                                  roi_feat_size=int(bbox_cfg["roi_feat_size"]),
                                  fc_out_channels=int(bbox_cfg["fc_out_channels"]),
                                  num_classes=num_classes,
                                  reg_class_agnostic=bool(bbox_cfg["reg_class_agnostic"]),
                                  loss_cls_weight=float(bbox_cfg["loss_cls_weight"]),
                                  loss_bbox_weight=float(bbox_cfg["loss_bbox_weight"]),
                                  dense_impl=layer_impl_for(conv_impl))
    mask_head = FCNMaskHead(in_channels=fpn_channels, num_convs=int(mask_cfg["num_convs"]),
                            conv_out_channels=int(mask_cfg["conv_out_channels"]),
                            roi_feat_size=int(mask_cfg["roi_feat_size"]),
                            mask_size=int(mask_cfg["mask_size"]), num_classes=num_classes,
                            conv_impl=conv_impl, loss_weight=float(mask_cfg["loss_weight"]))
    rcnn_sampler_cfg = rcnn_train["sampler"]
    roi_heads = StandardRoIHeads(
        bbox_roi_extractor=extractor(int(bbox_cfg["roi_feat_size"])),
        bbox_head=bbox_head,
        bbox_coder=DeltaXYWHBoxCoder(means=list(bbox_cfg["target_means"]),
                                     stds=list(bbox_cfg["target_stds"])),
        mask_roi_extractor=extractor(int(mask_cfg["roi_feat_size"])),
        mask_head=mask_head,
        assigner=_assigner(rcnn_train["assigner"], ignore_iof_thr, layer_impl_for(conv_impl)),
        sampler=RandomSampler(num=int(rcnn_sampler_cfg["num"]),
                              pos_fraction=float(rcnn_sampler_cfg["pos_fraction"]),
                              add_gt_as_proposals=bool(rcnn_sampler_cfg["add_gt_as_proposals"]),
                              seed=seed + RCNN_SAMPLER_SEED_OFFSET),
        mask_max_pos=int(rcnn_train["mask_max_pos"]),
        trim_empty_slots=trim_empty_slots, nms_impl=layer_impl_for(conv_impl),
        score_thr=float(rcnn_test["score_thr"]),
        iou_threshold=float(rcnn_test["iou_threshold"]),
        max_per_img=int(rcnn_test["max_per_img"]),
        mask_sampling_ratio=sampling_ratio)
    return MaskRCNN(backbone=backbone, neck=neck, rpn_head=rpn_head, roi_heads=roi_heads)
