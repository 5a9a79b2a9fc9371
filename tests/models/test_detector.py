"""Mask R-CNN end to end: builder, train/test entry points, gradients, overfitting
(instaboost/models/detector.py, instaboost/builders.py)."""
from __future__ import annotations

import copy

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, nn
from omegaconf import DictConfig, OmegaConf

from instaboost.builders import build_detector
from instaboost.models.anchors import AnchorGenerator
from instaboost.models.assigner import MaxIoUAssigner
from instaboost.models.bbox_head import Shared2FCBBoxHead
from instaboost.models.box_coder import DeltaXYWHBoxCoder
from instaboost.models.detector import LOSS_NAMES, MaskRCNN
from instaboost.models.layers.conv import build_conv2d
from instaboost.models.mask_head import FCNMaskHead
from instaboost.models.necks.fpn import FPN
from instaboost.models.roi_extractor import RoIExtractor
from instaboost.models.roi_heads import StandardRoIHeads
from instaboost.models.rpn import ProposalConfig, RPNHead
from instaboost.models.sampler import RandomSampler

ms.set_device("CPU")
ms.runtime.launch_blocking()  # synchronous PyNative is several times faster on a busy 2-core CPU

NUM_CLASSES = 3
TINY_CHANNELS = (8, 8, 16, 16)
TINY_FPN = 16
OVERFIT_STEPS = 10
OVERFIT_LR = 1.5e-3
# Better proposals add positive RoIs (raising loss_bbox/loss_mask for a while), so the total is
# compared over the last few steps rather than step by step.
OVERFIT_TAIL = 3
OVERFIT_RATIO = 0.8


class TinyBackbone(nn.Cell):
    """Stand-in for ResNet with the same output strides (4, 8, 16, 32) and few channels."""

    out_channels = TINY_CHANNELS

    def __init__(self):
        super().__init__()
        self.stem = build_conv2d(3, TINY_CHANNELS[0], 3, stride=4, padding=1, has_bias=True,
                                 impl="unfold")
        self.stages = nn.CellList([
            build_conv2d(cin, cout, 3, stride=2, padding=1, has_bias=True, impl="unfold")
            for cin, cout in zip(TINY_CHANNELS[:-1], TINY_CHANNELS[1:])])
        self.relu = nn.ReLU()

    def construct(self, x):
        x = self.relu(self.stem(x))
        outs = [x]
        for stage in self.stages:
            x = self.relu(stage(x))
            outs.append(x)
        return tuple(outs)


def tiny_detector(seed: int = 0) -> MaskRCNN:
    """Complete Mask R-CNN with a tiny backbone and small heads (fast enough to train in tests)."""
    proposal = ProposalConfig(nms_pre=200, max_per_img=64, iou_threshold=0.7)
    rpn = RPNHead(in_channels=TINY_FPN, feat_channels=TINY_FPN,
                  anchor_generator=AnchorGenerator(strides=[4, 8, 16, 32, 64],
                                                   ratios=[0.5, 1.0, 2.0], scales=[8]),
                  box_coder=DeltaXYWHBoxCoder(),
                  assigner=MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                          ignore_iof_thr=0.5),
                  sampler=RandomSampler(num=64, pos_fraction=0.5, seed=seed),
                  train_proposal=proposal, test_proposal=proposal, conv_impl="unfold")

    def extractor(size):
        return RoIExtractor(out_size=size, featmap_strides=[4, 8, 16, 32], finest_scale=56,
                            sampling_ratio=2, impl="gather")

    roi_heads = StandardRoIHeads(
        bbox_roi_extractor=extractor(7),
        bbox_head=Shared2FCBBoxHead(in_channels=TINY_FPN, roi_feat_size=7, fc_out_channels=64,
                                    num_classes=NUM_CLASSES),
        bbox_coder=DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2)),
        mask_roi_extractor=extractor(14),
        mask_head=FCNMaskHead(in_channels=TINY_FPN, num_convs=2, conv_out_channels=TINY_FPN,
                              roi_feat_size=14, mask_size=28, num_classes=NUM_CLASSES,
                              conv_impl="unfold"),
        assigner=MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                ignore_iof_thr=0.5),
        sampler=RandomSampler(num=64, pos_fraction=0.25, add_gt_as_proposals=True,
                              seed=seed + 1),
        mask_max_pos=16, score_thr=0.05, iou_threshold=0.5, max_per_img=20)
    neck = FPN(in_channels=TINY_CHANNELS, out_channels=TINY_FPN, num_outs=5, conv_impl="unfold")
    return MaskRCNN(backbone=TinyBackbone(), neck=neck, rpn_head=rpn, roi_heads=roi_heads)


def synthetic_batch(batch=1, size=64, num_gts=4, mask_side=16, all_padding=False, seed=0):
    """A batch per the batch contract: bright rectangles (class 1) and discs (class 2) on noise,
    one crowd region in the second image."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 0.1, (batch, 3, size, size)).astype(np.float32)
    meta = np.tile(np.array([[0, size, size, size, size]], np.float32), (batch, 1))
    boxes = np.zeros((batch, num_gts, 4), np.float32)
    labels = np.zeros((batch, num_gts), np.int32)
    masks = np.zeros((batch, num_gts, mask_side, mask_side), np.uint8)
    valid = np.zeros((batch, num_gts), bool)
    crowd = np.zeros((batch, num_gts), bool)
    yy, xx = np.mgrid[:mask_side, :mask_side]
    disc = ((yy - mask_side / 2 + 0.5) ** 2 + (xx - mask_side / 2 + 0.5) ** 2
            <= (mask_side / 2) ** 2).astype(np.uint8)
    if not all_padding:
        for b in range(batch):
            for g, (box, label) in enumerate([((6, 8, 30, 36), 1), ((34, 30, 60, 58), 2)]):
                x1, y1, x2, y2 = box
                boxes[b, g] = box
                labels[b, g] = label
                valid[b, g] = True
                masks[b, g] = 1 if label == 1 else disc
                image[b, label - 1, y1:y2, x1:x2] += 1.0
            if b == 1:
                boxes[b, 2] = (0, 40, 20, 64)
                labels[b, 2] = 1
                valid[b, 2] = crowd[b, 2] = True
                masks[b, 2] = 1
    return [Tensor(x) for x in (image, meta, boxes, labels, masks, valid, crowd)]


def small_detector_cfg(detector_cfg: DictConfig) -> DictConfig:
    """The real detector section with proposal/sample counts shrunk for 64 px images."""
    cfg = copy.deepcopy(detector_cfg)
    cfg.train_cfg.rpn.sampler.num = 64
    cfg.train_cfg.rpn_proposal.nms_pre = 100
    cfg.train_cfg.rpn_proposal.max_per_img = 50
    cfg.test_cfg.rpn.nms_pre = 100
    cfg.test_cfg.rpn.max_per_img = 50
    cfg.train_cfg.rcnn.sampler.num = 32
    cfg.train_cfg.rcnn.mask_max_pos = 8
    cfg.test_cfg.rcnn.max_per_img = 10
    cfg.bbox_head.fc_out_channels = 64
    cfg.mask_head.conv_out_channels = 32
    return cfg


def loss_and_grads(model, batch):
    def forward(*inputs):
        losses = model.forward_train(*inputs)
        return sum(losses.values()), losses

    params = model.trainable_params()
    (total, losses), grads = ms.value_and_grad(forward, None, params, has_aux=True)(*batch)
    return total, losses, dict(zip([p.name for p in params], grads))


def test_built_from_real_config_trains_and_infers(cfg_global):
    """ResNet-50 + FPN from conf/ (plain dict sections), 64 px: finite losses, gradients on the
    backbone, forward_test per the model contract."""
    det_cfg = OmegaConf.to_container(small_detector_cfg(cfg_global.detector), resolve=True)
    bb_cfg = OmegaConf.to_container(cfg_global.backbone, resolve=True)
    model = build_detector(det_cfg, bb_cfg, num_classes=NUM_CLASSES, conv_impl="unfold")
    assert model.loss_names == LOSS_NAMES
    total, losses, grads = loss_and_grads(model, synthetic_batch())
    assert list(losses) == list(LOSS_NAMES)
    assert all(v.shape == () and np.isfinite(v.asnumpy()) for v in losses.values())
    assert all(np.isfinite(g.asnumpy()).all() for g in grads.values())
    backbone = [n for n in grads if n.startswith("backbone.") and "weight" in n]
    assert backbone and all(float(np.abs(grads[n].asnumpy()).sum()) > 0 for n in backbone[:3])

    model.set_train(False)
    image, meta = synthetic_batch()[:2]
    boxes, scores, labels, valid, masks = model.forward_test(image, meta)
    assert boxes.shape == (1, 10, 4) and boxes.dtype == ms.float32
    assert scores.shape == (1, 10) and scores.dtype == ms.float32
    assert labels.shape == (1, 10) and labels.dtype == ms.int32
    assert valid.shape == (1, 10) and valid.dtype == ms.bool_
    assert masks.shape == (1, 10, 28, 28) and masks.dtype == ms.float32
    lab = labels.asnumpy()[valid.asnumpy()]
    assert np.all((lab >= 1) & (lab <= NUM_CLASSES))


def test_builder_reads_dictconfig_and_rejects_unknown_names(cfg_global):
    det_cfg = small_detector_cfg(cfg_global.detector)
    model = build_detector(det_cfg, cfg_global.backbone, num_classes=NUM_CLASSES,
                           conv_impl="unfold", seed=3)
    heads = model.roi_heads
    assert heads.sampler.num == 32 and heads.sampler.add_gt_as_proposals
    assert heads.assigner.ignore_iof_thr == cfg_global.detector.train_cfg.rcnn.ignore_iof_thr
    assert model.rpn_head.assigner.pos_iou_thr == 0.7
    assert heads.bbox_coder.stds == (0.1, 0.1, 0.2, 0.2)
    assert heads.mask_head.mask_size == 28 and heads.max_per_img == 10
    renamed = copy.deepcopy(det_cfg)
    renamed.name = "cascade_rcnn"
    with pytest.raises(ValueError, match="detector.name"):
        build_detector(renamed, cfg_global.backbone, num_classes=NUM_CLASSES, conv_impl="unfold")


@pytest.mark.parametrize("conv_impl,layer_impl", [("unfold", "mindspore"), ("winograd", "kernel")])
def test_nms_and_assigners_run_on_the_kernels_with_the_cpu_kernels(cfg_global, conv_impl, layer_impl):
    model = build_detector(small_detector_cfg(cfg_global.detector), cfg_global.backbone,
                           num_classes=NUM_CLASSES, conv_impl=conv_impl)
    nms_layers = [model.rpn_head._nms_train, model.rpn_head._nms_test, model.roi_heads._nms]
    assert [layer.impl for layer in nms_layers] == [layer_impl] * 3
    assert [model.rpn_head.assigner.impl, model.roi_heads.assigner.impl] == [layer_impl] * 2
    assert model.rpn_head._nms_train.iou_threshold == cfg_global.detector.train_cfg.rpn_proposal.iou_threshold


def test_all_padding_batch_gives_finite_losses_and_gradients():
    model = tiny_detector()
    total, losses, grads = loss_and_grads(model, synthetic_batch(batch=2, all_padding=True))
    assert np.isfinite(total.asnumpy())
    assert float(losses["loss_bbox"].asnumpy()) == 0.0
    assert float(losses["loss_mask"].asnumpy()) == 0.0
    assert float(losses["loss_rpn_bbox"].asnumpy()) == 0.0
    assert all(np.isfinite(g.asnumpy()).all() for g in grads.values())


def test_wrong_batch_shapes_are_rejected():
    model = tiny_detector()
    batch = synthetic_batch()
    batch[3] = Tensor(np.zeros((1, 3), np.int32))  # gt_labels with the wrong G
    with pytest.raises(ValueError, match="gt_labels"):
        model.forward_train(*batch)


def test_loss_drops_when_overfitting_one_image():
    ms.set_seed(0)
    model = tiny_detector(seed=0)
    batch = synthetic_batch(batch=2)
    optimizer = nn.Adam(model.trainable_params(), learning_rate=OVERFIT_LR)

    def forward(*inputs):
        losses = model.forward_train(*inputs)
        return sum(losses.values()), losses

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)
    history, rpn_cls = [], []
    for _ in range(OVERFIT_STEPS):
        (total, losses), grads = grad_fn(*batch)
        optimizer(grads)
        history.append(float(total.asnumpy()))
        rpn_cls.append(float(losses["loss_rpn_cls"].asnumpy()))
    assert all(np.isfinite(history))
    assert np.mean(history[-OVERFIT_TAIL:]) < OVERFIT_RATIO * history[0], \
        f"loss did not drop: {history}"
    assert rpn_cls[-1] < rpn_cls[0], f"objectness loss did not drop: {rpn_cls}"

    model.set_train(False)
    boxes, scores, labels, valid, masks = model.forward_test(batch[0], batch[1])
    assert boxes.shape == (2, 20, 4) and masks.shape == (2, 20, 28, 28)


def test_builder_loads_pretrained_backbone_or_fails_loudly(cfg_global, tmp_path):
    backbone_cfg = copy.deepcopy(cfg_global.backbone)
    backbone_cfg.pretrained = str(tmp_path / "missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        build_detector(small_detector_cfg(cfg_global.detector), backbone_cfg,
                       num_classes=NUM_CLASSES, conv_impl="unfold")


def test_trimming_empty_gt_slots_keeps_every_valid_gt(monkeypatch):
    """With trim_empty_slots (PyNative training) the assigners see the GT slots up to the last
    valid one of the batch, rounded up to 8, wherever the valid ones sit."""
    model = tiny_detector()
    model.roi_heads.trim_empty_slots = True
    arrays = [t.asnumpy().copy() for t in synthetic_batch(batch=2, num_gts=40)]
    for gt in arrays[2:]:  # image 1's GTs (incl. its crowd region) move from slots 0-2 to 17-19
        gt[1, 17:20] = gt[1, 0:3]
        gt[1, 0:3] = 0
    valid_count = int(arrays[5].sum())
    seen = []
    original = MaxIoUAssigner.assign

    def spy(self, boxes, candidate_valid, gt_boxes, gt_valid, gt_crowd):
        seen.append((gt_boxes.shape[1], int(gt_valid.asnumpy().sum())))
        return original(self, boxes, candidate_valid, gt_boxes, gt_valid, gt_crowd)

    monkeypatch.setattr(MaxIoUAssigner, "assign", spy)
    total, losses, _ = loss_and_grads(model, [Tensor(a) for a in arrays])
    assert seen == [(24, valid_count), (24, valid_count)]  # RPN and RCNN assigners
    assert np.isfinite(total.asnumpy()) and float(losses["loss_mask"].asnumpy()) > 0
