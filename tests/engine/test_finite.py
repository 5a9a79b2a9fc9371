"""The C++ gradient check (kernels/cpu/all_finite.cc) against NumPy's isfinite."""
import numpy as np
import pytest
from mindspore import Tensor, amp

from instaboost.engine.finite import build_finite_check, kernel_all_finite

# Sizes around the kernel's 65,536-element chunks, a scalar-like tensor and a 4-D one.
SHAPES = [(3,), (65536,), (65537,), (2, 70000), (1,), (4, 3, 5, 7)]


def _tensors(rng):
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]


def test_finite_gradients_pass():
    arrays = _tensors(np.random.default_rng(0))
    arrays[1][:] = np.finfo(np.float32).max          # the largest finite value is finite
    arrays[2][:10] = np.finfo(np.float32).tiny / 4   # so are subnormals
    result = kernel_all_finite([Tensor(a) for a in arrays])
    assert result.shape == () and bool(result) is True


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor,flat_index", [
    (0, 0), (1, 65535), (2, 65536), (3, 0), (3, 139999), (4, 0), (5, 419)])
def test_one_non_finite_value_anywhere_fails(bad, tensor, flat_index):
    arrays = _tensors(np.random.default_rng(1))
    arrays[tensor].reshape(-1)[flat_index] = bad
    tensors = [Tensor(a) for a in arrays]
    assert bool(kernel_all_finite(tensors)) is False
    assert bool(amp.all_finite(tensors)) is False    # the check it replaces agrees


def test_the_cpu_kernel_check_is_chosen_with_the_cpu_kernels():
    assert build_finite_check(True) is kernel_all_finite
    assert build_finite_check(False) is amp.all_finite
