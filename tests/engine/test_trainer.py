"""The training loop's schedule, driven with a stand-in step and evaluation: evaluation epochs and
the one after the last step, the step cap, the final checkpoint, the steps metrics are logged at."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from mindspore import nn

from instaboost.engine.checkpoint import CheckpointManager
from instaboost.engine.trainer import LoopSettings, Trainer


class _RecordingTracker:
    def __init__(self):
        self.steps = defaultdict(list)     # metric -> steps it was logged at
        self.values = defaultdict(list)

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.steps[key].append(step)
            self.values[key].append(value)


def _fit(tmp_path: Path, *, epochs: int, steps_per_epoch: int, total_steps: int, eval_every: int,
         ap_values, skip_steps=()):
    network = nn.Dense(2, 2)
    optimizer = nn.Momentum(network.trainable_params(), learning_rate=0.1, momentum=0.9)
    tracker = _RecordingTracker()
    checkpoints = CheckpointManager(tmp_path, keep_latest=1, keep_best=1)
    aps = iter(ap_values)
    calls = []

    def train_step(epoch, index):
        calls.append((epoch, index))
        return 1.0, (0.25, 0.75), len(calls) not in skip_steps

    trainer = Trainer(
        network=network, optimizer=optimizer, train_step=train_step, loss_names=["a", "b"],
        epoch_batches=lambda epoch: ((epoch, i) for i in range(steps_per_epoch)),
        evaluate=lambda: {"segm/AP": next(aps), "bbox/AP": 0.5}, checkpoints=checkpoints,
        tracker=tracker,
        settings=LoopSettings(epochs=epochs, steps_per_epoch=steps_per_epoch,
                              total_steps=total_steps, batch_size=2, log_every_steps=1,
                              ckpt_every_steps=0, eval_every_epochs=eval_every),
        learning_rates=np.arange(1, total_steps + 1, dtype=np.float32) / 100)
    metrics = trainer.fit()
    return trainer, tracker, checkpoints, calls, metrics


def test_evaluates_every_n_epochs_and_after_the_last_step(tmp_path):
    trainer, tracker, checkpoints, calls, metrics = _fit(
        tmp_path, epochs=3, steps_per_epoch=4, total_steps=12, eval_every=2, ap_values=[0.1, 0.2])
    assert len(calls) == 12 and trainer.step == 12
    # epoch 2 by eval_every, and epoch 3 because it ends training
    assert tracker.steps["segm/AP"] == [8, 12] and metrics["segm/AP"] == 0.2
    assert [p.name for p in checkpoints.kept()] == ["best_segm_AP_0.2000_step_00000012.ckpt"]
    assert (tmp_path / "step_00000012.ckpt").is_file()   # the final weights, linked by the best
    for key, steps in tracker.steps.items():
        assert steps == sorted(set(steps)), key          # each metric once per step, increasing
    assert tracker.steps["train/lr"] == list(range(1, 13))
    np.testing.assert_allclose(tracker.values["train/lr"], np.arange(1, 13) / 100)
    assert tracker.values["train/a"][0] == 0.25 and tracker.values["train/b"][0] == 0.75


def test_step_cap_stops_mid_epoch_evaluates_and_saves(tmp_path):
    # schedule.max_steps = 6 of 3 epochs x 4: epoch 2 stops after its second step
    trainer, tracker, checkpoints, calls, _ = _fit(
        tmp_path, epochs=3, steps_per_epoch=4, total_steps=6, eval_every=5, ap_values=[0.3])
    assert calls == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert tracker.steps["segm/AP"] == [6]
    assert (tmp_path / "step_00000006.ckpt").is_file()


def test_skipped_steps_are_counted(tmp_path):
    _, tracker, _, calls, _ = _fit(tmp_path, epochs=1, steps_per_epoch=4, total_steps=4,
                                   eval_every=1, ap_values=[0.0], skip_steps=(2, 3))
    assert len(calls) == 4
    assert tracker.values["train/skipped_steps"] == [2.0] and tracker.steps["train/skipped_steps"] == [4]
