"""ResNet backbone and FPN neck: shapes, freezing, gradients, impl equivalence, checkpoints."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.models.backbone import ResNet, load_pretrained
from instaboost.models.layers.conv import UnfoldConv2d
from instaboost.models.necks import FPN
from instaboost.models.necks.fpn import NearestUpsample2x

IMAGE_SIZE = 64
SEED = 0
RTOL = 1e-4
# torchvision parameter counts without the classifier (fc: 2048*1000 + 1000)
TORCHVISION_PARAMS = {
    (50, 1, 64): 25_557_032 - 2_049_000,
    (101, 1, 64): 44_549_160 - 2_049_000,
    (101, 64, 4): 83_455_272 - 2_049_000,
}


def _image(batch=1, size=IMAGE_SIZE):
    rng = np.random.default_rng(SEED)
    return Tensor(rng.standard_normal((batch, 3, size, size)).astype(np.float32))


def _num_params(cell: nn.Cell) -> int:
    """Learnable-tensor count like torchvision (BN running statistics excluded)."""
    return sum(int(np.prod(p.shape)) for n, p in cell.parameters_and_names()
               if not n.endswith(("moving_mean", "moving_variance")))


@pytest.fixture(scope="module")
def resnet50():
    return ResNet(depth=50, conv_impl="unfold")


def test_resnet50_output_shapes_and_strides(resnet50):
    outs = resnet50(_image())
    expected_channels = (256, 512, 1024, 2048)
    assert len(outs) == 4
    for out, channels, stride in zip(outs, expected_channels, ResNet.out_strides):
        assert out.shape == (1, channels, IMAGE_SIZE // stride, IMAGE_SIZE // stride)
        assert out.dtype == ms.float32
    assert ResNet.out_channels == expected_channels


def test_fpn_output_shapes(resnet50):
    fpn = FPN(in_channels=(256, 512, 1024, 2048), out_channels=256, num_outs=5,
              conv_impl="unfold")
    outs = fpn(resnet50(_image()))
    sizes = [IMAGE_SIZE // s for s in (4, 8, 16, 32, 64)]
    assert [tuple(o.shape) for o in outs] == [(1, 256, s, s) for s in sizes]
    # P6 is the stride-2 subsampling of P5
    np.testing.assert_array_equal(outs[4].asnumpy(), outs[3].asnumpy()[:, :, ::2, ::2])


@pytest.mark.parametrize("depth, groups, base_width", [(50, 1, 64), (101, 1, 64), (101, 64, 4)])
def test_parameter_counts_match_torchvision(depth, groups, base_width):
    net = ResNet(depth=depth, groups=groups, base_width=base_width, conv_impl="unfold")
    assert _num_params(net) == TORCHVISION_PARAMS[(depth, groups, base_width)]
    if groups > 1:
        assert net.layer1[0].conv2.groups == groups
        assert tuple(net.layer1[0].conv2.weight.shape) == (256, 4, 3, 3)


def test_frozen_stages_have_no_trainable_parameters():
    net = ResNet(depth=50, conv_impl="unfold", frozen_stages=1)
    trainable = {n for n, p in net.parameters_and_names() if p.requires_grad}
    assert not any(n.startswith(("conv1.", "bn1.", "layer1.")) for n in trainable)
    assert any(n.startswith("layer2.") for n in trainable)
    assert not net.layer1[0].bn1.use_batch_statistics  # frozen BN: running statistics
    assert net.layer2[0].bn1.use_batch_statistics is None  # trainable BN follows train mode
    net_stem = ResNet(depth=50, conv_impl="unfold", frozen_stages=0)
    assert not net_stem.conv1.weight.requires_grad and net_stem.layer1[0].conv1.weight.requires_grad
    frozen_bn = ResNet(depth=50, conv_impl="unfold", norm="frozen_bn")
    assert not any(p.requires_grad for n, p in frozen_bn.parameters_and_names() if "bn" in n
                   or "downsample.1" in n)


def test_norm_eval_uses_running_statistics():
    net = ResNet(depth=50, conv_impl="unfold", norm_eval=True)
    x = _image()
    net.set_train(True)
    train_out = net(x)[3].asnumpy()
    net.set_train(False)
    eval_out = net(x)[3].asnumpy()
    np.testing.assert_allclose(train_out, eval_out, rtol=RTOL, atol=1e-6)
    assert net.bn1.gamma.requires_grad


def test_gradients_flow_and_are_finite():
    backbone = ResNet(depth=50, conv_impl="unfold", frozen_stages=1)
    neck = FPN(conv_impl="unfold")
    backbone.set_train(True)
    params = backbone.trainable_params() + neck.trainable_params()

    def loss_fn(x):
        return sum(out.mean() for out in neck(backbone(x)))

    loss, grads = ms.value_and_grad(loss_fn, None, weights=params)(_image())
    assert np.isfinite(loss.asnumpy())
    norms = [float(np.abs(g.asnumpy()).sum()) for g in grads]
    assert all(np.isfinite(norms))
    by_name = dict(zip([p.name for p in params], norms))
    assert by_name["layer2.0.conv1.weight"] > 0 and by_name["layer4.2.conv3.weight"] > 0
    assert by_name["lateral_convs.0.weight"] > 0 and by_name["fpn_convs.3.bias"] > 0


def test_unfold_and_native_give_the_same_outputs():
    native_backbone = ResNet(depth=50, conv_impl="native")
    unfold_backbone = ResNet(depth=50, conv_impl="unfold")
    native_neck = FPN(conv_impl="native")
    unfold_neck = FPN(conv_impl="unfold")
    for native, unfold in ((native_backbone, unfold_backbone), (native_neck, unfold_neck)):
        unfold_params = dict(unfold.parameters_and_names())
        native_params = dict(native.parameters_and_names())
        assert unfold_params.keys() == native_params.keys()
        for name, param in native_params.items():
            unfold_params[name].set_data(param.data.copy())
    for net in (native_backbone, unfold_backbone):
        net.set_train(False)
    x = _image(size=32)
    native_outs = native_neck(native_backbone(x))
    unfold_outs = unfold_neck(unfold_backbone(x))
    for ref, got in zip(native_outs, unfold_outs):
        ref, got = ref.asnumpy(), got.asnumpy()
        assert np.abs(ref - got).max() <= RTOL * max(np.abs(ref).max(), 1.0)


def test_unfold_networks_contain_no_native_convolutions(resnet50):
    cells = list(resnet50.cells_and_names()) + list(FPN(conv_impl="unfold").cells_and_names())
    assert not any(isinstance(c, (nn.Conv2d, nn.Conv2dTranspose)) for _, c in cells)
    assert sum(isinstance(c, UnfoldConv2d) for _, c in cells) == 53 + 8


def test_nearest_upsample_matches_interpolate():
    rng = np.random.default_rng(SEED)
    x = Tensor(rng.standard_normal((2, 3, 4, 5)).astype(np.float32))
    dy = Tensor(rng.standard_normal((2, 3, 8, 10)).astype(np.float32))
    up = NearestUpsample2x()
    ref = ops.interpolate(x, size=(8, 10), mode="nearest")
    np.testing.assert_array_equal(up(x).asnumpy(), ref.asnumpy())
    grad = ms.grad(lambda t: (up(t) * dy).sum())(x).asnumpy()
    expected = dy.asnumpy().reshape(2, 3, 4, 2, 5, 2).sum(axis=(3, 5))
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-6)


class _Detector(nn.Cell):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


def test_load_pretrained_roundtrip_and_errors(tmp_path, resnet50):
    source = ResNet(depth=50, conv_impl="native")
    path = tmp_path / "r50.ckpt"
    ms.save_checkpoint(source, str(path))
    unused = load_pretrained(resnet50, path)
    assert unused == []
    for name, param in source.parameters_and_names():
        np.testing.assert_array_equal(dict(resnet50.parameters_and_names())[name].asnumpy(),
                                      param.asnumpy())

    # a full detector checkpoint: keys carry a "backbone." prefix, extra keys are reported
    detector_path = tmp_path / "detector.ckpt"
    detector = _Detector(source)
    extra = {"name": "head.weight", "data": Tensor(np.zeros((2, 2), np.float32))}
    ms.save_checkpoint(detector, str(detector_path), append_dict={extra["name"]: extra["data"]})
    assert resnet50.load_pretrained(detector_path, prefix="backbone.") == ["head.weight"]

    with pytest.raises(ValueError, match="detector.ckpt") as missing:
        resnet50.load_pretrained(detector_path)
    assert "missing keys: " in str(missing.value)

    r101_path = tmp_path / "r101_stem.ckpt"
    small = ResNet(depth=50, base_width=32, conv_impl="unfold")
    ms.save_checkpoint(small, str(r101_path))
    with pytest.raises(ValueError, match="shape mismatches") as mismatch:
        resnet50.load_pretrained(r101_path)
    assert str(r101_path) in str(mismatch.value)

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resnet50.load_pretrained(tmp_path / "nope.ckpt")


@pytest.mark.parametrize("fine_size, coarse_size", [pytest.param((14, 10), (7, 5), id="exact-2x"),
                                                    pytest.param((13, 10), (7, 5), id="odd")])
def test_top_down_merge_on_the_kernel_matches_mindspore(fine_size, coarse_size):
    """The FPN's merge, fine + nearest-upsampled coarse, on the C++ kernel (exact 2x sizes;
    others fall back to MindSpore's operators) against MindSpore's: output and both inputs'
    gradients."""
    rng = np.random.default_rng(0)
    fine = Tensor(rng.standard_normal((2, 3) + fine_size).astype(np.float32))
    coarse = Tensor(rng.standard_normal((2, 3) + coarse_size).astype(np.float32))
    dy = Tensor(rng.standard_normal(fine.shape).astype(np.float32))
    results = []
    for impl in ("unfold", "winograd"):
        neck = FPN(in_channels=(3, 3), out_channels=3, num_outs=2, conv_impl=impl)
        assert neck.use_kernel == (impl == "winograd")
        grads = ms.grad(lambda a, b: (neck.merge_top_down(a, b) * dy).sum(),
                        grad_position=(0, 1))(fine, coarse)
        results.append([neck.merge_top_down(fine, coarse).asnumpy()] +
                       [g.asnumpy() for g in grads])
    for expected, got in zip(*results):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # Each fine pixel took its coarse pixel: (i, j) <- (i // 2, j // 2).
    up = results[1][0] - fine.asnumpy()
    np.testing.assert_allclose(up[:, :, 5, 3], coarse.asnumpy()[:, :, 2, 1], rtol=1e-6)
