"""KernelDense (the C++ matmul kernel) against nn.Dense: parameters, outputs, gradients."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.common.initializer import XavierUniform, Zero

from instaboost.models.layers.gemm import use_matmul_precision
from instaboost.models.layers.linear import KernelDense, build_dense

SEED = 0


def _outputs_and_grads(cell, x, dy):
    def objective(inputs):
        return (cell(inputs) * dy).sum()
    dx, dparams = ms.grad(objective, grad_position=0, weights=cell.trainable_params())(x)
    return [cell(x).asnumpy(), dx.asnumpy()] + [g.asnumpy() for g in dparams]


def _relative_error(expected, actual):
    return float(np.abs(expected - actual).max() / np.abs(expected).max())


@pytest.mark.parametrize("precision, low, high", [("float32", 0.0, 1e-5),
                                                  ("bfloat16", 1e-5, 1e-2)])
def test_kernel_dense_matches_nn_dense(precision, low, high):
    rng = np.random.default_rng(SEED)
    reference = nn.Dense(300, 70, weight_init=XavierUniform(), bias_init=Zero())
    dense = build_dense(300, 70, impl="kernel", weight_init=XavierUniform(), bias_init=Zero())
    assert isinstance(dense, KernelDense)
    assert [(p.name, p.shape) for p in dense.trainable_params()] == \
        [(p.name, p.shape) for p in reference.trainable_params()]
    reference.bias.set_data(Tensor(rng.standard_normal(70).astype(np.float32)))
    for source, target in zip(reference.trainable_params(), dense.trainable_params()):
        target.set_data(source.data.copy())
    x = Tensor(rng.standard_normal((45, 300)).astype(np.float32))
    dy = Tensor(rng.standard_normal((45, 70)).astype(np.float32))
    expected = _outputs_and_grads(reference, x, dy)
    with use_matmul_precision(precision):
        got = _outputs_and_grads(dense, x, dy)
    assert len(got) == len(expected) == 4   # y, dx, dweight, dbias
    errors = [_relative_error(e, g) for e, g in zip(expected, got)]
    assert max(errors[:3]) >= low and max(errors) < high, errors


def test_build_dense_rejects_unknown_impl_and_activation():
    with pytest.raises(ValueError, match="dense impl"):
        build_dense(3, 4, impl="blas")
    with pytest.raises(ValueError, match="activation"):
        KernelDense(3, 4, activation="relu")
