"""Shared fixtures: the real ``conf/`` composed and shrunk for fast tests, and MLflow stores.

``cfg_global`` (package scope) composes ``conf/config.yaml`` once with the smoke settings;
``cfg`` (function scope) is a deep copy whose outputs and MLflow store live in ``tmp_path``.
``mlflow_uri`` is a fresh SQLite store per test, copied from a template initialised once per
session (creating MLflow's tables takes seconds), and asserts at teardown that the test left no
run RUNNING.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from instaboost.config import CONFIG_DIR

# A config that trains in seconds: 2 steps of batch 1 at 128x128 on a 4-image demo dataset.
SMOKE_OVERRIDES = [
    "experiment=demo",
    "schedule=smoke",
    "hardware=cpu",
    "hardware.num_workers=1",
    "dataset=demo",
    "dataset.num_train=4",
    "dataset.num_val=2",
    "dataset.image_size=128",
]
# Mandatory values of the dataset options that have them (tests only compose, never read them).
MANDATORY_OVERRIDES = {
    "coco_folder": ["dataset.train_root=/data/coco_folder"],
    "coco2017": ["dataset.root=/data/coco"],
    "mask_rcnn_r50_instaboost_4x": ["dataset.root=/data/coco",
                                    "backbone.pretrained=/data/backbones/resnet50.ckpt"],
}
PROBE_TASK = "tracker_probe"
# The probe task raises for this aug_prob, so a sweep can contain a failing job.
PROBE_FAILING_AUG_PROB = 1.0
PROBE_METRIC = 0.5
# Same as instaboost.tracking.PARENT_RUN_ENV (checked in test_tracking.py); not imported, so
# test sessions that never touch MLflow do not pay for importing it.
PARENT_RUN_ENV = "INSTABOOST_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "Default"  # created by MLflow in every new store


def compose_config(overrides: list[str] | None = None, *, return_hydra_config: bool = False
                   ) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` (clears Hydra's global state after)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []),
                       return_hydra_config=return_hydra_config)


@pytest.fixture(autouse=True)
def _reset_hydra_state() -> Iterator[None]:
    """In-process Hydra runs leave GlobalHydra, HydraConfig and the parent-run variable set."""
    yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    os.environ.pop(PARENT_RUN_ENV, None)


@pytest.fixture(scope="package")
def cfg_global(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """``conf/config.yaml`` composed once with SMOKE_OVERRIDES (do not modify: use ``cfg``)."""
    cfg = compose_config(SMOKE_OVERRIDES)
    cfg.paths.output_root = str(tmp_path_factory.mktemp("outputs"))
    return cfg


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised, empty MLflow SQLite database to copy (table creation takes seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, mlflow_template_db: Path) -> Iterator[str]:
    """A fresh SQLite tracking store for this test; fails the test if a run is left RUNNING."""
    from mlflow import MlflowClient

    path = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template_db, path)
    uri = f"sqlite:///{path}"
    yield uri
    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    running = client.search_runs([e.experiment_id for e in experiments],
                                 filter_string="attributes.status = 'RUNNING'")
    assert not running, f"runs left RUNNING: {[r.info.run_name for r in running]}"
    # Only MLflow's own "Default" experiment may point at ./mlruns; ours never do.
    stray = [e.name for e in experiments
             if e.name != DEFAULT_EXPERIMENT and "mlruns" in e.artifact_location]
    assert not stray, f"experiments storing artifacts in ./mlruns: {stray}"


@pytest.fixture
def cfg(cfg_global: DictConfig, tmp_path: Path, mlflow_uri: str) -> DictConfig:
    """A private copy of the smoke config: outputs in tmp_path, a fresh SQLite MLflow store."""
    cfg = copy.deepcopy(cfg_global)
    cfg.paths.output_root = str(tmp_path / "outputs")
    cfg.tracking.uri = mlflow_uri
    return cfg


def _probe_task(cfg: DictConfig, *, tracker: Any, output_dir: Path) -> Dict[str, float]:
    """Test-only task: exercises the tracker like a training task would, in milliseconds."""
    tracker.log_metrics({"loss": 1.0, "lr": 0.01}, step=0)
    tracker.log_metrics({"loss": 0.5, "lr": 0.01}, step=1)
    (output_dir / "probe.txt").write_text("probe output\n")
    if cfg.augmentation.aug_prob == PROBE_FAILING_AUG_PROB:
        raise RuntimeError("probe task forced to fail")
    metrics = {"segm/AP": PROBE_METRIC, "bbox/AP": PROBE_METRIC}
    tracker.log_metrics(metrics, step=2)
    return metrics


@pytest.fixture
def probe_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """Serve ``instaboost.tasks`` as a registry holding only the test-only task
    ``tracker_probe`` (undone after the test); returns the task name.

    run.py imports ``TASKS`` from ``instaboost.tasks`` when a job starts, so these tests drive
    run.py, Hydra and the tracker without loading the training stack.
    """
    registry = types.ModuleType("instaboost.tasks")
    registry.TASKS = {PROBE_TASK: _probe_task}
    monkeypatch.setitem(sys.modules, "instaboost.tasks", registry)
    return PROBE_TASK


def run_app(monkeypatch: pytest.MonkeyPatch, app: Callable[[], Any], args: list[str]) -> None:
    """Run a ``@hydra.main`` app in this process with command-line ``args``."""
    monkeypatch.setattr("sys.argv", ["run.py", *args])
    GlobalHydra.instance().clear()
    app()


__all__ = [
    "MANDATORY_OVERRIDES",
    "PARENT_RUN_ENV",
    "PROBE_FAILING_AUG_PROB",
    "PROBE_METRIC",
    "PROBE_TASK",
    "SMOKE_OVERRIDES",
    "compose_config",
    "run_app",
]
