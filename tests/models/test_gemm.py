"""The C++ matmul kernel (kernels/cpu/gemm.cc) against NumPy, in every layout the convolution
paths use, with sizes that cross its register-tile and cache-block edges, in float32 and in
bfloat16 precision (operands rounded to bfloat16, float32 accumulation)."""
import platform

import numpy as np
import pytest
from mindspore import Tensor

from instaboost.models.layers.gemm import (kernel_op, matmul, matmul_precision, product_shape,
                                           set_matmul_precision, use_matmul_precision)
from instaboost.models.layers.native_kernels import kernel_library
from tests.helpers import traceable_call_stack

SEED = 0
RTOL = 1e-5


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), as float32: the kernel's packed operands."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def _operands(rng, a_shape, b_shape):
    return (rng.standard_normal(a_shape).astype(np.float32),
            rng.standard_normal(b_shape).astype(np.float32))


def _reference(a, b, transpose_a, transpose_b):
    a = np.swapaxes(a, -1, -2) if transpose_a else a
    b = np.swapaxes(b, -1, -2) if transpose_b else b
    return np.matmul(a.astype(np.float64), b.astype(np.float64))


# (a shape, b shape, transpose_a, transpose_b): M, N off the 14 x 32 register tile; K over one
# 192 block (uneven split); M over one 140 block; N narrow (rows split) and wide (slivers split);
# 2-D operands shared by every batch item of a 3-D one; one item with a small output and a
# deep K, split over K between the threads (K 9001: uneven blocks, a partial last one).
CASES = [
    pytest.param((5, 7), (7, 9), False, False, id="tiny"),
    pytest.param((37, 450), (450, 45), False, False, id="k-blocks"),
    pytest.param((300, 70), (70, 33), False, False, id="m-blocks-narrow-n"),
    pytest.param((29, 130), (1000, 130), False, True, id="nt-wide-n"),
    pytest.param((260, 301), (260, 129), True, False, id="tn-m-and-k-blocks"),
    pytest.param((3, 13, 20), (3, 20, 70), False, False, id="batched"),
    pytest.param((13, 20), (4, 20, 70), False, False, id="shared-a"),
    pytest.param((4, 13, 20), (70, 20), False, True, id="shared-b-nt"),
    pytest.param((20, 13), (4, 20, 70), True, False, id="shared-a-tn"),
    pytest.param((1, 64, 9001), (1, 9001, 147), False, False, id="split-k-nn"),
    pytest.param((64, 9001), (147, 9001), False, True, id="split-k-nt"),
    pytest.param((9001, 13), (9001, 70), True, False, id="split-k-tn"),
]


@pytest.mark.parametrize("a_shape, b_shape, transpose_a, transpose_b", CASES)
def test_kernel_matches_numpy_and_mindspore(a_shape, b_shape, transpose_a, transpose_b):
    rng = np.random.default_rng(SEED)
    a, b = _operands(rng, a_shape, b_shape)
    expected = _reference(a, b, transpose_a, transpose_b)
    for impl in ("kernel", "mindspore"):
        got = matmul(Tensor(a), Tensor(b), transpose_a, transpose_b, impl=impl).asnumpy()
        assert got.shape == expected.shape == product_shape(a_shape, b_shape, transpose_a,
                                                            transpose_b)
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() / scale < RTOL, impl


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("a_shape, b_shape, transpose_a, transpose_b", [
    pytest.param((0, 300), (300, 40), False, False, id="no-rows"),
    pytest.param((5, 300), (0, 300), False, True, id="no-columns"),
    pytest.param((0, 5, 300), (300, 7), False, False, id="no-batch-items"),
    pytest.param((300, 7), (0, 300, 5), True, False, id="no-batch-items-shared-a"),
    pytest.param((5, 0), (0, 7), False, False, id="no-depth"),
])
def test_empty_products(a_shape, b_shape, transpose_a, transpose_b, precision):
    """Zero RoIs reach the kernel as empty operands: an empty (or zero) product, not a crash (a
    product without rows divided by zero in the blocking) or an error."""
    a, b = np.ones(a_shape, np.float32), np.ones(b_shape, np.float32)
    got = kernel_op(transpose_a, transpose_b, precision=precision)(Tensor(a), Tensor(b)).asnumpy()
    expected = _reference(a, b, transpose_a, transpose_b)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


NCHW_CASES = [
    pytest.param((13, 20), (4, 20, 5, 7), False, False, (4, 13, 5, 7), id="w-times-images"),
    pytest.param((20, 13), (4, 20, 5, 7), True, False, (4, 13, 5, 7), id="wt-times-images"),
    pytest.param((4, 13, 5, 7), (4, 20, 5, 7), False, True, (4, 13, 20), id="images-nt"),
]


@pytest.mark.parametrize("a_shape, b_shape, transpose_a, transpose_b, out_shape", NCHW_CASES)
def test_nchw_operands_are_read_as_pixel_matrices(a_shape, b_shape, transpose_a, transpose_b,
                                                  out_shape):
    """(N, C, H, W) operands multiply as (N, C, H*W) with no reshape (what the 1x1
    convolutions pass), and a product over b's pixels keeps them as (H, W)."""
    rng = np.random.default_rng(SEED)
    a, b = _operands(rng, a_shape, b_shape)
    flat = [x.reshape(x.shape[:2] + (-1,)) if x.ndim > 3 else x for x in (a, b)]
    expected = _reference(*flat, transpose_a, transpose_b).reshape(out_shape)
    assert product_shape(a_shape, b_shape, transpose_a, transpose_b) == out_shape
    for impl in ("kernel", "mindspore"):
        got = matmul(Tensor(a), Tensor(b), transpose_a, transpose_b, impl=impl).asnumpy()
        assert got.shape == out_shape
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="-mno-avx512f is an x86 compiler flag")
def test_portable_build_without_avx512_matches_numpy():
    """conv_impl=winograd is the CPU default: its matmul must also work where the CPU has no
    AVX-512 (the build then uses the plain C++ micro-kernel)."""
    portable = ("-mno-avx512f",)
    assert kernel_library("gemm", portable) != kernel_library("gemm")
    rng = np.random.default_rng(SEED)
    for a_shape, b_shape, transpose_a, transpose_b in [((300, 70), (45, 70), False, True),
                                                       ((3, 260, 31), (260, 129), True, False),
                                                       ((37, 450), (450, 45), False, False)]:
        a, b = _operands(rng, a_shape, b_shape)
        expected = _reference(a, b, transpose_a, transpose_b)
        got = kernel_op(transpose_a, transpose_b, portable)(Tensor(a), Tensor(b)).asnumpy()
        assert np.abs(got - expected).max() / np.abs(expected).max() < RTOL


# Odd K (half a bfloat16 pair at the end), K over the 384 bfloat16 block (512 on AMX), every
# transposition, shared and batched operands, split K; on AMX also whole 32 x 32 tiles of C
# loaded and stored by the tile unit over several K blocks, beside edge tiles.
BF16_CASES = [CASES[0], CASES[1], CASES[3], CASES[4], CASES[7], CASES[8], *CASES[9:12],
              pytest.param((3, 40, 801), (3, 801, 50), False, False, id="batched-k-blocks"),
              pytest.param((70, 1100), (1100, 70), False, False, id="whole-tiles-k-blocks"),
              pytest.param((1100, 70), (1100, 66), True, False, id="tn-whole-tiles"),
              pytest.param((2, 64, 1030), (2, 96, 1030), False, True, id="nt-whole-tiles")]


@pytest.mark.parametrize("a_shape, b_shape, transpose_a, transpose_b", BF16_CASES)
def test_bfloat16_products_are_exact_on_rounded_operands(a_shape, b_shape, transpose_a,
                                                         transpose_b):
    """bfloat16 precision = the float32 product of the operands rounded to bfloat16: products
    of two bfloat16 values are exact in float32, so only the float32 summation differs."""
    rng = np.random.default_rng(SEED)
    a, b = _operands(rng, a_shape, b_shape)
    rounded = _reference(_round_to_bfloat16(a), _round_to_bfloat16(b), transpose_a, transpose_b)
    exact = _reference(a, b, transpose_a, transpose_b)
    with use_matmul_precision("bfloat16"):
        got = matmul(Tensor(a), Tensor(b), transpose_a, transpose_b, impl="kernel").asnumpy()
    scale = np.abs(exact).max()
    assert np.abs(got - rounded).max() / scale < RTOL
    # ... and the rounding really happened: bfloat16 keeps 8 significant bits.
    assert 1e-4 < np.abs(got - exact).max() / scale < 2e-2


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="-mno-avx512* are x86 compiler flags")
@pytest.mark.parametrize("flags", [("-mno-avx512bf16",), ("-mno-avx512f",)],
                         ids=["avx512-without-bf16", "no-avx512"])
def test_bfloat16_products_without_avx512_bf16(flags):
    """A CPU without AVX512_BF16 multiplies the same rounded operands with float32 FMAs."""
    rng = np.random.default_rng(SEED)
    for a_shape, b_shape, transpose_a, transpose_b in [((37, 451), (451, 45), False, False),
                                                       ((3, 260, 31), (260, 129), True, False),
                                                       ((29, 131), (70, 131), False, True)]:
        a, b = _operands(rng, a_shape, b_shape)
        rounded = _reference(_round_to_bfloat16(a), _round_to_bfloat16(b), transpose_a,
                             transpose_b)
        op = kernel_op(transpose_a, transpose_b, flags, "bfloat16")
        got = op(Tensor(a), Tensor(b)).asnumpy()
        assert np.abs(got - rounded).max() / np.abs(rounded).max() < RTOL


def test_matmul_precision_setting():
    assert matmul_precision() == "float32"
    with use_matmul_precision("bfloat16"):
        assert matmul_precision() == "bfloat16"
    assert matmul_precision() == "float32"
    with pytest.raises(ValueError, match="matmul precision"):
        set_matmul_precision("float16")
    with pytest.raises(ValueError, match="matmul precision"):
        kernel_op(False, False, (), "int8")


def test_product_shape_rejects_mismatches():
    with pytest.raises(ValueError, match="inner sizes"):
        product_shape((3, 4), (5, 6), False, False)
    with pytest.raises(ValueError, match="batch sizes"):
        product_shape((2, 3, 4), (3, 4, 5), False, False)
    with pytest.raises(ValueError, match="at least 2-D"):
        product_shape((3,), (3, 4), False, False)


def test_unknown_impl_is_an_error():
    x = Tensor(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="matmul impl"):
        matmul(x, x, impl="blas")


GRADIENT_CASES = CASES[:9] + [pytest.param(*case.values[:4], id=case.id) for case in NCHW_CASES]


def _reference_gradients(a, b, transpose_a, transpose_b, dout):
    """NumPy gradients of sum(op(a) · op(b) * dout), in float64 (4-D operands as matrices)."""
    flat_a = a.reshape(a.shape[:2] + (-1,)) if a.ndim > 3 else a
    flat_b = b.reshape(b.shape[:2] + (-1,)) if b.ndim > 3 else b
    op_a = np.swapaxes(flat_a, -1, -2) if transpose_a else flat_a
    op_b = np.swapaxes(flat_b, -1, -2) if transpose_b else flat_b
    dflat = dout.reshape(np.matmul(op_a, op_b).shape).astype(np.float64)
    d_op_a = np.matmul(dflat, np.swapaxes(op_b, -1, -2).astype(np.float64))
    d_op_b = np.matmul(np.swapaxes(op_a, -1, -2).astype(np.float64), dflat)
    da = np.swapaxes(d_op_a, -1, -2) if transpose_a else d_op_a
    db = np.swapaxes(d_op_b, -1, -2) if transpose_b else d_op_b
    if flat_a.ndim == 2 and da.ndim == 3:
        da = da.sum(0)
    if flat_b.ndim == 2 and db.ndim == 3:
        db = db.sum(0)
    return da.reshape(a.shape), db.reshape(b.shape)


@pytest.mark.parametrize("a_shape, b_shape, transpose_a, transpose_b", GRADIENT_CASES)
def test_kernel_operator_differentiates_itself(a_shape, b_shape, transpose_a, transpose_b):
    """The operator's own bprop (no cell around it) gives NumPy's gradients for both operands,
    with shared 2-D operands summed over the batch and (N, C, H, W) operands in their shape."""
    import mindspore as ms

    rng = np.random.default_rng(SEED)
    a, b = _operands(rng, a_shape, b_shape)
    op = kernel_op(transpose_a, transpose_b)
    dout = rng.standard_normal(op(Tensor(a), Tensor(b)).shape).astype(np.float32)
    weights = Tensor(dout)
    da, db = ms.grad(lambda x, y: (op(x, y) * weights).sum(), grad_position=(0, 1))(
        Tensor(a), Tensor(b))
    for got, expected in zip((da, db), _reference_gradients(a, b, transpose_a, transpose_b,
                                                            dout)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.asnumpy(), expected, rtol=RTOL,
                                   atol=RTOL * np.abs(expected).max())


def test_traced_forward_differentiates_through_the_kernel_on_new_inputs():
    """A forward traced with ``ms.jit(capture_mode="trace")`` and differentiated by PyNative's
    ``ms.grad`` uses the operator's own bprop: right gradients on inputs it was not traced
    with (MindSpore 2.10 fails there with cells that hold a custom bprop: README)."""
    import mindspore as ms
    from mindspore import Parameter, ops

    rng = np.random.default_rng(SEED)
    weight = Parameter(Tensor(rng.standard_normal((4, 3)).astype(np.float32)), name="w")
    op = kernel_op(False, False)

    def loss(x, product):
        hidden = ops.relu(product(x, weight))
        return (hidden * hidden).sum()

    traced = ms.jit(lambda x: loss(x, op), capture_mode="trace")
    reference = ms.grad(lambda x: loss(x, ops.matmul), None, [weight])
    compiled = ms.grad(lambda x: traced(x), None, [weight])
    with traceable_call_stack():
        for _ in range(3):
            x = Tensor(rng.standard_normal((5, 4)).astype(np.float32))
            np.testing.assert_allclose(compiled(x)[0].asnumpy(), reference(x)[0].asnumpy(),
                                       rtol=1e-5, atol=1e-5)
