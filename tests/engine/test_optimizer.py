"""The optimizer decays every trained parameter, as mmdetection's SGD does; its C++ update
(impl "kernel") is nn.Momentum's."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from instaboost.engine.finite import kernel_all_finite
from instaboost.engine.optimizer import KernelMomentum, build_sgd
from instaboost.engine.train_step import build_loss_scaler, make_train_step
from instaboost.models.layers.conv import build_conv2d
from instaboost.models.layers.norm import build_norm

LR = 1.0
WEIGHT_DECAY = 0.1


@pytest.fixture(params=["mindspore", "kernel"])
def impl(request):
    return request.param


@pytest.mark.parametrize("norm_impl", ["mindspore", "kernel"])
def test_weight_decay_reaches_every_parameter_norms_included(norm_impl, impl):
    """With zero gradients, one SGD step at lr 1 scales every parameter by 1 - weight_decay:
    the batch norm's gamma and beta too (MindSpore skips names containing them when its
    optimizer is given one weight_decay for a plain parameter list)."""
    ms.set_seed(0)
    cells = nn.SequentialCell([build_conv2d(3, 4, 3, padding=1, has_bias=True, impl="unfold"),
                               build_norm("bn", 4, impl=norm_impl)])
    params = cells.trainable_params()
    for param in params:   # nonzero values everywhere (beta starts at 0)
        param.set_data(ms.Tensor(np.full(param.shape, 2.0, np.float32)))
    assert {p.name.rsplit(".", 1)[-1] for p in params} == {"weight", "bias", "gamma", "beta"}
    optimizer = build_sgd(params, learning_rate=LR, momentum=0.9, weight_decay=WEIGHT_DECAY,
                          impl=impl)
    optimizer(tuple(ops.zeros_like(p) for p in params))
    for param in params:
        np.testing.assert_allclose(param.asnumpy(), 2.0 * (1 - LR * WEIGHT_DECAY), rtol=1e-6,
                                   err_msg=param.name)


def test_per_step_learning_rates_are_followed(impl):
    """One rate per step (the schedules' warm-up and decay): step k updates with rate k."""
    param = ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name="w")
    rates = np.array([0.5, 0.25], np.float32)
    optimizer = build_sgd([param], learning_rate=ms.Tensor(rates), momentum=0.0, weight_decay=0.0,
                          impl=impl)
    gradient = (ms.Tensor(np.ones(2, np.float32)),)
    optimizer(gradient)
    optimizer(gradient)
    np.testing.assert_allclose(param.asnumpy(), 1.0 - rates.sum())


def test_kernel_update_equals_nn_momentum_bit_for_bit():
    """Three steps at per-step rates, momentum and weight decay, on parameters of several shapes
    (more values than one unit of the kernel's work): the same parameters, momentum buffers and
    step count as nn.Momentum, bit for bit, and MindSpore's operators read the updated values."""
    rng = np.random.default_rng(0)
    shapes = [(64, 3, 7, 7), (70_000,), (5,), (256, 256)]
    initial = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    rates = ms.Tensor(np.array([0.02, 0.01, 0.005], np.float32))

    def run(impl):
        params = [ms.Parameter(ms.Tensor(value.copy()), name=f"p{i}") for i, value in enumerate(initial)]
        optimizer = build_sgd(params, learning_rate=rates, momentum=0.9, weight_decay=1e-4,
                              impl=impl)
        grad_rng = np.random.default_rng(1)
        sums = []
        for _ in range(3):
            optimizer(tuple(ms.Tensor(grad_rng.standard_normal(p.shape).astype(np.float32))
                            for p in params))
            sums.append([float(ops.reduce_sum(p * 1.0).asnumpy()) for p in params])
        return optimizer, params, sums

    reference, ref_params, ref_sums = run("mindspore")
    kernel, params, sums = run("kernel")
    assert isinstance(kernel, KernelMomentum)
    for got, want in zip(list(params) + list(kernel.moments), list(ref_params) + list(reference.moments)):
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy(), err_msg=got.name)
    assert sums == ref_sums
    assert kernel.global_step.asnumpy().item() == reference.global_step.asnumpy().item() == 3
    assert not np.array_equal(params[0].asnumpy(), initial[0])


def test_build_sgd_rejects_an_unknown_impl():
    with pytest.raises(ValueError, match="optimizer impl"):
        build_sgd([ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name="w")], learning_rate=0.1,
                  momentum=0.9, weight_decay=0.0, impl="fused")


def test_kernel_update_inside_the_train_step_trains_as_nn_momentum():
    """Through make_train_step (gradients from value_and_grad, the update after the finiteness
    check): the same losses step after step and the same parameters, so the in-place update
    reaches the Parameters the next forward reads."""
    x = ms.Tensor(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    results = {}
    for impl in ("mindspore", "kernel"):
        ms.set_seed(0)
        net = nn.Dense(8, 4)

        def forward(inputs):
            return {"loss": (net(inputs) ** 2).mean()}

        optimizer = build_sgd(net.trainable_params(), learning_rate=0.1, momentum=0.9,
                              weight_decay=1e-4, impl=impl)
        step = make_train_step(forward, optimizer, loss_names=["loss"],
                               scaler=build_loss_scaler("none", 1.0),
                               finite_check=kernel_all_finite)
        losses = [step(x)[0].asnumpy().item() for _ in range(4)]
        results[impl] = losses, [p.asnumpy() for p in net.trainable_params()]
    assert results["kernel"][0] == results["mindspore"][0]
    assert results["kernel"][0][-1] < 0.5 * results["kernel"][0][0]
    for got, want in zip(results["kernel"][1], results["mindspore"][1]):
        np.testing.assert_array_equal(got, want)
