"""Batch norm with its activation: the fused C++ kernels (kernels/cpu/batch_norm.cc) against
MindSpore's BatchNorm + ReLU + add, forward, every gradient and the running statistics."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from instaboost.models.backbone import ResNet
from instaboost.models.backbone.resnet import Bottleneck
from instaboost.models.layers.native_kernels import layer_impl_for
from instaboost.models.layers.norm import BatchNormAct2d, build_norm

# (2, 5, 7, 9): odd sizes; (1, 3, 40, 40): 1600 values per plane, across the kernel's 1024-value
# partial sums; (3, 4, 1, 1): three values per channel.
SHAPES = [(2, 5, 7, 9), (1, 3, 40, 40), (3, 4, 1, 1)]
ACTIVATIONS = ["none", "relu", "add_relu"]
RTOL = 2e-5


def _pair(activation, channels, rng):
    """A MindSpore-path and a kernel-path cell with the same (non-trivial) gamma and beta."""
    cells = [build_norm("bn", channels, activation=activation, impl=impl)
             for impl in ("mindspore", "kernel")]
    gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    beta = rng.uniform(-1.0, 1.0, channels).astype(np.float32)
    for cell in cells:
        cell.gamma.set_data(Tensor(gamma))
        cell.beta.set_data(Tensor(beta))
        cell.set_train(True)
    return cells


def _close(got, ref):
    scale = max(float(np.abs(ref).max()), 1.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_mindspore(activation, shape):
    rng = np.random.default_rng(0)
    # A mean far from zero: the variance must not come from E[x²] - mean².
    x = Tensor(rng.normal(3.0, 2.0, shape).astype(np.float32))
    residual = Tensor(rng.normal(0.0, 1.0, shape).astype(np.float32))
    dy = Tensor(rng.normal(0.0, 1.0, shape).astype(np.float32))
    inputs = (x, residual) if activation == "add_relu" else (x,)
    results = []
    for cell in _pair(activation, shape[1], rng):
        y = cell(*inputs).asnumpy()
        running = (cell.moving_mean.asnumpy(), cell.moving_variance.asnumpy())
        input_grads, (dgamma, dbeta) = ms.grad(
            lambda *a, c=cell: (c(*a) * dy).sum(), grad_position=tuple(range(len(inputs))),
            weights=[cell.gamma, cell.beta])(*inputs)
        input_grads = input_grads if isinstance(input_grads, tuple) else (input_grads,)
        results.append((y, running, [g.asnumpy() for g in input_grads],
                        dgamma.asnumpy(), dbeta.asnumpy()))
    (y_ref, running_ref, dx_ref, dgamma_ref, dbeta_ref), (y, running, dx, dgamma, dbeta) = results
    _close(y, y_ref)
    if activation != "none":
        assert (y >= 0).all() and (y == 0).any()
    for got, ref in zip(running, running_ref):      # after one forward: unbiased variance
        _close(got, ref)
    assert len(dx) == len(dx_ref) == len(inputs)
    for got, ref in zip(dx, dx_ref):
        _close(got, ref)
    _close(dgamma, dgamma_ref)
    _close(dbeta, dbeta_ref)
    # The kernel cell (last) returns the same zero tensors as its statistics' gradients every
    # backward pass: nothing may have written into them.
    assert cell.impl == "kernel"
    assert not any(zeros.asnumpy().any() for zeros in cell.no_gradients)


def test_eval_mode_and_fixed_statistics_run_on_mindspore():
    rng = np.random.default_rng(1)
    reference, kernel = _pair("relu", 4, rng)
    for cell in (reference, kernel):
        cell.moving_mean.set_data(Tensor(rng.normal(size=4).astype(np.float32)))
        cell.moving_variance.set_data(Tensor(rng.uniform(0.5, 2.0, 4).astype(np.float32)))
    kernel.moving_mean.set_data(reference.moving_mean.value())
    kernel.moving_variance.set_data(reference.moving_variance.value())
    x = Tensor(rng.normal(size=(2, 4, 5, 5)).astype(np.float32))
    for cell in (reference, kernel):
        cell.set_train(False)
    np.testing.assert_array_equal(kernel(x).asnumpy(), reference(x).asnumpy())
    assert build_norm("bn", 4, norm_eval=True, impl="kernel").impl == "mindspore"
    assert build_norm("frozen_bn", 4, impl="kernel").impl == "mindspore"
    assert build_norm("bn", 4, frozen=True, impl="kernel").impl == "mindspore"
    assert layer_impl_for("winograd") == "kernel" and layer_impl_for("unfold") == "mindspore"


def test_a_nan_input_is_not_hidden_by_the_relu():
    _, kernel = _pair("relu", 2, np.random.default_rng(2))
    x = np.ones((1, 2, 3, 3), np.float32)
    x[0, 1, 1, 1] = np.nan
    y = kernel(Tensor(x)).asnumpy()
    assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, 0]).all()


@pytest.mark.parametrize("activation, x_shape, residual_shape", [
    ("add_relu", (2, 4, 8, 8), (1, 4, 8, 8)),   # a residual of another shape: read past its end
    ("relu", (2, 6, 8, 8), None),               # more channels than gamma, beta and the statistics
])
def test_the_kernel_refuses_tensors_of_other_shapes(activation, x_shape, residual_shape):
    norm = BatchNormAct2d(4, activation=activation, impl="kernel")
    norm.set_train(True)
    inputs = [Tensor(np.ones(x_shape, np.float32))]
    if residual_shape is not None:
        inputs.append(Tensor(np.ones(residual_shape, np.float32)))
    with pytest.raises(RuntimeError, match=r"function\(BatchNorm\w*Train\) is 1"):
        norm(*inputs).asnumpy()


@pytest.mark.parametrize("impl", ["mindspore", "kernel"])
def test_one_value_per_channel_is_refused_in_training(impl):
    """Its batch variance is 0/0: MindSpore's running variance became NaN, the kernel's 0.9 x."""
    cell = build_norm("bn", 4, impl=impl)
    cell.set_train(True)
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 4, 1, 1\)"):
        cell(Tensor(np.ones((1, 4, 1, 1), np.float32)))
    cell.set_train(False)   # running statistics: any shape
    assert cell(Tensor(np.ones((1, 4, 1, 1), np.float32))).shape == (1, 4, 1, 1)


def test_bad_settings_name_the_option():
    with pytest.raises(ValueError, match="activation"):
        BatchNormAct2d(4, activation="gelu")
    with pytest.raises(ValueError, match="norm impl"):
        BatchNormAct2d(4, impl="cuda")


def test_resnet_uses_the_kernel_norms_with_winograd():
    net = ResNet(depth=50, conv_impl="winograd")
    norms = [cell for _, cell in net.cells_and_names() if isinstance(cell, BatchNormAct2d)]
    assert len(norms) == 53 and all(cell.impl == "kernel" for cell in norms)
    assert net.bn1.activation == "relu" and net.layer1[0].bn2.activation == "relu"
    assert net.layer1[0].bn3.activation == "add_relu"
    assert net.layer1[0].downsample[1].activation == "none"


def test_bottleneck_with_kernel_norms_matches_mindspore_norms_in_training():
    """The block's wiring (BN + ReLU twice, BN + identity + ReLU, the downsample's BN): its
    kernel norms against the same cells on MindSpore's BatchNorm, ReLU and add."""
    block = Bottleneck(32, 16, stride=2, conv_impl="winograd")     # with a downsample branch
    rng = np.random.default_rng(4)
    for param in block.trainable_params():
        param.set_data(Tensor(rng.uniform(-0.3, 0.3, param.shape).astype(np.float32)
                              + (1.0 if param.name.endswith("gamma") else 0.0)))
    norms = [cell for _, cell in block.cells_and_names() if isinstance(cell, BatchNormAct2d)]
    assert len(norms) == 4 and all(cell.impl == "kernel" for cell in norms)
    block.set_train(True)
    x = Tensor(rng.standard_normal((2, 32, 12, 12)).astype(np.float32))
    dy = Tensor(rng.standard_normal((2, 64, 6, 6)).astype(np.float32))
    params = block.trainable_params()

    def run():
        y = block(x).asnumpy()
        dx, dparams = ms.grad(lambda t: (block(t) * dy).sum(), grad_position=0,
                              weights=params)(x)
        return [y, dx.asnumpy()] + [g.asnumpy() for g in dparams]

    kernel_results = run()
    for cell in norms:                      # the same cells on MindSpore's kernels
        cell.function = None
    reference_results = run()
    assert len(kernel_results) == 2 + 12
    for got, ref in zip(kernel_results, reference_results):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
