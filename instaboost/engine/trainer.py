"""The training loop: steps, progress line, periodic metrics, checkpoints and evaluation.

It receives built objects (model, step function, data, evaluator, checkpoint manager, tracker) and
knows nothing about Hydra or MLflow: the tracker is any object with `log_metrics(dict, step)`.
"""
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Sequence

import numpy as np

from instaboost.engine.checkpoint import CheckpointManager

log = logging.getLogger(__name__)

BEST_METRIC = "segm/AP"


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    steps_per_epoch: int
    total_steps: int          # epochs * steps_per_epoch, or fewer when schedule.max_steps caps it
    batch_size: int
    log_every_steps: int
    ckpt_every_steps: int
    eval_every_epochs: int    # evaluation also always runs after the last step


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Runs `settings.total_steps` optimizer steps and evaluates on schedule.

    `epoch_batches(epoch)` yields the batches of one epoch as tuples in the batch contract's order;
    `train_step(*batch)` returns (loss, loss_terms, grads_finite); `evaluate()` returns a metrics dict
    (bbox/* and segm/*); `learning_rates` holds the per-step learning rate for logging.
    """

    def __init__(self, *, network, optimizer, train_step: Callable, loss_names: Sequence[str],
                 epoch_batches: Callable[[int], Iterable], evaluate: Callable[[], Dict[str, float]],
                 checkpoints: CheckpointManager, tracker, settings: LoopSettings, learning_rates: np.ndarray):
        self.network = network
        self.optimizer = optimizer
        self.train_step = train_step
        self.loss_names = tuple(loss_names)
        self.epoch_batches = epoch_batches
        self.evaluate = evaluate
        self.checkpoints = checkpoints
        self.tracker = tracker
        self.settings = settings
        self.learning_rates = learning_rates
        self.step = 0
        self.skipped_steps = 0
        self.last_metrics: Dict[str, float] = {}

    def fit(self) -> Dict[str, float]:
        s = self.settings
        start = time.perf_counter()
        window = _Window()
        for epoch in range(s.epochs):
            if self.step >= s.total_steps:
                break
            self.network.set_train(True)
            data_start = time.perf_counter()
            for batch in self.epoch_batches(epoch):
                data_time = time.perf_counter() - data_start
                loss, terms, finite = self.train_step(*batch)
                self.step += 1
                finite = bool(finite)
                if not finite:
                    self.skipped_steps += 1
                    log.warning("step %d: non-finite gradients, update skipped (%d so far)", self.step,
                                self.skipped_steps)
                window.add(float(loss), [float(t) for t in terms], data_time, time.perf_counter() - data_start)
                if self.step % s.log_every_steps == 0 or self.step == s.total_steps:
                    self._log_progress(epoch, window, start)
                    window = _Window()
                if s.ckpt_every_steps and self.step % s.ckpt_every_steps == 0:
                    self.checkpoints.save_latest(self.network, self.optimizer, self.step)
                if self.step >= s.total_steps:
                    break
                data_start = time.perf_counter()
            last = self.step >= s.total_steps
            if last:
                self._save_final()  # before the last evaluation, so the best checkpoint can link to it
            if last or (s.eval_every_epochs and (epoch + 1) % s.eval_every_epochs == 0):
                self._evaluate(epoch)
        self._save_final()
        self.tracker.log_metrics({"train/skipped_steps": float(self.skipped_steps)}, step=self.step)
        return dict(self.last_metrics)

    def _save_final(self) -> None:
        """Save the last step's checkpoint once (a periodic save may already have done it)."""
        if not any(p.name == f"step_{self.step:08d}.ckpt" for p in self.checkpoints.latest):
            self.checkpoints.save_latest(self.network, self.optimizer, self.step)

    def _log_progress(self, epoch: int, window: "_Window", start: float) -> None:
        s = self.settings
        loss, terms, data_time, step_time = window.means()
        lr = float(self.learning_rates[min(self.step - 1, len(self.learning_rates) - 1)])
        img_per_s = s.batch_size / step_time if step_time > 0 else 0.0
        elapsed = time.perf_counter() - start
        eta = elapsed / self.step * (s.total_steps - self.step)
        metrics = {"train/loss": loss, "train/lr": lr, "train/img_per_s": img_per_s, "train/data_time": data_time}
        metrics.update({f"train/{name}": value for name, value in zip(self.loss_names, terms)})
        self.tracker.log_metrics(metrics, step=self.step)
        term_text = " ".join(f"{name}={value:.4f}" for name, value in zip(self.loss_names, terms))
        log.info("epoch %d/%d step %d/%d loss %.4f (%s) lr %.5f %.2f img/s data %.3fs ETA %s",
                 epoch + 1, s.epochs, self.step, s.total_steps, loss, term_text, lr, img_per_s, data_time,
                 format_eta(eta))

    def _evaluate(self, epoch: int) -> None:
        self.network.set_train(False)
        started = time.perf_counter()
        metrics = self.evaluate()
        self.network.set_train(True)
        self.last_metrics = metrics
        self.tracker.log_metrics(metrics, step=self.step)
        log.info("evaluation after epoch %d (step %d, %.1fs): bbox AP %.4f AP50 %.4f | segm AP %.4f AP50 %.4f",
                 epoch + 1, self.step, time.perf_counter() - started, metrics.get("bbox/AP", float("nan")),
                 metrics.get("bbox/AP50", float("nan")), metrics.get("segm/AP", float("nan")),
                 metrics.get("segm/AP50", float("nan")))
        self.checkpoints.save_best(self.network, self.optimizer, self.step, metrics.get(BEST_METRIC))


class _Window:
    """Running means of the values logged every `log_every_steps` steps."""

    def __init__(self):
        self.losses, self.terms, self.data_times, self.step_times = [], [], [], []

    def add(self, loss: float, terms: Sequence[float], data_time: float, step_time: float) -> None:
        self.losses.append(loss)
        self.terms.append(terms)
        self.data_times.append(data_time)
        self.step_times.append(step_time)

    def means(self):
        return (float(np.mean(self.losses)), np.mean(np.asarray(self.terms), axis=0).tolist(),
                float(np.mean(self.data_times)), float(np.mean(self.step_times)))
