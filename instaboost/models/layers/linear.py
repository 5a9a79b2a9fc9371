"""Fully connected layer on the C++ matmul kernel, a drop-in for ``nn.Dense``.

The box head's first layer is the largest single product of a Mask R-CNN step: 1024 sampled
RoIs x 12,544 RoI features x 1024 outputs, 26 GFLOP forward and 79 with the backward at 512²,
batch 2. `KernelDense` multiplies on the kernel in ``hardware.matmul_precision``. Measured on the
2-core Xeon (AVX-512, AMX), float32: that layer forward + backward 0.31 s against 0.37 s with
MindSpore's CPU MatMul (the forward 288 vs 245 GFLOP/s, the two gradient products 205-212 vs
190-198), and the whole 512² train step 0.21 and 0.14 s faster (two paired in-process runs of 8
pairs, faster in all 8 each: MindSpore's MatMul also runs on its own thread pool beside the
kernels' OpenMP threads). In
bfloat16 0.25-0.27 s on the Zen 4. An older kernel (before its 14-row tile) was slower than
MindSpore's MatMul in float32 on the Zen 4 (0.49-0.52 vs 0.44-0.46 s); the Zen 4 has not been
measured with this one.
"""
from __future__ import annotations

from mindspore import Tensor, nn

from instaboost.models.layers.gemm import matmul

LINEAR_IMPLS = ("mindspore", "kernel")


class KernelDense(nn.Dense):
    """``nn.Dense`` (same ``weight`` (out, in) / ``bias`` (out,) parameters, names and
    initialisation, so checkpoints move freely) whose product runs on the C++ kernel in the
    precision of ``set_matmul_precision`` (see the module docstring). Input (N, in) float32 ->
    (N, out); no activation."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        if kwargs.get("activation") is not None:
            raise ValueError("KernelDense has no activation: apply it after the layer")
        super().__init__(in_channels, out_channels, **kwargs)

    def construct(self, x: Tensor) -> Tensor:
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
