"""The train task's wiring: what it hands the training loop, the optimizer, the train step and the
checkpoints from the config, and what it uploads after the loop (a stand-in Trainer: no step runs,
so the real detector is built and nothing is trained)."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from instaboost.engine.lr_schedule import multistep_with_warmup
from tests.helpers import RecordingTracker

STEPS_PER_EPOCH = 2   # the smoke dataset's 4 training images, batch 2


def test_the_schedule_reaches_the_loop_optimizer_step_and_checkpoints(
        cfg: DictConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the module (instaboost.tasks exports its `train` function under the same name)
    train_module = importlib.import_module("instaboost.tasks.train")

    cfg.schedule.update(epochs=3, max_steps=None, batch_size=2, base_lr=0.02, base_batch_size=16,
                        lr_steps=[1, 2], warmup_steps=2, warmup_ratio=0.1, grad_clip=7.0,
                        log_every_steps=3, ckpt_every_steps=5, eval_every=2,
                        keep_checkpoint_max=3, keep_best_checkpoints_max=2)
    seen = {}
    kept = [tmp_path / name for name in ("best_segm_AP_0.1000_step_00000006.ckpt",
                                         "step_00000004.ckpt", "step_00000005.ckpt")]

    class StandInCheckpoints:
        def __init__(self, folder, *, keep_latest, keep_best):
            seen["checkpoints"] = (keep_latest, keep_best)

        def kept(self):
            return kept

    class StandInTrainer:
        def __init__(self, **kwargs):
            seen["trainer"] = kwargs
            self.step = 6

        def fit(self):
            return {"segm/AP": 0.1}

    real_make_train_step = train_module.make_train_step

    def recording_make_train_step(*args, **kwargs):
        seen["clip_norm"] = kwargs.get("clip_norm")
        return real_make_train_step(*args, **kwargs)

    # MindSpore takes its device only before its first kernel, which other tests of this process
    # may have run already: the selection is recorded here (run.py's subprocess tests select it).
    monkeypatch.setattr(train_module, "select_device", lambda target: seen.update(device=target))
    monkeypatch.setattr(train_module, "CheckpointManager", StandInCheckpoints)
    monkeypatch.setattr(train_module, "Trainer", StandInTrainer)
    monkeypatch.setattr(train_module, "make_train_step", recording_make_train_step)
    tracker = RecordingTracker()
    (tmp_path / "job").mkdir()
    assert train_module.train(cfg, tracker=tracker, output_dir=tmp_path / "job") == {"segm/AP": 0.1}

    settings = seen["trainer"]["settings"]
    assert (settings.epochs, settings.steps_per_epoch, settings.total_steps, settings.batch_size,
            settings.log_every_steps, settings.ckpt_every_steps, settings.eval_every_epochs) == (
        3, STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH, 2, 3, 5, 2)
    # lr 0.02 for 16 images, scaled to 2: 0.0025; divided by 10 at epochs 1 and 2
    expected = multistep_with_warmup(lr=0.0025, total_steps=6, steps_per_epoch=STEPS_PER_EPOCH,
                                     lr_steps=[1, 2], warmup_steps=2, warmup_ratio=0.1)
    np.testing.assert_allclose(seen["trainer"]["learning_rates"], expected, rtol=1e-6)
    assert len(set(np.round(expected, 8))) >= 3
    assert seen["clip_norm"] == 7.0 and seen["device"] == "CPU"
    assert seen["checkpoints"] == (3, 2)
    assert [(name, folder) for name, folder in tracker.artifacts if folder == "checkpoints"] == [
        (path.name, "checkpoints") for path in kept]
