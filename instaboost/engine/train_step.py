"""One training-step factory for every detector (mindyolo's pattern, without per-task branches).

The detector-specific part is the injected `forward_fn(*batch) -> dict[str, Tensor]` of scalar loss
terms; the step sums them, differentiates, unscales, checks finiteness, optionally clips and updates.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, amp, ops

LOSS_SCALERS = ("static", "dynamic", "none")
DYNAMIC_SCALE_FACTOR = 2  # MindSpore requires an int
DYNAMIC_SCALE_WINDOW = 1000


class UnitLossScaler(amp.LossScaler):
    """A loss scale of 1: no scaling at all. ``amp.StaticLossScaler(1.0)`` would still multiply
    every gradient by 1.0 in `unscale`, one op per parameter (201 for Mask R-CNN R50-FPN), about
    30 ms of a 512² CPU step measured."""

    def scale(self, inputs):
        return inputs

    def unscale(self, inputs):
        return inputs

    def adjust(self, grads_finite):
        return False  # as a static scaler: the scale never changes


_MAP = ops.HyperMap()


def _times(factor: Tensor, tensor: Tensor) -> Tensor:
    return tensor * factor.astype(tensor.dtype)


@ms.jit(backend="ms_backend")
def _multiply(factor: Tensor, inputs):
    return _MAP(ops.partial(_times, factor), inputs)


class _ScaleByValue:
    """Scale and unscale by the current value of `self.scale_value`, passed as a plain Tensor.

    MindSpore 2.10's amp scalers pass their `scale_value` Parameter itself to a jit-compiled map,
    and the compiled graph is cached by the Parameter's identity: a scaler made after an earlier
    one was garbage-collected can get its address and then unscales by the earlier scaler's
    value (measured: 255 of 300 scalers made one after another in a loop). The jobs of a Hydra
    sweep run in one process, one scaler each. `inputs` (a Tensor or a tuple of them) is
    `mutable` so the graph takes them as inputs rather than compiling them in as constants.
    """

    def scale(self, inputs):
        return _multiply(self.scale_value.value(), ms.mutable(inputs))

    def unscale(self, inputs):
        return _multiply(ops.reciprocal(self.scale_value.value()), ms.mutable(inputs))


class StaticLossScaler(_ScaleByValue, amp.StaticLossScaler):
    """`amp.StaticLossScaler` whose value is never taken from another scaler (`_ScaleByValue`)."""


class DynamicLossScaler(_ScaleByValue, amp.DynamicLossScaler):
    """`amp.DynamicLossScaler` whose value is never taken from another scaler (`_ScaleByValue`)."""


def build_loss_scaler(kind: str, scale: float) -> amp.LossScaler:
    """Loss scaler for `schedule.loss_scale_type`; 'none', and a static scale of 1 (the default),
    are `UnitLossScaler`."""
    if kind == "static":
        return UnitLossScaler() if scale == 1.0 else StaticLossScaler(scale)
    if kind == "dynamic":
        return DynamicLossScaler(scale, DYNAMIC_SCALE_FACTOR, DYNAMIC_SCALE_WINDOW)
    if kind == "none":
        return UnitLossScaler()
    raise ValueError(f"schedule.loss_scale_type: unknown loss scaler {kind!r}, expected one of {LOSS_SCALERS}")


def make_train_step(forward_fn: Callable[..., Dict[str, Tensor]], optimizer, *, loss_names: Sequence[str],
                    scaler: amp.LossScaler, clip_norm: Optional[float] = None,
                    finite_check: Callable[[Sequence[Tensor]], Tensor] = amp.all_finite
                    ) -> Callable[..., Tuple[Tensor, Tuple[Tensor, ...], Tensor]]:
    """Return `step(*batch) -> (total_loss, loss_terms, grads_finite)`.

    loss_terms follow `loss_names`. A step whose gradients are not finite (an fp16 overflow under a
    large loss scale, or a diverging run) skips the optimizer update, though not its step count (the
    learning-rate schedule goes on), and lets a dynamic scaler shrink.
    `finite_check(grads)` answers that as a scalar bool Tensor (`instaboost.engine.finite`).
    """
    names = tuple(loss_names)

    def scaled_loss(*batch):
        losses = forward_fn(*batch)
        terms = tuple(losses[name] for name in names)
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return scaler.scale(total), terms

    grad_fn = ms.value_and_grad(scaled_loss, None, optimizer.parameters, has_aux=True)

    def step(*batch):
        (loss, terms), grads = grad_fn(*batch)
        loss = scaler.unscale(loss)
        grads = scaler.unscale(grads)
        finite = finite_check(grads)
        if clip_norm:
            grads = ops.clip_by_global_norm(grads, clip_norm)
        if finite:
            loss = ops.depend(loss, optimizer(grads))
        else:
            # The learning rate is read at the optimizer's global_step, which only its update
            # advances: a skipped step must count too, or every later step runs the rate of one
            # step earlier (and train/lr, logged by step, is not the rate used).
            loss = ops.depend(loss, ops.assign_add(optimizer.global_step,
                                                   optimizer.global_step_increase_tensor))
        scaler.adjust(finite)
        return loss, terms, finite

    return step
