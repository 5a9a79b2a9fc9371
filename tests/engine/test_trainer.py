"""The training loop's schedule, driven with a stand-in step and evaluation: evaluation epochs and
the one after the last step, the step cap, the final checkpoint, the steps metrics are logged at."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from mindspore import nn

from instaboost.engine.checkpoint import CheckpointManager
from instaboost.engine.trainer import LoopSettings, Trainer
from tests.helpers import RecordingTracker


def _fit(tmp_path: Path, *, epochs: int, steps_per_epoch: int, total_steps: int, eval_every: int,
         ap_values, skip_steps=()):
    network = nn.Dense(2, 2)
    optimizer = nn.Momentum(network.trainable_params(), learning_rate=0.1, momentum=0.9)
    tracker = RecordingTracker()
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


def test_logged_values_are_means_of_their_window_and_checkpoints_periodic(tmp_path, monkeypatch):
    """log_every_steps=2 over 5 steps: train/* at steps 2, 4 and 5 (the last, partial window),
    each the mean of its own steps; img/s and data time from the clock (fake here: 0.5 s to
    load a batch, 2 s to train on it); checkpoints every 2 steps, the latest 2 kept, plus the
    final step's."""
    from instaboost.engine import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    network = nn.Dense(2, 2)
    optimizer = nn.Momentum(network.trainable_params(), learning_rate=0.1, momentum=0.9)
    tracker = RecordingTracker()
    checkpoints = CheckpointManager(tmp_path, keep_latest=2, keep_best=1)
    losses = [1.0, 2.0, 3.0, 4.0, 5.0]
    calls = []

    def batches(epoch):
        for index in range(5):
            clock[0] += 0.5
            yield epoch, index

    def train_step(epoch, index):
        clock[0] += 2.0
        loss = losses[len(calls)]
        calls.append(index)
        return loss, (loss / 4, 3 * loss / 4), True

    Trainer(network=network, optimizer=optimizer, train_step=train_step, loss_names=["a", "b"],
            epoch_batches=batches, evaluate=lambda: {"segm/AP": 0.4, "bbox/AP": 0.3},
            checkpoints=checkpoints, tracker=tracker,
            settings=LoopSettings(epochs=1, steps_per_epoch=5, total_steps=5, batch_size=2,
                                  log_every_steps=2, ckpt_every_steps=2, eval_every_epochs=1),
            learning_rates=np.full(5, 0.01, np.float32)).fit()
    assert tracker.steps["train/loss"] == [2, 4, 5]
    np.testing.assert_allclose(tracker.values["train/loss"], [1.5, 3.5, 5.0])
    np.testing.assert_allclose(tracker.values["train/a"], [1.5 / 4, 3.5 / 4, 5.0 / 4])
    np.testing.assert_allclose(tracker.values["train/data_time"], [0.5] * 3)
    np.testing.assert_allclose(tracker.values["train/img_per_s"], [2 / 2.5] * 3)
    assert sorted(p.name for p in tmp_path.glob("step_*.ckpt")) == ["step_00000004.ckpt",
                                                                     "step_00000005.ckpt"]
    # what is uploaded: the best, and the latest that are not the best's step
    assert [p.name for p in checkpoints.kept()] == ["best_segm_AP_0.4000_step_00000005.ckpt",
                                                    "step_00000004.ckpt"]
