"""RPN head: shapes, losses, proposals (instaboost/models/rpn.py)."""
from __future__ import annotations

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, ops

from instaboost.models.anchors import AnchorGenerator
from instaboost.models.assigner import MaxIoUAssigner
from instaboost.models.box_coder import DeltaXYWHBoxCoder
from instaboost.models.rpn import ProposalConfig, RPNHead
from instaboost.models.sampler import RandomSampler
from instaboost.structures.boxes import batched_gather, np_pairwise_iou

ms.set_device("CPU")
ms.runtime.launch_blocking()  # synchronous PyNative is several times faster on a busy 2-core CPU

CHANNELS = 8
IMAGE = 64
STRIDES = (4, 8, 16, 32, 64)
LOGIT = 20.0  # |logit| giving sigmoid probabilities within 1e-8 of 0 / 1
SAMPLED_PER_IMAGE = 32


def make_rpn(nms_pre=50, max_per_img=40, min_bbox_size=0.0):
    proposal = ProposalConfig(nms_pre=nms_pre, max_per_img=max_per_img, iou_threshold=0.7,
                              min_bbox_size=min_bbox_size)
    return RPNHead(in_channels=CHANNELS, feat_channels=CHANNELS,
                   anchor_generator=AnchorGenerator(strides=STRIDES, ratios=[0.5, 1.0, 2.0],
                                                    scales=[8]),
                   box_coder=DeltaXYWHBoxCoder(),
                   assigner=MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                           ignore_iof_thr=0.5),
                   sampler=RandomSampler(num=SAMPLED_PER_IMAGE, pos_fraction=0.5, seed=1),
                   train_proposal=proposal, test_proposal=proposal)


def features(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal((batch, CHANNELS, IMAGE // s, IMAGE // s), np.float32))
            for s in STRIDES]


def gts(batch=2):
    """img_meta, gt_boxes, gt_valid, gt_crowd for up to 2 images (image 1 has a crowd region)."""
    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[:, 0] = [8, 8, 40, 40]
    boxes[:, 1] = [30, 10, 60, 30]
    boxes[1, 2] = [0, 40, 30, 64]
    valid = np.array([[True, True, False], [True, True, True]])
    crowd = np.array([[False, False, False], [False, False, True]])
    meta = np.tile(np.array([[0, IMAGE, IMAGE, IMAGE, IMAGE]], np.float32), (batch, 1))
    return Tensor(meta), Tensor(boxes[:batch]), Tensor(valid[:batch]), Tensor(crowd[:batch])


def test_head_shapes_and_anchor_count():
    rpn = make_rpn()
    feats = features()
    cls_logits, deltas = rpn(feats)
    anchors = rpn.anchors(feats)
    for logits, delta, anc, stride in zip(cls_logits, deltas, anchors, STRIDES):
        count = (IMAGE // stride) ** 2 * 3
        assert logits.shape == (2, count) and delta.shape == (2, count, 4)
        assert anc.shape == (count, 4)


def test_losses_finite_and_proposals_fixed_size_inside_image():
    rpn = make_rpn()
    meta, boxes, valid, crowd = gts()
    losses, proposals, prop_valid = rpn.forward_train(features(), meta, boxes, valid, crowd)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    for value in losses.values():
        assert value.shape == () and np.isfinite(value.asnumpy())
    # P = min(max_per_img, sum_l min(nms_pre, A_l)) = min(40, 50 + 48 + 12 + 3 + 3)
    assert proposals.shape == (2, 40, 4) and prop_valid.shape == (2, 40)
    assert rpn.num_proposals([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], training=True) == 40
    props = proposals.asnumpy()
    assert prop_valid.asnumpy().any()
    assert props.min() >= 0 and props.max() <= IMAGE


def test_loss_is_near_zero_for_perfect_predictions_and_large_otherwise():
    """Logits/deltas built from the assigner's own targets must give ~zero loss; a broken box
    coder, assigner or loss wiring breaks this."""
    rpn = make_rpn()
    feats = features()
    meta, boxes, valid, crowd = gts()
    anchors = rpn.anchors(feats)
    all_anchors = ops.concat(anchors, axis=0)
    num = all_anchors.shape[0]
    anchors_b = ops.broadcast_to(all_anchors.reshape(1, num, 4), (2, num, 4))
    gt_inds = rpn.assigner.assign(anchors_b, Tensor(np.ones((2, num), bool)), boxes, valid,
                                  crowd).gt_inds
    positive = gt_inds.asnumpy() > 0
    assert positive.any()
    matched = batched_gather(boxes, ops.relu(gt_inds - 1))
    perfect_deltas = rpn.box_coder.encode(anchors_b, matched)
    logits = Tensor(np.where(positive, LOGIT, -LOGIT).astype(np.float32))
    splits = np.cumsum([a.shape[0] for a in anchors])[:-1].tolist()
    split_logits = np.split(logits.asnumpy(), splits, axis=1)
    split_deltas = np.split(perfect_deltas.asnumpy(), splits, axis=1)
    losses = rpn.loss([Tensor(x) for x in split_logits], [Tensor(x) for x in split_deltas],
                      anchors, meta, boxes, valid, crowd)
    assert float(losses["loss_rpn_cls"].asnumpy()) < 1e-6
    assert float(losses["loss_rpn_bbox"].asnumpy()) < 1e-5
    flipped = rpn.loss([Tensor(-x) for x in split_logits],
                       [Tensor(x + 1.0) for x in split_deltas], anchors, meta, boxes, valid, crowd)
    assert float(flipped["loss_rpn_cls"].asnumpy()) > 1.0
    # L1 of 1 on 4 coordinates of each sampled positive, over all sampled anchors (avg_factor)
    sampled_positives = np.minimum(positive.sum(axis=1), SAMPLED_PER_IMAGE // 2).sum()
    np.testing.assert_allclose(float(flipped["loss_rpn_bbox"].asnumpy()),
                               4.0 * sampled_positives / (2 * SAMPLED_PER_IMAGE), rtol=1e-5)


def test_proposals_follow_scores_and_nms():
    """Two top anchors overlapping > 0.7 collapse to one proposal; the order follows scores."""
    rpn = make_rpn(nms_pre=10, max_per_img=5)
    feats = features(batch=1)
    anchors = rpn.anchors(feats)
    logits = [np.full((1, a.shape[0]), -LOGIT, np.float32) for a in anchors]
    deltas = [np.zeros((1, a.shape[0], 4), np.float32) for a in anchors]
    a0 = anchors[0].asnumpy()
    best, twin, other = 3 * (16 * 8 + 8) + 1, 3 * (16 * 8 + 9) + 1, 3 * (16 * 2 + 2) + 1
    assert np_pairwise_iou(a0[[best]], a0[[twin]])[0, 0] > 0.7
    logits[0][0, best], logits[0][0, twin], logits[0][0, other] = 5.0, 4.0, 3.0
    deltas[0][0, other] = [0.25, 0.0, 0.0, 0.0]   # decoded with its own deltas: x + 0.25 width
    meta, _, _, _ = gts(batch=1)
    props, valid, scores = rpn.get_proposals([Tensor(x) for x in logits],
                                             [Tensor(x) for x in deltas], anchors, meta,
                                             training=False)
    props, valid, scores = props.asnumpy()[0], valid.asnumpy()[0], scores.asnumpy()[0]
    np.testing.assert_allclose(props[0], np.clip(a0[best], 0, IMAGE))
    shifted = a0[other] + 0.25 * (a0[other][2] - a0[other][0]) * np.array([1, 0, 1, 0])
    np.testing.assert_allclose(props[1], np.clip(shifted, 0, IMAGE), rtol=1e-6, atol=1e-4)
    assert not np.any(np.all(np.isclose(props[valid], np.clip(a0[twin], 0, IMAGE)), axis=1))
    assert np.all(np.diff(scores[valid]) <= 0)


def test_min_bbox_size_masks_small_proposals():
    meta, _, _, _ = gts(batch=1)
    feats = features(batch=1)
    kept = []
    for min_size in (0.0, 40.0):
        rpn = make_rpn(nms_pre=20, max_per_img=20, min_bbox_size=min_size)
        props, valid, _ = rpn.forward_test(feats, meta)
        sides = np.minimum(props.asnumpy()[0, :, 2] - props.asnumpy()[0, :, 0],
                           props.asnumpy()[0, :, 3] - props.asnumpy()[0, :, 1])
        kept.append(sides[valid.asnumpy()[0]])
    assert (kept[0] <= 40.0).any() and (kept[0] > 40.0).any()   # both kinds without the limit
    assert kept[1].size > 0 and np.all(kept[1] > 40.0)           # only the large ones with it


def test_all_padding_batch_and_gradients():
    rpn = make_rpn()
    meta = Tensor(np.tile(np.array([[0, IMAGE, IMAGE, IMAGE, IMAGE]], np.float32), (2, 1)))
    boxes = Tensor(np.zeros((2, 3, 4), np.float32))
    flags = Tensor(np.zeros((2, 3), bool))
    feats = features()

    def total(*maps):
        losses, _, _ = rpn.forward_train(list(maps), meta, boxes, flags, flags)
        return losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]

    value, grads = ms.value_and_grad(total, None, rpn.trainable_params())(*feats)
    assert np.isfinite(value.asnumpy()) and float(value.asnumpy()) > 0
    assert all(np.isfinite(g.asnumpy()).all() for g in grads)
    assert float(np.abs(grads[0].asnumpy()).sum()) > 0


@pytest.mark.parametrize("height, width", [(40, 40), (24, 64)])
def test_anchors_in_batch_padding_are_ignored(height, width):
    """The image fills only the top-left height x width of the 64x64 batch: anchors centred in
    the padding get huge logits, which would dominate the loss if they were ever sampled."""
    rpn = make_rpn()
    feats = features(batch=1)
    meta = Tensor(np.array([[0, height, width, height, width]], np.float32))
    boxes = Tensor(np.array([[[4.0, 4, 30, 20]]], np.float32))
    flags = Tensor(np.array([[True]]))
    anchors = ops.concat(rpn.anchors(feats), axis=0).asnumpy()
    centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
    outside = (centres[:, 0] >= width) | (centres[:, 1] >= height)
    assert outside.any()
    cls_logits, deltas = rpn(feats)
    logits = np.concatenate([x.asnumpy() for x in cls_logits], axis=1)
    logits[:, outside] = 1000.0
    splits = np.cumsum([x.shape[1] for x in cls_logits])[:-1].tolist()
    losses = rpn.loss([Tensor(x) for x in np.split(logits, splits, axis=1)], deltas,
                      rpn.anchors(feats), meta, boxes, flags, Tensor(np.array([[False]])))
    assert float(losses["loss_rpn_cls"].asnumpy()) < 2.0


def test_objectness_and_deltas_follow_the_anchor_order_on_non_square_maps():
    """predict flattens each map (y, x, anchor) as AnchorGenerator orders the anchors: on the
    maps of a 64 x 128 image (non-square) logit i is the head's output at anchor i's position."""
    rpn = make_rpn()
    rng = np.random.default_rng(4)
    feats = [Tensor(rng.standard_normal((1, CHANNELS, IMAGE // s, 2 * IMAGE // s), np.float32))
             for s in STRIDES]
    cls_logits, deltas = rpn.predict(feats)
    anchors = rpn.anchors(feats)
    for feat, logits, level_deltas, level_anchors, stride in zip(feats, cls_logits, deltas,
                                                                anchors, STRIDES):
        hidden = rpn.rpn_conv(feat)                                     # with its ReLU
        dense = rpn.rpn_cls(hidden).asnumpy()[0]                        # (A, H, W)
        dense_deltas = rpn.rpn_reg(hidden).asnumpy()[0]                 # (A * 4, H, W)
        num_anchors, height, width = dense.shape
        for i in rng.choice(logits.shape[1], min(20, logits.shape[1]), replace=False):
            y, x, a = np.unravel_index(i, (height, width, num_anchors))
            centre = 0.5 * (level_anchors.asnumpy()[i, :2] + level_anchors.asnumpy()[i, 2:])
            np.testing.assert_allclose(centre, [x * stride, y * stride])
            np.testing.assert_allclose(logits.asnumpy()[0, i], dense[a, y, x], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_allclose(level_deltas.asnumpy()[0, i], dense_deltas[4 * a:4 * a + 4, y, x],
                                       rtol=1e-5, atol=1e-6)


def test_each_level_keeps_its_nms_pre_best():
    """P = sum over levels of min(nms_pre, anchors of the level), capped at max_per_img."""
    rpn = make_rpn(nms_pre=5, max_per_img=1000)
    proposals, valid, _ = rpn.forward_test(features(batch=1), gts(batch=1)[0])
    sizes = [(IMAGE // s, IMAGE // s) for s in STRIDES]
    assert proposals.shape[1] == rpn.num_proposals(sizes, training=False) == 5 * 4 + 3


def test_a_proposal_clipped_to_zero_width_is_never_valid():
    """With min_bbox_size 0 (the default) a box must still be wider and taller than 0
    (mmdetection keeps w > min_bbox_size): an anchor pushed off the image clips to width 0."""
    rpn = make_rpn(nms_pre=10, max_per_img=5)
    feats = features(batch=1)
    anchors = rpn.anchors(feats)
    logits = [np.full((1, a.shape[0]), -LOGIT, np.float32) for a in anchors]
    deltas = [np.zeros((1, a.shape[0], 4), np.float32) for a in anchors]
    top = 3 * (16 * 8 + 8) + 1
    logits[0][0, top] = 5.0
    deltas[0][0, top] = [20.0, 0.0, 0.0, 0.0]    # 20 widths to the right: past the image
    props, valid, _ = rpn.get_proposals([Tensor(x) for x in logits], [Tensor(x) for x in deltas],
                                        anchors, gts(batch=1)[0], training=False)
    props, valid = props.asnumpy()[0], valid.asnumpy()[0]
    assert valid.any()
    assert np.all(props[valid, 2] > props[valid, 0]) and np.all(props[valid, 3] > props[valid, 1])

