"""Fully connected layer that follows ``hardware.matmul_precision``, a drop-in for ``nn.Dense``.

The box head's first layer is the largest single product of a Mask R-CNN step: 1024 sampled
RoIs x 12,544 RoI features x 1024 outputs, 26 GFLOP forward and 79 with the backward at 512²,
batch 2. Measured on the project machine, forward + backward: MindSpore's CPU MatMul 0.44-0.46 s
(175 GFLOP/s), the C++ kernel in float32 0.49-0.52 s, in bfloat16 0.25-0.27 s (300-320 GFLOP/s).
So `KernelDense` is plain ``nn.Dense`` in float32 and multiplies on the kernel in bfloat16.
"""
from __future__ import annotations

from mindspore import Tensor, nn

from instaboost.models.layers.gemm import matmul, matmul_precision

LINEAR_IMPLS = ("mindspore", "kernel")


class KernelDense(nn.Dense):
    """``nn.Dense`` (same ``weight`` (out, in) / ``bias`` (out,) parameters, names and
    initialisation, so checkpoints move freely) whose product runs on the C++ kernel under
    bfloat16 precision (see the module docstring). Input (N, in) float32 -> (N, out); no
    activation."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        if kwargs.get("activation") is not None:
            raise ValueError("KernelDense has no activation: apply it after the layer")
        super().__init__(in_channels, out_channels, **kwargs)

    def construct(self, x: Tensor) -> Tensor:
        if matmul_precision() != "bfloat16":
            return super().construct(x)
        # y = x · Wᵀ; the kernel operator's backward: dx = dy · W, dW = dyᵀ · x
        y = matmul(x, self.weight, transpose_b=True, impl="kernel")
        return y + self.bias if self.has_bias else y


def build_dense(in_channels: int, out_channels: int, *, impl: str = "mindspore",
                **kwargs) -> nn.Dense:
    """``nn.Dense`` (impl "mindspore") or `KernelDense` (impl "kernel"), same parameters."""
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"dense impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    cls = KernelDense if impl == "kernel" else nn.Dense
    return cls(in_channels, out_channels, **kwargs)
