"""The optimizer decays every trained parameter, as mmdetection's SGD does."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from instaboost.engine.optimizer import build_sgd
from instaboost.models.layers.conv import build_conv2d
from instaboost.models.layers.norm import build_norm

LR = 1.0
WEIGHT_DECAY = 0.1


@pytest.mark.parametrize("norm_impl", ["mindspore", "kernel"])
def test_weight_decay_reaches_every_parameter_norms_included(norm_impl):
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
    optimizer = build_sgd(params, learning_rate=LR, momentum=0.9, weight_decay=WEIGHT_DECAY)
    optimizer(tuple(ops.zeros_like(p) for p in params))
    for param in params:
        np.testing.assert_allclose(param.asnumpy(), 2.0 * (1 - LR * WEIGHT_DECAY), rtol=1e-6,
                                   err_msg=param.name)


def test_per_step_learning_rates_are_followed():
    """One rate per step (the schedules' warm-up and decay): step k updates with rate k."""
    param = ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name="w")
    rates = np.array([0.5, 0.25], np.float32)
    optimizer = build_sgd([param], learning_rate=ms.Tensor(rates), momentum=0.0, weight_decay=0.0)
    gradient = (ms.Tensor(np.ones(2, np.float32)),)
    optimizer(gradient)
    optimizer(gradient)
    np.testing.assert_allclose(param.asnumpy(), 1.0 - rates.sum())
