"""Batch-norm factory: trainable BN, BN with fixed statistics, and frozen BN, each optionally
followed by a ReLU (``activation="relu"``) or by a residual add and a ReLU (``"add_relu"``).

All variants are `BatchNormAct2d` cells, a subclass of ``nn.BatchNorm2d``, so they hold the same
four parameters under the same names (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``,
each float32 (C,)) and a checkpoint written with one variant loads into any other. They differ
only in behaviour:

* ``"bn"``: batch statistics in training mode, running statistics in eval mode; the running
  statistics are updated in training (momentum 0.1 in PyTorch's convention, unbiased variance).
* ``"bn"`` with ``norm_eval=True``: running statistics always (mmdetection's ``norm_eval``),
  gamma/beta still trainable.
* ``"frozen_bn"``: a constant per-channel affine map: running statistics always, gamma/beta not
  trainable (``requires_grad=False``). Gradients still flow to the input.

``impl="kernel"`` (chosen with ``hardware.conv_impl=winograd``) runs the training-mode batch
statistics case -- normalisation, activation and their backward -- on the C++ kernels of
``kernels/cpu/batch_norm.cc``, one call forward and one backward, each channel processed while
it is in cache. MindSpore's BatchNorm, ReLU, add and their gradients make a pass over memory
each: the backbone's norms took about 0.8 s of a 4.6 s step at 512², batch 2 (measured). The
other cases (running statistics, eval mode) stay on MindSpore's kernels.

Input and output: float32 (N, C, H, W); ``"add_relu"`` takes the residual (N, C, H, W) too.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from instaboost.models.layers.native_kernels import aot_op

NORM_KINDS = ("bn", "frozen_bn")
NORM_IMPLS = ("mindspore", "kernel")
ACTIVATIONS = ("none", "relu", "add_relu")
BN_EPS = 1e-5
# MindSpore's momentum is the weight of the old running value (PyTorch momentum 0.1 -> 0.9).
BN_MOMENTUM = 0.9
_LIBRARY = "batch_norm"
# Kernel entry points by activation: (forward, backward).
_ENTRY_POINTS = {"none": ("BatchNormTrain", "BatchNormTrainGrad"),
                 "relu": ("BatchNormReluTrain", "BatchNormReluTrainGrad"),
                 "add_relu": ("BatchNormAddReluTrain", "BatchNormAddReluTrainGrad")}


@functools.lru_cache(maxsize=None)
def _backward_op(activation: str) -> ops.Custom:
    """The backward AOT operator of one activation (see batch_norm.cc)."""
    add = activation == "add_relu"

    def backward_shapes(x, *_):
        per_channel = (x[1],)
        return ((tuple(x), tuple(x)) if add else (tuple(x),)) + (per_channel, per_channel)

    backward_count = 4 if add else 3
    return aot_op(_LIBRARY, _ENTRY_POINTS[activation][1], backward_shapes,
                  lambda *_: (ms.float32,) * backward_count)


def _forward_op(activation: str, no_gradients: "_NoGradients") -> ops.Custom:
    """The forward AOT operator of one activation, differentiable by itself: the backward
    kernel gives the input's (and with "add_relu" the residual's), gamma's and beta's
    gradients; the running statistics and settings get ``no_gradients`` (they are not
    trained). One per layer, for its constants."""
    backward = _backward_op(activation)

    def forward_shapes(x, *_):
        per_channel = (x[1],)
        return (tuple(x),) + (per_channel,) * 4          # y, mean, var, new running mean / var

    no_stats = (no_gradients.running_mean, no_gradients.running_var, no_gradients.settings)
    if activation == "add_relu":
        def bprop(x, residual, gamma, beta, running_mean, running_var, settings, out, dout):
            dx, dresidual, dgamma, dbeta = backward(x, dout[0], out[0], out[1], out[2], gamma,
                                                    settings)
            return (dx, dresidual, dgamma, dbeta) + no_stats
    elif activation == "relu":
        def bprop(x, gamma, beta, running_mean, running_var, settings, out, dout):
            return backward(x, dout[0], out[0], out[1], out[2], gamma, settings) + no_stats
    else:
        def bprop(x, gamma, beta, running_mean, running_var, settings, out, dout):
            return backward(x, dout[0], out[1], out[2], gamma, settings) + no_stats

    return aot_op(_LIBRARY, _ENTRY_POINTS[activation][0], forward_shapes,
                  lambda *_: (ms.float32,) * 5, bprop=bprop)


class _NoGradients(NamedTuple):
    """The zero "gradients" of a norm's running statistics and settings, made once per layer:
    they are not trained, and a zeros_like each per layer and backward pass was 159 operator
    calls per ResNet-50 step (about 40 ms of PyNative dispatch at 512² measured)."""

    running_mean: Tensor
    running_var: Tensor
    settings: Tensor

    @classmethod
    def of(cls, num_features: int, settings: Tensor) -> "_NoGradients":
        return cls(Tensor(np.zeros(num_features, np.float32)),
                   Tensor(np.zeros(num_features, np.float32)),
                   Tensor(np.zeros(settings.shape, np.float32)))


def _check_values_per_channel(shape: Tuple[int, ...]) -> None:
    """Batch statistics need two values per channel: from one, the output is beta whatever the
    input, the unbiased variance is 0/0 (MindSpore's running variance becomes NaN, the
    kernel's decays toward 0), and no gradient reaches the input. PyTorch refuses it too."""
    n, _, h, w = shape
    if n * h * w == 1:
        raise ValueError(f"batch norm with batch statistics needs more than one value per "
                         f"channel, got an input of shape {tuple(shape)} (one image whose "
                         f"feature map is 1x1: use larger images or a larger batch)")


class BatchNormAct2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` followed by ``activation``: "none", "relu", or "add_relu"
    (``relu(bn(x) + residual)``, called as ``cell(x, residual)``).

    ``impl="kernel"``: training with batch statistics runs on the fused C++ kernels (the running
    statistics are updated as ``nn.BatchNorm2d`` updates them); everything else, and every case
    with ``impl="mindspore"``, runs ``nn.BatchNorm2d`` and MindSpore's ReLU and add.
    """

    def __init__(self, num_features: int, *, activation: str = "none",
                 impl: str = "mindspore", **batch_norm_kwargs):
        super().__init__(num_features, **batch_norm_kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if impl not in NORM_IMPLS:
            raise ValueError(f"norm impl must be one of {NORM_IMPLS}, got {impl!r}")
        self.activation = activation
        self.impl = impl
        self.function = None
        if impl == "kernel":
            # The kernels' settings: (eps, momentum) with MindSpore's momentum convention
            # (self.momentum, the weight of the batch statistics).
            self.settings = Tensor([self.eps, self.momentum], ms.float32)
            no_gradients = self.no_gradients = _NoGradients.of(num_features, self.settings)
            # (x[, residual], gamma, beta, running mean, running var, settings) -> (y, batch
            # mean, batch var, new running mean, new running var); differentiable by itself.
            self.function = _forward_op(activation, no_gradients)

    def _uses_batch_statistics(self) -> bool:
        if self.use_batch_statistics is None:
            return self.training
        return bool(self.use_batch_statistics)

    def construct(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self._uses_batch_statistics():
            _check_values_per_channel(x.shape)
            if self.function is not None:
                return self._kernel_forward(x, residual)
        y = super().construct(x)
        if self.activation == "add_relu":
            y = y + residual
        return ops.relu(y) if self.activation != "none" else y

    def _kernel_forward(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        statistics = (self.gamma, self.beta, self.moving_mean, self.moving_variance,
                      self.settings)
        if self.activation == "add_relu":
            outputs = self.function(x, residual, *statistics)
        else:
            outputs = self.function(x, *statistics)
        # The running statistics as MindSpore's BatchNorm updates them (computed by the kernel).
        ops.assign(self.moving_mean, ops.stop_gradient(outputs[3]))
        ops.assign(self.moving_variance, ops.stop_gradient(outputs[4]))
        return outputs[0]

    def extend_repr(self) -> str:
        return f"{super().extend_repr()}, activation={self.activation}, impl={self.impl}"


def build_norm(kind: str, num_features: int, *, norm_eval: bool = False,
               frozen: bool = False, activation: str = "none",
               impl: str = "mindspore") -> BatchNormAct2d:
    """Build a 2-D batch norm over ``num_features`` channels, with its activation.

    Args:
        kind: "bn" (trainable) or "frozen_bn" (constant affine).
        num_features: channel count C.
        norm_eval: with kind "bn", always normalise with the running statistics.
        frozen: force the frozen behaviour (used for frozen backbone stages).
        activation: "none", "relu", or "add_relu" (``cell(x, residual)`` is
            ``relu(bn(x) + residual)``).
        impl: "mindspore", or "kernel" for the fused C++ kernels in training with batch
            statistics (they are built now; needs a C++ compiler).

    Returns:
        `BatchNormAct2d` cell (N, C, H, W) -> (N, C, H, W).
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
    if kind == "frozen_bn" or frozen:
        return BatchNormAct2d(num_features, activation=activation, impl="mindspore",
                              eps=BN_EPS, momentum=BN_MOMENTUM, affine=False,
                              use_batch_statistics=False)
    return BatchNormAct2d(num_features, activation=activation,
                          impl="mindspore" if norm_eval else impl, eps=BN_EPS,
                          momentum=BN_MOMENTUM,
                          use_batch_statistics=False if norm_eval else None)


def is_frozen_norm(cell: nn.Cell) -> bool:
    """True for a batch norm whose affine parameters are not trainable."""
    return isinstance(cell, nn.BatchNorm2d) and not cell.gamma.requires_grad
