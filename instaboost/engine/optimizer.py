"""The optimizer: SGD with momentum, its weight decay on every trained parameter.

mmdetection's ``SGD(lr, momentum=0.9, weight_decay=1e-4)`` (the seed's and the InstaBoost paper's
schedules) decays every parameter, the batch norms' gamma and beta included. MindSpore's
optimizers given one ``weight_decay`` for a plain parameter list skip every parameter whose name
contains "gamma" or "beta" instead (in the R50-FPN Mask R-CNN, 106 of its trained tensors); a
parameter group that carries the value decays all of its parameters.

Implementations (``impl``, chosen like the layers' by ``hardware.conv_impl``):

* "mindspore": ``nn.Momentum``, a weight-decay multiply and add and an ApplyMomentum per
  parameter: about 600 operators for the detector's 201 tensors (44 M values), 145 ms per step on
  the 2-core project machine (139 ms compiled with ``ms.jit``).
* "kernel": `KernelMomentum`, the same optimizer whose update is one call of
  ``kernels/cpu/sgd_momentum.cc`` over every parameter, in place: 33-36 ms. Same arithmetic, each
  operation rounded on its own as MindSpore's operators round it (tested equal); the same
  Parameters, momentum buffers, learning-rate schedule and step count.
"""
from typing import Iterable, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from instaboost.models.layers.native_kernels import SEPARATE_ROUNDING_FLAGS, aot_op

OPTIMIZER_IMPLS = ("mindspore", "kernel")


def _decayed_group(params: Iterable[Parameter], weight_decay: float) -> list:
    """One parameter group carrying the weight decay: MindSpore then decays all of them."""
    return [{"params": list(params), "weight_decay": weight_decay}]


class KernelMomentum(nn.Momentum):
    """``nn.Momentum`` over one parameter group with one weight decay, updated by the C++ kernel
    (see the module docstring). Call it as ``nn.Momentum``: ``optimizer(gradients)``."""

    def __init__(self, params, *, learning_rate, momentum: float, weight_decay: float):
        super().__init__(_decayed_group(params, weight_decay), learning_rate=learning_rate,
                         momentum=momentum)
        self._weight_decay = Tensor(weight_decay, ms.float32)
        self._update = aot_op("sgd_momentum", "SgdMomentumUpdate",
                              out_shape=lambda *shapes: (), out_dtype=lambda *dtypes: ms.bool_,
                              extra_flags=SEPARATE_ROUNDING_FLAGS)

    def construct(self, gradients):
        lr = self.get_lr()    # the rate of the current step, before the step count moves on
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        return self._update(lr, self.momentum, self._weight_decay, *self.params, *self.moments,
                            *gradients)


def build_sgd(params: Iterable[Parameter], *, learning_rate: Union[float, np.ndarray, Tensor],
              momentum: float, weight_decay: float, impl: str = "mindspore") -> nn.Momentum:
    """``nn.Momentum`` (impl "mindspore") or `KernelMomentum` (impl "kernel") over ``params``
    with ``weight_decay`` applied to each of them.

    ``learning_rate``: one rate, or one per step (float32 (steps,)).
    """
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"optimizer impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    if impl == "kernel":
        return KernelMomentum(params, learning_rate=learning_rate, momentum=momentum,
                              weight_decay=weight_decay)
    return nn.Momentum(_decayed_group(params, weight_decay), learning_rate=learning_rate,
                       momentum=momentum)
