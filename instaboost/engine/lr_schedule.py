"""Learning-rate schedule: linear warm-up, then multistep decay at epoch boundaries (seed: lr_type multistep)."""
from typing import Sequence

import numpy as np

DECAY_FACTOR = 0.1  # the seed divides the learning rate by 10 at each of `lr_steps`


def scaled_learning_rate(base_lr: float, base_batch_size: int, batch_size: int, device_num: int = 1) -> float:
    """Linear scaling rule: base_lr is tuned for base_batch_size images per step (seed: 0.02 for 16)."""
    return base_lr * batch_size * device_num / base_batch_size


def multistep_with_warmup(*, lr: float, total_steps: int, steps_per_epoch: int, lr_steps: Sequence[int],
                          warmup_steps: int, warmup_ratio: float) -> np.ndarray:
    """Per-step learning rates, float32 (total_steps,).

    Warm-up is linear from lr * warmup_ratio to lr over `warmup_steps` (mmdet's "linear" warm-up), and
    the rate is multiplied by DECAY_FACTOR at the first step of every epoch listed in `lr_steps`.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    steps = np.arange(total_steps, dtype=np.float64)
    epochs = steps // max(steps_per_epoch, 1)
    decays = np.zeros(total_steps)
    for epoch in lr_steps:
        decays += epochs >= epoch
    rates = lr * DECAY_FACTOR ** decays
    if warmup_steps > 0:
        progress = np.minimum(steps / warmup_steps, 1.0)
        rates *= warmup_ratio + (1.0 - warmup_ratio) * progress
    return rates.astype(np.float32)
