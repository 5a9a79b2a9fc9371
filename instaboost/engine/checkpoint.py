"""Checkpoint retention policy (mindyolo's CheckpointManager idea): the latest k and the best k by a metric.

A checkpoint holds the network's parameters and the optimizer's state (momenta, global step), so a
resumed run continues where it stopped instead of restarting the momentum from zero.
"""
import logging
import math
import os
from pathlib import Path
from typing import List, Optional, Tuple

import mindspore as ms

log = logging.getLogger(__name__)


class CheckpointManager:
    """Keeps `keep_latest` periodic checkpoints and `keep_best` checkpoints ranked by `metric` (higher is better)."""

    def __init__(self, directory: Path, *, keep_latest: int, keep_best: int, metric: str = "segm/AP"):
        if keep_latest < 0 or keep_best < 0:
            raise ValueError(f"checkpoint counts must be >= 0, got latest={keep_latest} best={keep_best}")
        if keep_best > 0 and not metric:
            raise ValueError("keeping best checkpoints needs a metric name")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_latest = keep_latest
        self.keep_best = keep_best
        self.metric = metric
        self.latest: List[Path] = []
        self.best: List[Tuple[float, Path]] = []

    @staticmethod
    def _save(network, optimizer, path: Path) -> Path:
        params = list(network.get_parameters())
        names = {p.name for p in params}
        params += [p for p in _optimizer_state(optimizer) if p.name not in names]
        ms.save_checkpoint(params, str(path))
        return path

    def save_latest(self, network, optimizer, step: int) -> Optional[Path]:
        if self.keep_latest == 0:
            return None
        path = self._save(network, optimizer, self.directory / f"step_{step:08d}.ckpt")
        self.latest.append(path)
        while len(self.latest) > self.keep_latest:
            self._delete(self.latest.pop(0))
        return path

    def save_best(self, network, optimizer, step: int, value: float) -> Optional[Path]:
        """Save when `value` ranks among the best k; returns the path, or None when it does not.
        COCOeval's -1 (no ground truth to score against) ranks nothing, as NaN does."""
        if self.keep_best == 0 or value is None or math.isnan(value) or value < 0:
            return None
        if len(self.best) >= self.keep_best and value <= self.best[-1][0]:
            return None
        tag = self.metric.replace("/", "_")
        path = self.directory / f"best_{tag}_{value:.4f}_step_{step:08d}.ckpt"
        same_step = self.directory / f"step_{step:08d}.ckpt"
        if same_step in self.latest and same_step.exists():
            # The evaluation after the last step ranks the checkpoint just saved: link, don't rewrite it.
            os.link(same_step, path)
        else:
            self._save(network, optimizer, path)
        self.best.append((value, path))
        self.best.sort(key=lambda item: -item[0])
        while len(self.best) > self.keep_best:
            self._delete(self.best.pop()[1])
        return path

    def kept(self) -> List[Path]:
        """Distinct checkpoints on disk: the best k, then the latest k not already among them."""
        best = [p for _, p in self.best if p.exists()]
        best_steps = {p.name.rsplit("_step_", 1)[-1] for p in best}
        latest = [p for p in self.latest if p.exists() and p.name.split("step_", 1)[-1] not in best_steps]
        return best + latest

    @staticmethod
    def _delete(path: Path) -> None:
        try:
            os.remove(path)
        except OSError as err:
            log.warning("could not delete old checkpoint %s: %s", path, err)


def _optimizer_state(optimizer) -> list:
    """The optimizer's own parameters (momenta, global_step, learning rate), not the network weights."""
    state = [optimizer.global_step]
    for attr in ("moments", "moment1", "moment2", "accum"):
        values = getattr(optimizer, attr, None)
        if values is not None:
            state.extend(values)
    return state


def load_checkpoint(path: Path, network, optimizer=None) -> List[str]:
    """Load network (and optimizer state when given); raise naming the file on missing parameters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    values = ms.load_checkpoint(str(path))
    missing, _ = ms.load_param_into_net(network, values, strict_load=False)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} network parameters, e.g. {missing[:5]}")
    if optimizer is not None:
        ms.load_param_into_net(optimizer, values, strict_load=False)
    return sorted(values)
