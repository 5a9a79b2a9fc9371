"""Matrix products of the convolution paths: MindSpore's MatMul/BatchMatMul or the C++ kernel.

``matmul(a, b, transpose_a, transpose_b, impl)`` multiplies float32 matrices, 2-D ``(M, K)`` or
batched 3-D ``(B, M, K)`` (a 2-D operand is shared by every batch item of the other one). An
operand of more dimensions ``(d0, d1, d2, ...)`` is the 3-D ``(d0, d1, d2*...)``, and a product
whose columns come from such a ``b`` keeps its trailing axes: ``matmul(w (O, C), x (N, C, H, W))``
is ``(N, O, H, W)``. Pass NCHW tensors so rather than reshaped: MindSpore copies a reshaped view
in full before it reaches a custom operator (measured: 2.7 ms for a 33 MB activation).

* ``impl="mindspore"``: ``ops.MatMul`` / ``ops.BatchMatMul``; needs no compiler.
* ``impl="kernel"``: the AOT operator of ``kernels/cpu/gemm.cc`` (packed blocks, an AVX-512
  micro-kernel where the CPU has it, OpenMP). Measured on the 2-core project machine against MindSpore 2.10's CPU MatMul, per call:
  (256, 64) x (64, 16384), a 1x1 convolution of the first ResNet stage, 115 vs 60-75 GFLOP/s;
  (1024, 12544) x (12544, 1024), the box head's first layer, 160 vs 143; large square products
  about 190 vs 150-175.

**Precision** (``set_matmul_precision``, set once per job from ``hardware.matmul_precision``,
like PyTorch's ``torch.set_float32_matmul_precision``): "float32" multiplies float32 values;
"bfloat16" rounds both operands to bfloat16 while packing them and sums in float32, as
bfloat16 mixed-precision training does (measured on convolutions: 2.4e-3 RMS relative error
instead of 3e-7). On a CPU with AVX512_BF16 the kernel then runs VDPBF16PS, 32 multiply-adds
per instruction instead of 16: on the project machine (Zen 4, 2 cores, synchronous launch)
170-350 vs 115-190 GFLOP/s on the detector's products. Elsewhere the same rounded operands
are multiplied with float32 FMAs, no speed-up: the same numerics but for the order of each
pair's two products and subnormals, which VDPBF16PS flushes to zero and the FMAs keep. The setting applies to the
kernel's products only (``impl="kernel"``); Winograd's batched products stay float32
(winograd.py: its transforms amplify bfloat16 rounding tenfold, 2.5e-2 RMS measured).

**Gradients.** The kernel's operator differentiates itself (two more kernel products, in the
same precision), so the layers that are one product (the shared-weight 1x1 convolution, the
kernel deconvolution, ``KernelDense``) need no bprop of their own; the unfold and Winograd
convolutions keep bprop cells that recompute their patches / tiles instead of keeping them.
With ``impl="mindspore"`` MindSpore differentiates its MatMul/BatchMatMul as usual.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, ops

from instaboost.models.layers.native_kernels import aot_op, kernel_library

MATMUL_IMPLS = ("mindspore", "kernel")
MATMUL_PRECISIONS = ("float32", "bfloat16")
_LIBRARY = "gemm"
# Kernel entry points by (transpose_a, transpose_b); no product here needs both transposed.
# The bfloat16 products are the same names with a "Bf16" suffix.
_ENTRY_POINTS = {(False, False): "MatMulNN", (False, True): "MatMulNT", (True, False): "MatMulTN"}
_precision = "float32"


def _check_precision(precision: str) -> None:
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision must be one of {MATMUL_PRECISIONS}, "
                         f"got {precision!r}")


def set_matmul_precision(precision: str) -> None:
    """Precision of the kernel's products from now on (see the module docstring)."""
    global _precision
    _check_precision(precision)
    _precision = precision


def matmul_precision() -> str:
    """The precision set by ``set_matmul_precision`` ("float32" unless set)."""
    return _precision


@contextlib.contextmanager
def use_matmul_precision(precision: str) -> Iterator[None]:
    """``set_matmul_precision`` for a ``with`` block, restoring the previous one after it."""
    previous = _precision
    set_matmul_precision(precision)
    try:
        yield
    finally:
        set_matmul_precision(previous)


def _check_impl(impl: str) -> None:
    if impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul impl must be one of {MATMUL_IMPLS}, got {impl!r}")


def _as_matrix_stack(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """A 2-D shape as is; (d0, d1, d2, ...) as the 3-D (d0, d1, d2*...) (see the module docstring)."""
    if len(shape) <= 3:
        return shape
    return shape[:2] + (math.prod(shape[2:]),)


def product_shape(a_shape: Sequence[int], b_shape: Sequence[int], transpose_a: bool,
                  transpose_b: bool) -> Tuple[int, ...]:
    """Shape of op(a) · op(b) for 2-D or (>= 3)-D operands (see the module docstring).

    Raises:
        ValueError: ranks below 2, different batch sizes, or mismatched inner sizes.
    """
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError(f"matmul operands must be at least 2-D, got {a_shape} and {b_shape}")
    a3, b3 = _as_matrix_stack(a_shape), _as_matrix_stack(b_shape)
    m, k = (a3[-1], a3[-2]) if transpose_a else (a3[-2], a3[-1])
    k_b, n = (b3[-1], b3[-2]) if transpose_b else (b3[-2], b3[-1])
    if k != k_b:
        raise ValueError(f"matmul inner sizes differ: {a_shape} (transposed: {transpose_a}) "
                         f"and {b_shape} (transposed: {transpose_b})")
    batches = {shape[0] for shape in (a3, b3) if len(shape) == 3}
    if len(batches) > 1:
        raise ValueError(f"matmul batch sizes differ: {a_shape} and {b_shape}")
    if len(b_shape) > 3 and not transpose_b:
        return tuple(batches) + (m,) + b_shape[2:]    # the columns keep b's trailing axes
    return tuple(batches) + (m, n)


def _gradient_like(gradient: Tensor, operand: Tensor) -> Tensor:
    """A product's gradient for ``operand``: summed over the batch axis when the operand was a
    2-D matrix shared by a batched other operand, in the operand's shape."""
    if operand.ndim == 2 and gradient.ndim == 3:
        gradient = gradient.sum(0)
    if tuple(gradient.shape) != tuple(operand.shape):
        gradient = gradient.reshape(operand.shape)
    return gradient


def _product_bprop(transpose_a: bool, transpose_b: bool, extra_flags: Tuple[str, ...],
                   precision: str):
    """The backward of ``C = op(a) · op(b)``: two more products on the kernel, in the same
    precision (``C = a·b``: da = dC·bᵀ, db = aᵀ·dC; ``C = a·bᵀ``: da = dC·b, db = dCᵀ·a;
    ``C = aᵀ·b``: da = b·dCᵀ, db = a·dC), which the kernel's entry points cover."""
    def product(a: Tensor, b: Tensor, ta: bool, tb: bool) -> Tensor:
        return kernel_op(ta, tb, extra_flags, precision)(a, b)

    def bprop(a: Tensor, b: Tensor, out: Tensor, dout: Tensor):
        if transpose_b:
            da, db = product(dout, b, False, False), product(dout, a, True, False)
        elif transpose_a:
            da, db = product(b, dout, False, True), product(a, dout, False, False)
        else:
            da, db = product(dout, b, False, True), product(a, dout, True, False)
        return _gradient_like(da, a), _gradient_like(db, b)

    return bprop


@functools.lru_cache(maxsize=None)
def kernel_op(transpose_a: bool, transpose_b: bool, extra_flags: Tuple[str, ...] = (),
              precision: str = "float32") -> ops.Custom:
    """The AOT operator for one transposition and precision; its output shape follows from its
    inputs'. ``extra_flags``: compiler flags of a library variant (tests build portable ones).

    The operator is differentiable by itself (`_product_bprop`), so that layers built on it
    need no bprop of their own, and a forward traced by ``ms.jit(capture_mode="trace")``
    inside ``ms.value_and_grad`` differentiates through it (README, Known limits).
    """
    function = _ENTRY_POINTS.get((transpose_a, transpose_b))
    if function is None:
        raise ValueError("the matmul kernel has no entry point with both operands transposed")
    _check_precision(precision)
    if precision == "bfloat16":
        function += "Bf16"
    return aot_op(_LIBRARY, function,
                  out_shape=lambda a, b: product_shape(a, b, transpose_a, transpose_b),
                  out_dtype=lambda a, b: ms.float32, extra_flags=extra_flags,
                  bprop=_product_bprop(transpose_a, transpose_b, extra_flags, precision))


def load_kernel() -> None:
    """Build (or find) the C++ library now, so that a missing compiler fails at model build."""
    kernel_library(_LIBRARY)


def matmul(a: Tensor, b: Tensor, transpose_a: bool = False, transpose_b: bool = False,
           impl: str = "mindspore") -> Tensor:
    """op(a) · op(b) for float32 2-D or 3-D tensors; 3-D result when either operand is 3-D.
    With ``impl="kernel"`` in the precision of ``set_matmul_precision``."""
    _check_impl(impl)
    if impl == "kernel":
        return kernel_op(transpose_a, transpose_b, (), _precision)(a, b)
    if a.ndim > 3 or b.ndim > 3:
        out = matmul(a.reshape(_as_matrix_stack(a.shape)), b.reshape(_as_matrix_stack(b.shape)),
                     transpose_a, transpose_b, impl)
        return out.reshape(product_shape(a.shape, b.shape, transpose_a, transpose_b))
    if a.ndim == 2 and b.ndim == 2:
        return ops.MatMul(transpose_a, transpose_b)(a, b)
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] == 1 and b.shape[0] == 1:
        # One batch item: the 2-D MatMul is faster than BatchMatMul on MindSpore's CPU backend.
        out = ops.MatMul(transpose_a, transpose_b)(a[0], b[0])
        return out.reshape((1,) + out.shape)
    if a.ndim == 2:
        a = ops.broadcast_to(a, (b.shape[0],) + a.shape)
    if b.ndim == 2:
        b = ops.broadcast_to(b, (a.shape[0],) + b.shape)
    return ops.BatchMatMul(transpose_a, transpose_b)(a, b)
