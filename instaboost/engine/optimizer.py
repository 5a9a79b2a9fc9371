"""The optimizer: SGD with momentum, its weight decay on every trained parameter.

mmdetection's ``SGD(lr, momentum=0.9, weight_decay=1e-4)`` (the seed's and the InstaBoost paper's
schedules) decays every parameter, the batch norms' gamma and beta included. MindSpore's
optimizers given one ``weight_decay`` for a plain parameter list skip every parameter whose name
contains "gamma" or "beta" instead (in the R50-FPN Mask R-CNN, 106 of its trained tensors); a
parameter group that carries the value decays all of its parameters.
"""
from typing import Iterable, Union

import numpy as np
from mindspore import Parameter, Tensor, nn


def build_sgd(params: Iterable[Parameter], *, learning_rate: Union[float, np.ndarray, Tensor],
              momentum: float, weight_decay: float) -> nn.Momentum:
    """``nn.Momentum`` over ``params`` with ``weight_decay`` applied to each of them.

    ``learning_rate``: one rate, or one per step (float32 (steps,)).
    """
    return nn.Momentum([{"params": list(params), "weight_decay": weight_decay}],
                       learning_rate=learning_rate, momentum=momentum)
