"""The train step's check that every gradient is finite, in one CPU kernel call.

``mindspore.amp.all_finite`` runs an isfinite and a reduction per gradient tensor and sums the
flags: close to 900 kernel launches for a Mask R-CNN's 280-odd gradients, measured 0.22-0.30 s
of a 512² CPU train step. ``kernels/cpu/all_finite.cc`` reads all of them in one AOT operator
call: 0.06 s in the same step (13 vs 96-150 ms on 80 M warm values alone). Same answer: True
exactly when no value is NaN or infinite.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import mindspore as ms
from mindspore import Tensor, amp, ops

from instaboost.models.layers.native_kernels import aot_op

FiniteCheck = Callable[[Sequence[Tensor]], Tensor]


@functools.lru_cache(maxsize=None)
def _all_finite_op() -> ops.Custom:
    return aot_op("all_finite", "AllFinite", out_shape=lambda *shapes: (),
                  out_dtype=lambda *dtypes: ms.bool_)


def kernel_all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Scalar bool Tensor: whether every value of the float32 ``tensors`` is finite (CPU only)."""
    return _all_finite_op()(*tensors)


def build_finite_check(use_cpu_kernels: bool) -> FiniteCheck:
    """The C++ check where the run uses the project's CPU kernels, MindSpore's otherwise."""
    return kernel_all_finite if use_cpu_kernels else amp.all_finite
