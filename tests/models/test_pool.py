"""The stem's 3x3 / stride 2 / padding 1 max pooling: the C++ kernel (kernels/cpu/max_pool.cc)
against MindSpore's MaxPool2d, values and gradients."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from instaboost.models.layers.pool import KernelMaxPool3x3, build_stem_max_pool


# Even and odd sizes (a last window cut by the border), a 1x1 map, a wider-than-tall one.
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 9, 7), (1, 1, 1, 1), (2, 4, 5, 12)])
def test_kernel_matches_mindspore(shape):
    rng = np.random.default_rng(0)
    # Distinct values: the gradient then has one maximum per window on both paths.
    x = Tensor(rng.permutation(np.prod(shape)).reshape(shape).astype(np.float32))
    reference, kernel = build_stem_max_pool("mindspore"), build_stem_max_pool("kernel")
    assert isinstance(kernel, KernelMaxPool3x3)
    y_ref, y = reference(x).asnumpy(), kernel(x).asnumpy()
    assert y.shape == y_ref.shape
    np.testing.assert_array_equal(y, y_ref)
    dy = Tensor(rng.standard_normal(y.shape).astype(np.float32))
    grads = [ms.grad(lambda t, p=pool: (p(t) * dy).sum())(x).asnumpy()
             for pool in (reference, kernel)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_ties_send_the_gradient_to_the_first_maximum_and_nan_propagates():
    kernel = build_stem_max_pool("kernel")
    x = np.zeros((1, 1, 4, 4), np.float32)             # ReLU output: every window tied at 0
    dx = ms.grad(lambda t: kernel(t).sum())(Tensor(x)).asnumpy()[0, 0]
    # Windows start at rows/columns -1 and 1: their first in-map positions are (0, 0), (0, 1),
    # (1, 0), (1, 1).
    expected = np.zeros((4, 4), np.float32)
    expected[:2, :2] = 1.0
    np.testing.assert_array_equal(dx, expected)
    x[0, 0, 3, 3] = np.nan
    y = kernel(Tensor(x)).asnumpy()[0, 0]
    assert np.isnan(y[1, 1]) and not np.isnan(y[0, 0])


def test_unknown_impl_names_the_option():
    with pytest.raises(ValueError, match="pool impl"):
        build_stem_max_pool("cuda")
