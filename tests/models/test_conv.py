"""The unfold and Winograd convolution paths against MindSpore's native kernels (outputs and
gradients)."""
import math
from typing import List

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import primitive as ms_primitive

from instaboost.models.layers import native_kernels, winograd
from instaboost.models.layers.conv import (MIN_SHARED_WEIGHT_PIXELS, UnfoldConv2d,
                                           UnfoldDeconv2x2, WinogradConv2d, add_bias,
                                           build_conv2d, build_deconv2x2, disable_input_grad,
                                           subsample)
from tests.helpers import traceable_call_stack

RTOL = 1e-4
SEED = 0


def _relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.abs(expected - actual).max() / max(np.abs(expected).max(), 1e-12))


def _copy_parameters(source: nn.Cell, target: nn.Cell) -> None:
    source_params = dict(source.parameters_and_names())
    target_params = dict(target.parameters_and_names())
    assert {k: tuple(v.shape) for k, v in source_params.items()} == \
        {k: tuple(v.shape) for k, v in target_params.items()}
    for name, param in target_params.items():
        param.set_data(source_params[name].data.copy())


def _forward_and_grads(cell: nn.Cell, x: Tensor, dy: Tensor):
    """Output, d(sum(y*dy))/dx and d/d(parameters) as numpy arrays."""
    def objective(inputs):
        return (cell(inputs) * dy).sum()
    grad_fn = ms.grad(objective, grad_position=0, weights=cell.trainable_params())
    dx, dparams = grad_fn(x)
    return cell(x).asnumpy(), dx.asnumpy(), [g.asnumpy() for g in dparams]


def _assert_same(native: nn.Cell, unfold: nn.Cell, x_shape, rng) -> None:
    _copy_parameters(native, unfold)
    x = Tensor(rng.standard_normal(x_shape).astype(np.float32))
    y_shape = native(x).shape
    dy = Tensor(rng.standard_normal(y_shape).astype(np.float32))
    y_ref, dx_ref, dp_ref = _forward_and_grads(native, x, dy)
    y, dx, dp = _forward_and_grads(unfold, x, dy)
    assert y.shape == y_ref.shape
    assert _relative_error(y_ref, y) < RTOL
    assert _relative_error(dx_ref, dx) < RTOL
    assert len(dp) == len(dp_ref)
    for ref, got in zip(dp_ref, dp):
        assert _relative_error(ref, got) < RTOL


# (in, out, kernel, stride, padding, groups, bias, input NCHW shape)
CONV_CASES = [
    pytest.param(4, 6, 3, 1, 1, 1, False, (2, 4, 8, 8), id="3x3-s1-p1"),
    pytest.param(4, 6, 3, 2, 1, 1, False, (2, 4, 9, 7), id="3x3-s2-p1-odd"),
    pytest.param(3, 5, 7, 2, 3, 1, False, (1, 3, 13, 11), id="7x7-s2-p3"),
    pytest.param(4, 6, 1, 2, 0, 1, False, (2, 4, 9, 7), id="1x1-s2"),
    pytest.param(6, 4, 1, 1, 0, 1, True, (3, 6, 5, 4), id="1x1-s1-bias"),
    pytest.param(6, 4, 1, 1, 0, 1, True, (3, 6, 14, 15), id="1x1-s1-large-map"),  # 210 px
    pytest.param(8, 6, 3, 1, 1, 2, True, (2, 8, 7, 9), id="3x3-groups2-bias"),
    pytest.param(8, 8, 3, 2, 1, 4, False, (2, 8, 9, 9), id="3x3-s2-groups4"),
    pytest.param(8, 4, 1, 1, 0, 4, False, (5, 8, 3, 3), id="1x1-groups4-many-images"),
    pytest.param(4, 6, 3, 1, 0, 1, True, (2, 4, 6, 5), id="3x3-valid-bias"),
    pytest.param(4, 6, (3, 1), 1, (1, 0), 1, False, (2, 4, 6, 5), id="3x1-kernel"),
]


@pytest.mark.parametrize("impl", ["unfold", "winograd"])
@pytest.mark.parametrize("cin, cout, kernel, stride, padding, groups, bias, shape", CONV_CASES)
def test_unfold_matches_native(cin, cout, kernel, stride, padding, groups, bias, shape, impl):
    """Unfold on MindSpore's matmul ("unfold") and on the C++ matmul kernel ("winograd": every
    case here is either not 3x3/stride 1 or too small for Winograd, so it runs unfold)."""
    rng = np.random.default_rng(SEED)
    native = build_conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups,
                          has_bias=bias, impl="native")
    unfold = build_conv2d(cin, cout, kernel, stride=stride, padding=padding, groups=groups,
                          has_bias=bias, impl=impl)
    assert isinstance(unfold, UnfoldConv2d)
    assert unfold.matmul_impl == ("kernel" if impl == "winograd" else "mindspore")
    if isinstance(unfold, WinogradConv2d):
        assert not unfold.uses_winograd(shape)
    # 1x1, groups 1, on the kernel matmul: maps of >= MIN_SHARED_WEIGHT_PIXELS (the
    # "large-map" case) take the shared-weight batched product, smaller ones the reordering path.
    assert unfold.shared_weight == (impl == "winograd" and kernel == 1 and groups == 1)
    # k x k, groups 1, on the kernel matmul: one im2col pass and one product (im2col.cc).
    takes_patches = unfold.patches is not None and unfold.patches.fits(shape)
    assert takes_patches == (impl == "winograd" and kernel != 1 and groups == 1)
    _assert_same(native, unfold, shape, rng)


def _im2col_reference(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """(N, C*kh*kw, Ho, Wo) patches, rows ordered (channel, tap_y, tap_x), zero padding."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = np.empty((n, c, kh, kw, oh, ow), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = padded[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]
    return cols.reshape(n, c * kh * kw, oh, ow)


def test_im2col_kernels_match_numpy():
    """Im2Col is the patch matrix and Col2Im its exact adjoint (<cols(x), d> = <x, col2im(d)>
    checked entry by entry against NumPy's scatter-add), for several geometries on one input
    shape: MindSpore caches an AOT op's output shape by entry point and input shapes, so the
    geometry must be part of the inputs' shapes (a geometry in a tensor's values gave the
    second convolution here the first one's patch shape)."""
    from instaboost.models.layers.conv import _geometry_tensor, _patch_ops
    im2col, col2im = _patch_ops()
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    for kernel, stride, padding in [((3, 1), (1, 1), (1, 0)), ((3, 3), (1, 1), (0, 0)),
                                    ((3, 3), (2, 2), (1, 1)), ((7, 7), (2, 2), (3, 3)),
                                    ((2, 3), (3, 2), (0, 2))]:
        geometry = _geometry_tensor(kernel, stride, padding)
        expected = _im2col_reference(x, kernel, stride, padding)
        cols = im2col(Tensor(x), geometry).asnumpy()
        np.testing.assert_array_equal(cols, expected)
        dcols = rng.standard_normal(expected.shape).astype(np.float32)
        # The adjoint: every patch entry added back where Im2Col read it, padding dropped.
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        oh, ow = expected.shape[2:]
        reference = np.zeros((2, 3, 9 + 2 * ph, 7 + 2 * pw), np.float64)
        d6 = dcols.reshape(2, 3, kh, kw, oh, ow)
        for i in range(kh):
            for j in range(kw):
                reference[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += d6[:, :, i, j]
        reference = reference[:, :, ph:ph + 9, pw:pw + 7]
        dx = col2im(Tensor(x), Tensor(dcols), geometry).asnumpy()
        np.testing.assert_allclose(dx, reference, rtol=1e-6, atol=1e-5)


# (in, out, bias, input NCHW shape): odd sizes crop the last 4x4 tiles; 1x1 is one tile of
# padding; "two-chunks" has 2,250 tiles, more than one TILE_CHUNK, with the chunk boundary
# inside a plane. The RoI cases share canvases (see test_winograd_canvas_layouts): 7 RoIs in
# one column, 17 three across with one slot left empty, 600 across several chunks.
WINOGRAD_CASES = [
    pytest.param(4, 6, False, (2, 4, 8, 8), id="8x8"),
    pytest.param(5, 3, True, (3, 5, 13, 17), id="13x17-bias"),
    pytest.param(3, 4, False, (2, 3, 1, 1), id="1x1-map"),
    pytest.param(6, 5, True, (7, 6, 14, 14), id="roi-14x14"),
    pytest.param(3, 4, True, (17, 3, 14, 14), id="roi-canvas-partial-row"),
    pytest.param(2, 3, False, (600, 2, 14, 14), id="roi-canvas-two-chunks"),
    pytest.param(2, 3, True, (1, 2, 200, 180), id="two-chunks"),
]


@pytest.fixture(params=winograd.TILINGS, ids=lambda tiling: tiling.name)
def only_tiling(request, monkeypatch):
    """Every Winograd convolution of the test runs with this one tiling."""
    monkeypatch.setattr(winograd, "TILINGS", (request.param,))
    winograd.choose_layout.cache_clear()
    yield request.param
    winograd.choose_layout.cache_clear()


@pytest.mark.parametrize("cin, cout, bias, shape", WINOGRAD_CASES)
def test_winograd_matches_native(cin, cout, bias, shape, only_tiling):
    layout = winograd.choose_layout(shape[0], shape[2], shape[3])
    assert layout.tiling == only_tiling and layout.chunks[0] <= winograd.TILE_CHUNK
    rng = np.random.default_rng(SEED)
    native = build_conv2d(cin, cout, 3, padding=1, has_bias=bias, impl="native")
    fast = _winograd_always(build_conv2d(cin, cout, 3, padding=1, has_bias=bias,
                                         impl="winograd"))
    _assert_same(native, fast, shape, rng)


@pytest.mark.parametrize("cin, cout, bias, shape", WINOGRAD_CASES)
def test_winograd_operators_differentiate_themselves_like_the_layer(cin, cout, bias, shape,
                                                                    only_tiling):
    """`winograd_conv3x3`, differentiated through its operators' own backward (which keeps U
    and V), gives the gradients of `WinogradConvFunction`'s recomputing bprop."""
    rng = np.random.default_rng(SEED)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    weight = Tensor(rng.standard_normal((cout, cin, 3, 3)).astype(np.float32))

    def loss(function):
        def value(x, weight):
            y = function(x, weight)
            return (y * Tensor(np.cos(np.arange(y.size)).reshape(y.shape).astype(np.float32))).sum()
        return ms.grad(value, grad_position=(0, 1))(x, weight)

    for ours, layers in zip(loss(winograd.winograd_conv3x3), loss(winograd.WinogradConvFunction())):
        np.testing.assert_allclose(ours.asnumpy(), layers.asnumpy(), rtol=1e-6,
                                   atol=1e-6 * np.abs(layers.asnumpy()).max())


@pytest.mark.parametrize("layout", ["row_table", "swap_last_axes"])
def test_layout_kernels_differentiate_themselves(layout):
    """The C++ layout operators' own backward (each the other's adjoint) gives the gradient of
    the same layout change made of MindSpore operators."""
    from instaboost.models.layers import conv

    def change(use_kernel):
        if layout == "row_table":
            return lambda x: conv._to_row_table(x, 1, use_kernel)
        return lambda x: conv._swap_last_axes(x, use_kernel)

    rng = np.random.default_rng(SEED)
    x = Tensor(rng.standard_normal((2, 5, 3, 4)).astype(np.float32))
    weights = Tensor(rng.standard_normal(change(False)(x).shape).astype(np.float32))
    kernel, reference = (ms.grad(lambda x, f=change(k): (f(x) * weights).sum())(x)
                         for k in (True, False))
    np.testing.assert_array_equal(kernel.asnumpy(), reference.asnumpy())


@pytest.mark.parametrize("kernel_size, stride, groups", [(3, 1, 1), (3, 2, 2), (1, 2, 1)])
def test_unfold_forward_on_the_kernel_matmul_compiles_under_jit(kernel_size, stride, groups):
    # The module docstring's graph-mode claim: the same output compiled as in PyNative.
    conv = UnfoldConv2d(4, 6, kernel_size, stride=stride, padding=kernel_size // 2,
                        groups=groups, matmul_impl="kernel")
    x = Tensor(np.random.default_rng(SEED).standard_normal((2, 4, 9, 7)).astype(np.float32))

    def forward(inputs):
        return conv(inputs)

    np.testing.assert_allclose(ms.jit(forward)(x).asnumpy(), conv(x).asnumpy(), rtol=1e-6,
                               atol=1e-6)


def test_traced_winograd_forward_differentiates_on_new_inputs():
    """A forward traced with ``ms.jit(capture_mode="trace")`` through the Winograd operators,
    differentiated by PyNative's ``ms.grad``: the gradients of the eager layer on inputs of
    other values (two layers of other channel counts share each operator and its bprop)."""
    rng = np.random.default_rng(SEED)
    w1 = ms.Parameter(Tensor(rng.standard_normal((6, 3, 3, 3)).astype(np.float32)), name="w1")
    w2 = ms.Parameter(Tensor(rng.standard_normal((4, 6, 3, 3)).astype(np.float32)), name="w2")

    def forward(conv):
        def net(x):
            return (ops.relu(conv(ops.relu(conv(x, w1)), w2)) ** 2).sum()
        return net

    traced = ms.jit(forward(winograd.winograd_conv3x3), capture_mode="trace")
    compiled = ms.grad(lambda x: traced(x), None, [w1, w2])
    reference = ms.grad(forward(winograd.WinogradConvFunction()), None, [w1, w2])

    with traceable_call_stack():
        for _ in range(3):
            x = Tensor(rng.standard_normal((2, 3, 12, 10)).astype(np.float32))
            for ours, layers in zip(compiled(x), reference(x)):
                np.testing.assert_allclose(ours.asnumpy(), layers.asnumpy(), rtol=1e-4,
                                           atol=1e-4 * np.abs(layers.asnumpy()).max())


def _winograd_always(conv):
    """`conv` with its small-input fallback to unfold switched off (tests use tiny inputs)."""
    assert isinstance(conv, WinogradConv2d)
    conv.min_point_channels = 0
    return conv


def test_winograd_conv_falls_back_to_unfold_on_small_inputs(monkeypatch):
    conv = build_conv2d(256, 8, 3, padding=1, impl="winograd")
    # products per channel pair x 256 channels, F4 tiles of 36 products each:
    assert not conv.uses_winograd((2, 256, 12, 12))    # 18 tiles
    assert conv.uses_winograd((2, 256, 32, 32))        # 128 tiles
    assert not conv.uses_winograd((7, 256, 14, 14))    # 104 tiles on one canvas
    assert conv.uses_winograd((8, 256, 14, 14))        # 120 tiles on one canvas
    calls = []
    monkeypatch.setattr(type(conv.winograd), "construct",
                        lambda self, x, w: calls.append(x.shape) or ops.zeros((1,)))
    rng = np.random.default_rng(SEED)
    native = build_conv2d(256, 8, 3, padding=1, impl="native")
    _assert_same(native, conv, (1, 256, 6, 5), rng)     # exact via the unfold path
    assert not calls


@pytest.mark.parametrize("side", [2, 5, 14])
def test_winograd_canvas_layouts_of_many_batches_match_native(side, only_tiling):
    """Every batch size from 1 to 12, on separate or shared canvases: the kernel's canvas (C++)
    and choose_canvas (Python) agree (the kernel rejects tile tensors sized for another layout),
    and images next to each other on a canvas do not leak into each other, forward or
    backward."""
    rng = np.random.default_rng(SEED)
    native = build_conv2d(2, 3, 3, padding=1, has_bias=True, impl="native")
    fast = _winograd_always(build_conv2d(2, 3, 3, padding=1, has_bias=True, impl="winograd"))
    for batch in range(1, 13):
        _assert_same(native, fast, (batch, 2, side, side), rng)


def test_winograd_maps_with_equal_tile_counts_keep_their_sizes(only_tiling):
    """4x4, 2x2 and 3x3 maps are one tile each: the same tile tensors, different outputs (as the
    RPN head sees P5 and P6). MindSpore caches AOT output shapes by input shapes."""
    rng = np.random.default_rng(SEED)
    native = build_conv2d(4, 4, 3, padding=1, impl="native")
    fast = _winograd_always(build_conv2d(4, 4, 3, padding=1, impl="winograd"))
    for side in (4, 2, 3, 4):
        _assert_same(native, fast, (2, 4, side, side), rng)


def test_winograd_layouts():
    """Separate images unless a shared canvas has strictly fewer tiles; the tiling of least
    cost (products plus weight-domain work), F4 on a tie."""
    assert winograd.choose_canvas(2, 128, 128) == winograd.Canvas(1, 1, 2, 32, 32)
    assert winograd.choose_canvas(1, 14, 14) == winograd.Canvas(1, 1, 1, 4, 4)
    assert winograd.choose_canvas(7, 14, 14) == winograd.Canvas(1, 7, 1, 26, 4)   # 104 < 112
    assert winograd.choose_canvas(17, 14, 14) == winograd.Canvas(3, 6, 1, 23, 11)  # 253 < 272
    assert winograd.choose_canvas(128, 14, 14).tiles == 1771                      # 2048 apart
    assert winograd.choose_canvas(600, 14, 14).tiles > winograd.TILE_CHUNK
    # two of the shared canvases test_winograd_canvas_layouts_of_many_batches_match_native runs
    assert winograd.choose_canvas(5, 5, 5) == winograd.Canvas(2, 3, 1, 5, 3)          # 15 < 20
    assert winograd.choose_canvas(3, 2, 2, winograd.F6) == winograd.Canvas(2, 2, 1, 1, 1)
    F4, F6 = winograd.F4, winograd.F6
    assert winograd.choose_canvas(128, 14, 14, F6) == winograd.Canvas(2, 64, 1, 160, 5)
    assert [winograd.choose_layout(2, side, side).tiling for side in (128, 64, 32, 16, 8)] == \
        [F6, F6, F4, F4, F4]          # 32x32: 4224 + 50 x 64 > 4608 + 50 x 36 (cost)
    assert winograd.choose_layout(128, 14, 14) == \
        winograd.Layout(F6, winograd.choose_canvas(128, 14, 14, F6))   # 800 x 64 < 1771 x 36


def test_winograd_tile_chunks():
    def chunks(batch, height, width):
        return winograd.Layout(winograd.F4, winograd.choose_canvas(batch, height, width)).chunks
    assert chunks(1, 200, 180) == (winograd.TILE_CHUNK, 50 * 45 - winograd.TILE_CHUNK)
    assert chunks(256, 14, 14) == (winograd.TILE_CHUNK, 3553 - winograd.TILE_CHUNK)
    assert chunks(2, 3, 5) == (3,)      # side by side: 11 columns, 3 tiles, not 4


@pytest.mark.parametrize("kernel, stride, padding, groups", [
    pytest.param(3, 2, 1, 1, id="stride2"),
    pytest.param(3, 1, 1, 2, id="groups2"),
    pytest.param(3, 1, 0, 1, id="no-padding"),
    pytest.param(1, 1, 0, 1, id="1x1"),
    pytest.param(7, 2, 3, 1, id="7x7"),
])
def test_winograd_impl_falls_back_to_unfold(kernel, stride, padding, groups):
    conv = build_conv2d(4, 4, kernel, stride=stride, padding=padding, groups=groups,
                        impl="winograd")
    assert isinstance(conv, UnfoldConv2d) and not isinstance(conv, WinogradConv2d)
    assert isinstance(build_deconv2x2(4, 4, impl="winograd"), UnfoldDeconv2x2)


@pytest.mark.parametrize("impl", ["unfold", "winograd"])
@pytest.mark.parametrize("kernel_size, stride, padding", [(3, 1, 1), (1, 2, 0), (1, 1, 0)])
def test_empty_batch_gives_an_empty_output_as_native(impl, kernel_size, stride, padding):
    # No RoIs: the native convolution returns (0, O, Ho, Wo) and zero parameter gradients
    # (with a bias and a ReLU, as in the mask head, whose fused kernel the empty batch skips).
    x = Tensor(np.zeros((0, 8, 14, 13), np.float32))
    settings = dict(stride=stride, padding=padding, has_bias=True, activation="relu")
    native = build_conv2d(8, 6, kernel_size, impl="native", **settings)
    conv = build_conv2d(8, 6, kernel_size, impl=impl, **settings)
    assert conv(x).shape == native(x).shape
    grads = ms.grad(lambda t: conv(t).sum(), None, [conv.weight, conv.bias])(x)
    assert grads[0].shape == conv.weight.shape and not grads[0].asnumpy().any()
    assert grads[1].shape == conv.bias.shape and not grads[1].asnumpy().any()


@pytest.mark.parametrize("groups, shape, chunk_bytes", [
    pytest.param(1, (1, 4, 12, 12), 4 * 144 * 4 * 2, id="tap-split"),
    pytest.param(2, (1, 4, 12, 12), 2 * 144 * 2 * 4 * 3, id="tap-split-groups"),
    pytest.param(1, (7, 4, 6, 6), 4 * 36 * 9 * 4 * 3, id="images-per-chunk"),
    pytest.param(2, (7, 4, 6, 6), 4 * 36 * 9 * 4 * 2, id="images-per-chunk-groups"),
])
@pytest.mark.parametrize("matmul_impl", ["mindspore", "kernel"])
def test_unfold_chunking_matches_native(groups, shape, chunk_bytes, matmul_impl):
    """Small patch budgets force splitting by kernel taps or batching several images."""
    rng = np.random.default_rng(SEED)
    native = build_conv2d(4, 6, 3, padding=1, groups=groups, impl="native")
    unfold = UnfoldConv2d(4, 6, 3, padding=1, groups=groups, chunk_bytes=chunk_bytes,
                          matmul_impl=matmul_impl)
    plan = unfold.function._plan(Tensor(np.zeros(shape, np.float32)), unfold.weight)
    assert len(plan.chunks) > shape[0] or len(plan.chunks) < shape[0]
    _assert_same(native, unfold, shape, rng)


def test_large_map_case_takes_the_shared_weight_path():
    """The two 1x1 stride-1 cases of CONV_CASES sit on either side of the path threshold."""
    assert 5 * 4 < MIN_SHARED_WEIGHT_PIXELS <= 14 * 15


@pytest.mark.parametrize("impl", ["unfold", "winograd"])
def test_deconv2x2_matches_native(impl):
    rng = np.random.default_rng(SEED)
    native = build_deconv2x2(4, 6, impl="native")
    unfold = build_deconv2x2(4, 6, impl=impl)
    assert isinstance(unfold, UnfoldDeconv2x2)
    _assert_same(native, unfold, (3, 4, 5, 3), rng)


# (kernel, input NCHW shape): a 3x3 convolution on its Winograd path, a 1x1 one on the
# shared-weight product, each with a bias and a ReLU (one C++ operator with impl "winograd").
RELU_CASES = [pytest.param(3, (2, 5, 13, 17), id="3x3-winograd"),
              pytest.param(1, (3, 6, 14, 15), id="1x1-large-map")]


@pytest.mark.parametrize("impl", ["unfold", "winograd"])
@pytest.mark.parametrize("kernel, shape", RELU_CASES)
def test_conv_with_relu_matches_native(kernel, shape, impl):
    rng = np.random.default_rng(SEED)
    cin, cout = shape[1], 7
    padding = kernel // 2
    native = build_conv2d(cin, cout, kernel, padding=padding, has_bias=True, impl="native",
                          activation="relu")
    fast = build_conv2d(cin, cout, kernel, padding=padding, has_bias=True, impl=impl,
                        activation="relu")
    if isinstance(fast, WinogradConv2d):
        _winograd_always(fast)    # the test's map is below the size that takes Winograd
        assert fast.uses_winograd(shape)
    _copy_parameters(native, fast)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    y = native(x).asnumpy()
    # The ReLU is there: about half the outputs are clipped, none below zero.
    assert y.min() == 0.0 and 0.2 < (y == 0).mean() < 0.8
    _assert_same(native, fast, shape, rng)


@pytest.mark.parametrize("impl", ["unfold", "winograd"])
def test_deconv2x2_with_relu_matches_native(impl):
    rng = np.random.default_rng(SEED)
    native = build_deconv2x2(4, 6, impl="native", activation="relu")
    fast = build_deconv2x2(4, 6, impl=impl, activation="relu")
    _assert_same(native, fast, (3, 4, 5, 3), rng)
    _copy_parameters(native, fast)
    assert (fast(Tensor(rng.standard_normal((3, 4, 5, 3)).astype(np.float32))).asnumpy()
            == 0).any()


@pytest.mark.parametrize("activation", ["none", "relu"])
@pytest.mark.parametrize("shape", [pytest.param((2, 3, 128, 128), id="planes-of-16k"),
                                   pytest.param((5, 4, 7, 3), id="planes-of-21"),
                                   pytest.param((4, 6), id="2-d")])
def test_bias_kernel_matches_mindspore(shape, activation):
    """The C++ bias (+ ReLU) operator against ops.bias_add (+ ops.relu): output, and the
    gradients of x and of the bias, which the kernel sums per channel on every core. Planes
    that are not a multiple of its 16 lanes take its tail loop."""
    rng = np.random.default_rng(SEED)
    x = Tensor(rng.standard_normal(shape).astype(np.float32))
    bias = Tensor(rng.standard_normal(shape[1]).astype(np.float32))
    dy = Tensor(rng.standard_normal(shape).astype(np.float32))

    def outputs(use_kernel):
        def objective(inputs, b):
            return (add_bias(inputs, b, activation, use_kernel=use_kernel) * dy).sum()
        dx, dbias = ms.grad(objective, grad_position=(0, 1))(x, bias)
        y = add_bias(x, bias, activation, use_kernel=use_kernel)
        return y.asnumpy(), dx.asnumpy(), dbias.asnumpy()

    for expected, got in zip(outputs(False), outputs(True)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_parameters_match_nn_conv2d_layout_and_init():
    native = build_conv2d(8, 16, 3, padding=1, has_bias=True, impl="native")
    unfold = build_conv2d(8, 16, 3, padding=1, has_bias=True, impl="unfold")
    fast = build_conv2d(8, 16, 3, padding=1, has_bias=True, impl="winograd")
    names = lambda cell: [(n, tuple(p.shape)) for n, p in cell.parameters_and_names()]
    assert names(native) == names(unfold) == names(fast) == \
        [("weight", (16, 8, 3, 3)), ("bias", (16,))]
    fan_in = 8 * 3 * 3
    # HeUniform(negative_slope=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in)
    bound = 1.0 / math.sqrt(fan_in)
    for cell in (unfold, fast):
        weight = cell.weight.asnumpy()
        assert np.abs(weight).max() <= bound and weight.std() > bound / 4
        assert np.abs(cell.bias.asnumpy()).max() <= bound
    # With a ReLU, the same names: a checkpoint loads whichever impl or activation built it.
    assert names(build_conv2d(8, 16, 3, padding=1, has_bias=True, impl="native",
                              activation="relu")) == names(native)
    deconv_names = lambda cell: [(n, tuple(p.shape)) for n, p in cell.parameters_and_names()]
    assert deconv_names(build_deconv2x2(4, 6, impl="native")) == \
        deconv_names(build_deconv2x2(4, 6, impl="native", activation="relu")) == \
        deconv_names(build_deconv2x2(4, 6, impl="unfold")) == \
        [("weight", (4, 6, 2, 2)), ("bias", (6,))]


@pytest.mark.parametrize("impl", ["unfold", "winograd"])
def test_disable_input_grad_keeps_weight_grads(impl):
    rng = np.random.default_rng(SEED)
    reference = build_conv2d(3, 4, 7, stride=2, padding=3, impl=impl)
    stem = disable_input_grad(build_conv2d(3, 4, 7, stride=2, padding=3, impl=impl))
    _copy_parameters(reference, stem)
    x = Tensor(rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    dy = Tensor(rng.standard_normal(reference(x).shape).astype(np.float32))
    _, dx_ref, dw_ref = _forward_and_grads(reference, x, dy)
    _, dx, dw = _forward_and_grads(stem, x, dy)
    assert np.abs(dx_ref).max() > 0 and np.all(dx == 0)
    assert _relative_error(dw_ref[0], dw[0]) < RTOL
    native = build_conv2d(3, 4, 3, impl="native")
    assert disable_input_grad(native) is native


def test_subsample_forward_and_gradient():
    x = Tensor(np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4))
    np.testing.assert_array_equal(subsample(x, (2, 2)).asnumpy(), x.asnumpy()[:, :, ::2, ::2])
    grad = ms.grad(lambda t: subsample(t, (2, 2)).sum())(x).asnumpy()
    expected = np.zeros(x.shape, np.float32)
    expected[:, :, ::2, ::2] = 1
    np.testing.assert_array_equal(grad, expected)


def test_unfold_never_runs_native_convolution(monkeypatch):
    """Record the primitives the unfold layers dispatch from Python (forward and bprop)."""
    if not hasattr(ms_primitive, "_run_op"):
        pytest.skip("this MindSpore version has no mindspore.ops.primitive._run_op to observe")
    seen = set()
    original = ms_primitive._run_op

    def recording_run_op(obj, op_name, args):
        seen.add(op_name)
        return original(obj, op_name, args)

    monkeypatch.setattr(ms_primitive, "_run_op", recording_run_op)
    x = Tensor(np.ones((1, 4, 6, 6), np.float32))
    native = build_conv2d(4, 4, 3, padding=1, impl="native")
    ms.grad(lambda t: native(t).sum(), grad_position=0, weights=native.trainable_params())(x)
    assert any("Conv" in name for name in seen), "the recorder does not observe convolutions"
    seen.clear()
    cells = [build_conv2d(4, 4, 3, padding=1, impl="unfold"),
             _winograd_always(build_conv2d(4, 4, 3, padding=1, impl="winograd")),
             build_conv2d(4, 4, 1, stride=2, impl="unfold"),
             build_deconv2x2(4, 4, impl="unfold")]
    for cell in cells:
        ms.grad(lambda t, c=cell: c(t).sum(), grad_position=0, weights=cell.trainable_params())(x)
    assert seen and not any("Conv" in name for name in seen), sorted(seen)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="impl"):
        build_conv2d(4, 4, 3, impl="fast")
    with pytest.raises(ValueError, match="impl"):
        build_deconv2x2(4, 4, impl="fast")
    with pytest.raises(ValueError, match="divisible"):
        build_conv2d(4, 6, 3, groups=4, impl="unfold")
    for impl in ("native", "unfold", "winograd"):
        with pytest.raises(ValueError, match="activation must be one of"):
            build_conv2d(4, 4, 3, impl=impl, activation="gelu")
        with pytest.raises(ValueError, match="activation must be one of"):
            build_deconv2x2(4, 4, impl=impl, activation="gelu")
    for impl in ("unfold", "winograd"):
        conv = build_conv2d(4, 4, 5, impl=impl)
        with pytest.raises(ValueError, match="smaller than kernel"):
            conv(ops.zeros((1, 4, 3, 3), ms.float32))


# bfloat16 products (operands rounded to 8 significant bits, float32 sums): errors of a few
# 1e-3 of the output's scale, as in bfloat16 mixed-precision training.
BF16_RTOL = 1e-2


def _bfloat16_errors(native: nn.Cell, fast: nn.Cell, x_shape, rng) -> List[float]:
    """Relative errors of `fast` under bfloat16 precision against `native` (float32): output,
    input gradient, then each parameter gradient."""
    from instaboost.models.layers.gemm import use_matmul_precision

    _copy_parameters(native, fast)
    x = Tensor(rng.standard_normal(x_shape).astype(np.float32))
    dy = Tensor(rng.standard_normal(native(x).shape).astype(np.float32))
    expected = _forward_and_grads(native, x, dy)
    with use_matmul_precision("bfloat16"):
        got = _forward_and_grads(fast, x, dy)
    pairs = [(expected[0], got[0]), (expected[1], got[1])] + list(zip(expected[2], got[2]))
    return [_relative_error(ref, out) for ref, out in pairs]


@pytest.mark.parametrize("kernel, stride, padding, shape, winograd_path", [
    pytest.param(3, 1, 1, (2, 16, 24, 20), True, id="winograd-3x3-stays-float32"),
    pytest.param(3, 2, 1, (2, 16, 17, 15), False, id="unfold-3x3-s2"),
    pytest.param(1, 1, 0, (2, 16, 15, 14), False, id="1x1-shared-weight"),
])
def test_bfloat16_precision_stays_close_to_native(kernel, stride, padding, shape, winograd_path):
    """hardware.matmul_precision=bfloat16: the same layers, within bfloat16 rounding of the
    float32 result, forward and backward (and measurably not float32, i.e. the setting acts);
    Winograd's products stay float32."""
    rng = np.random.default_rng(SEED)
    native = build_conv2d(16, 24, kernel, stride=stride, padding=padding, has_bias=True,
                          impl="native")
    fast = build_conv2d(16, 24, kernel, stride=stride, padding=padding, has_bias=True,
                        impl="winograd")
    if winograd_path:
        assert _winograd_always(fast).uses_winograd(shape)
    else:
        assert isinstance(fast, UnfoldConv2d) and fast.matmul_impl == "kernel"
        assert not (isinstance(fast, WinogradConv2d) and fast.uses_winograd(shape))
    errors = _bfloat16_errors(native, fast, shape, rng)
    if winograd_path:
        assert max(errors) < RTOL, errors
    else:
        assert 1e-5 < max(errors) < BF16_RTOL, errors


def test_bfloat16_deconv2x2_stays_close_to_native():
    rng = np.random.default_rng(SEED)
    errors = _bfloat16_errors(build_deconv2x2(16, 8, impl="native"),
                              build_deconv2x2(16, 8, impl="winograd"), (3, 16, 14, 14), rng)
    assert 1e-5 < max(errors) < BF16_RTOL, errors


@pytest.mark.parametrize("groups", [1, 2])
def test_layout_kernels_equal_mindspore_transposes(groups):
    """The unfold convolutions' layout changes through kernels/cpu/transpose.cc are the same
    permutations as MindSpore's transposes (exact: they only move values)."""
    from instaboost.models.layers import conv
    rng = np.random.default_rng(SEED)
    x = Tensor(rng.standard_normal((3, 6, 5, 7)).astype(np.float32))
    weight = Tensor(rng.standard_normal((8, 6 // groups, 3, 3)).astype(np.float32))
    for use_kernel in (False, True):
        table = conv._to_row_table(x, groups, use_kernel)
        if use_kernel:
            np.testing.assert_array_equal(table.asnumpy(), expected_table)
            np.testing.assert_array_equal(
                conv._row_table_to_nchw(table, groups, 3, 6, 5, 7, True).asnumpy(), x.asnumpy())
            np.testing.assert_array_equal(conv._weight_matrix(weight, groups, (0, 9), True)
                                          .asnumpy(), expected_wmat)
            np.testing.assert_array_equal(conv._weight_matrix(weight, groups, (2, 4), True)
                                          .asnumpy(), expected_part)
            np.testing.assert_array_equal(conv._weight_from_matrix(
                Tensor(expected_wmat), weight.shape, True).asnumpy(), weight.asnumpy())
        else:
            expected_table = table.asnumpy()
            expected_wmat = conv._weight_matrix(weight, groups, (0, 9)).asnumpy()
            expected_part = conv._weight_matrix(weight, groups, (2, 4)).asnumpy()
    assert expected_table[-1].tolist() == [0.0] * (6 // groups)


@pytest.mark.parametrize("channels, widths, ok", [(1, (2, 2), True), (2, (1, 1, 1, 1), True),
                                                  (3, (3, 1), True), (4, (1, 3), False),
                                                  (5, (1, 1, 2), False)])
def test_winograd_kernel_refuses_chunks_it_cannot_index(channels, widths, ok):
    """Tile t of the input lies in chunk t / (first chunk's width): a last chunk wider than the
    first (the total still right) sent tiles past the chunk list, a write through a wild pointer.
    (Each case has its own channel count: MindSpore reuses an AOT function's inferred output
    shapes for the same input shapes.)"""
    library = native_kernels.kernel_library("winograd_conv3x3")
    op = ops.Custom(f"{library}:WinogradF4Input", func_type="aot",
                    out_shape=lambda x: tuple((36, x[1], w) for w in widths),
                    out_dtype=lambda x: tuple(ms.float32 for _ in widths))
    x = Tensor(np.ones((4, channels, 4, 4), np.float32))   # 4 separate images, one F4 tile each
    if ok:
        assert sum(o.shape[2] for o in op(x)) == 4
    else:
        with pytest.raises(RuntimeError, match=r"function\(WinogradF4Input\) is 1"):
            [o.asnumpy() for o in op(x)]
