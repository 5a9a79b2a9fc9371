"""Entry point: compose the config, validate it, run the task inside one MLflow run.

    python run.py experiment=demo                   # make demo: train on the demo dataset
    python run.py -m augmentation.aug_prob=0,0.5    # one MLflow parent run, a child per value
    python run.py experiment=mask_rcnn_r50_instaboost_4x dataset.root=/data/coco \
        backbone.pretrained=/data/backbones/resnet50.ckpt

Without ``experiment=demo`` the groups' defaults (demo data, CPU) keep the seed's detector
sizes (512 sampled RoIs, 128 mask RoIs per image): a slower CPU step than the demo's.

Returns the task's ``segm/AP`` so Hydra sweepers can optimise it.
"""
from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from instaboost.config import CONFIG_DIR  # registers the resolvers and schemas
from instaboost.config.validate import ConfigError, check_input_paths, validate
from instaboost.tracking import mark_interrupted, start_run, tracking_uri

OPTIMIZED_METRIC = "segm/AP"
# Tracking URIs of servers, whose runs are browsed at their own address.
SERVED_SCHEMES = ("http", "https", "databricks")


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    """Schedulers stop jobs with SIGTERM: end the MLflow run KILLED, never leave it RUNNING."""
    raise KeyboardInterrupt(f"received signal {signum}")


def _mlflow_command() -> str:
    """The mlflow CLI of this interpreter's environment (make demo's .venv is not on PATH)."""
    beside = Path(sys.executable).parent / "mlflow"
    return str(beside) if beside.is_file() else "mlflow"


def browse_command(uri: str) -> str:
    """What opens the runs of store `uri`: a tracking server serves its own UI (``mlflow ui``
    cannot open an http store), any other store is opened by ``mlflow ui`` on it."""
    if uri.split(":", 1)[0] in SERVED_SCHEMES:
        return f"open {uri}"
    return f"{shlex.quote(_mlflow_command())} ui --backend-store-uri {shlex.quote(uri)}"


def sweeper_value(metrics: dict) -> Optional[float]:
    """What a Hydra sweeper optimises: the run's final segm/AP, or None where COCOeval scored
    nothing (its -1: no ground truth) or the task reported none."""
    value = metrics.get(OPTIMIZED_METRIC)
    return value if value is not None and value >= 0 else None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    validate(cfg)
    check_input_paths(cfg)
    # Imported here so `--help`, `--cfg` and config errors answer without loading MindSpore.
    from instaboost.tasks import TASKS

    if cfg.task not in TASKS:
        raise ConfigError(f"task: unknown task {cfg.task!r}; known: {sorted(TASKS)}")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with start_run(cfg, output_dir) as tracker:
            metrics = TASKS[cfg.task](cfg, tracker=tracker, output_dir=output_dir)
    finally:
        print(f"Outputs: {output_dir}")
        print(f"Browse runs: {browse_command(tracking_uri(cfg))}")
    return sweeper_value(metrics)


def cli() -> None:
    """``python run.py ...``: Hydra's app, with SIGTERM raised as KeyboardInterrupt. An interrupt
    is recorded wherever it lands, so a sweep's parent run ends KILLED even when no job's run
    was open (Hydra lets KeyboardInterrupt through; the exit guard ends the parent)."""
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    try:
        main()
    except KeyboardInterrupt:
        mark_interrupted()
        raise


if __name__ == "__main__":
    cli()
