"""MLflow tracking: the only module of the project that imports mlflow.

One MLflow run per Hydra job (:func:`start_run`), one parent run per multirun sweep
(:class:`MlflowSweepCallback`, registered in ``conf/config.yaml`` under ``hydra.callbacks``).
Everything talks to the store through an explicit :class:`mlflow.MlflowClient`, never the fluent
active-run stack, so the jobs Hydra's basic launcher runs one after another in one process can
never attach to each other's runs.

Store: ``tracking.uri``, else env ``MLFLOW_TRACKING_URI``, else an SQLite file
``<paths.output_root>/mlflow.db`` (absolute; MLflow 3 deprecates the ``./mlruns`` file store).
New experiments of a local store keep artifacts in ``<paths.output_root>/mlartifacts`` (or
``tracking.artifact_root``). Browse with ``mlflow ui --backend-store-uri <uri>``.

Runs always end FINISHED, FAILED (exception, re-raised) or KILLED (KeyboardInterrupt); a parent
run still RUNNING at interpreter exit (Hydra 1.3's BasicSweeper re-raises a failed job's error
after the batch and never calls ``on_multirun_end``) is ended by an ``atexit`` guard.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence
from urllib.parse import urlparse

import cv2
import numpy as np
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig, OmegaConf

from instaboost.config import PROJECT_ROOT, requested_tracking_uri

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "INSTABOOST_PARENT_RUN_ID"
TRACKED_GROUPS = ("detector", "backbone", "augmentation", "schedule", "hardware", "dataset",
                  "tracking")
TRACKED_TOP_LEVEL = ("seed", "task")
# Overrides that say where results go, not what was run: left out of run names.
RUN_NAME_IGNORED_PREFIXES = ("paths.", "tracking.", "hydra.")
DEFAULT_RUN_NAME = "default"
# Width of the runs.name column in MLflow's SQL schema.
MAX_RUN_NAME_LENGTH = 250
DB_FILE_NAME = "mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
LOCAL_STORE_SCHEMES = ("", "file", "sqlite")
GIT_TIMEOUT_S = 10.0
UNKNOWN = "unknown"
TRUNCATION_MARK = "..."

TAG_OUTPUT_DIR = "output_dir"
TAG_OVERRIDES = "overrides"
TAG_GIT_COMMIT = "git_commit"
TAG_GIT_DIRTY = "git_dirty"
TAG_CHOICE_PREFIX = "choice."
TAG_SWEEP_DIR = "sweep_dir"
TAG_SWEEP_OVERRIDES = "sweep_overrides"
TAG_ERROR = "error"
TAG_PARENT = "mlflow.parentRunId"
TAG_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"

# Set when a KeyboardInterrupt ended a job, so the atexit guard ends open parents KILLED.
_INTERRUPTED = False
# Parent runs of sweeps this process started and has not ended yet: run id -> tracking URI.
_OPEN_PARENTS: Dict[str, str] = {}


# ----------------------------------------------------------------------------- store


def tracking_uri(cfg: DictConfig) -> str:
    """Resolved store URI: ``tracking.uri``, env MLFLOW_TRACKING_URI, else SQLite in output_root."""
    uri = requested_tracking_uri(cfg.tracking.uri)
    if uri:
        return uri
    return f"sqlite:///{_output_root(cfg) / DB_FILE_NAME}"


def artifact_location(cfg: DictConfig) -> Optional[str]:
    """Artifact location given to a newly created experiment (None: the server decides)."""
    root = cfg.tracking.artifact_root
    if root:
        return str(root) if "://" in str(root) else Path(root).expanduser().resolve().as_uri()
    if urlparse(tracking_uri(cfg)).scheme in LOCAL_STORE_SCHEMES:
        return (_output_root(cfg) / ARTIFACTS_DIR_NAME).as_uri()
    return None


def _output_root(cfg: DictConfig) -> Path:
    return Path(str(cfg.paths.output_root)).expanduser().resolve()


def _open_client(cfg: DictConfig) -> tuple[MlflowClient, str]:
    """Client on the configured store and the id of ``tracking.experiment_name``."""
    uri = tracking_uri(cfg)
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and parsed.path not in ("", "/:memory:"):
        # sqlite:////abs/file.db -> path "//abs/file.db"; the database file needs its folder.
        Path(parsed.path[1:]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    name = str(cfg.tracking.experiment_name)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client, client.create_experiment(name, artifact_location=artifact_location(cfg))
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            log.info("experiment %r was created concurrently by another job", name)
            experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        raise RuntimeError(
            f"tracking.experiment_name: MLflow experiment {name!r} is deleted in {uri}; restore "
            f"it (mlflow experiments restore) or choose another tracking.experiment_name"
        )
    return client, experiment.experiment_id


# ----------------------------------------------------------------------------- params / tags


def flatten_params(cfg: DictConfig) -> Dict[str, str]:
    """Every leaf of the tracked groups plus seed/task as ``{"dotted.key": str(value)}``.

    Lists stay one param (their string, e.g. ``"[0.8, 1.2]"``) so a swept list reads as one value.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: Dict[str, Any] = {}
    for group in TRACKED_GROUPS:
        if group in container:
            _flatten(container[group], group, flat)
    for key in TRACKED_TOP_LEVEL:
        if key in container:
            flat[key] = container[key]
    return {key: str(value) for key, value in flat.items()}


def _flatten(node: Any, prefix: str, out: Dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}", out)
    else:
        out[prefix] = node


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATION_MARK)] + TRUNCATION_MARK


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@lru_cache(maxsize=1)
def git_state() -> tuple[str, str]:
    """(commit, "true"/"false" dirty) of the project checkout, or ("unknown", "unknown") when git
    is absent or the project folder is not the top of a git work tree."""
    try:
        top, commit = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, check=True, timeout=GIT_TIMEOUT_S,
        ).stdout.splitlines()   # lines: the checkout's path may hold spaces
        # --no-optional-locks: never take index.lock (a commit may be running next to us).
        status = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(PROJECT_ROOT), "status", "--porcelain"],
            capture_output=True, text=True, check=True, timeout=GIT_TIMEOUT_S,
        ).stdout
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        log.info("git state of %s is unknown: %s", PROJECT_ROOT, err)
        return UNKNOWN, UNKNOWN
    if Path(top).resolve() != PROJECT_ROOT:
        log.info("%s is not the top of a git work tree (%s is)", PROJECT_ROOT, top)
        return UNKNOWN, UNKNOWN
    return commit, "true" if status.strip() else "false"


def _git_tags() -> Dict[str, str]:
    commit, dirty = git_state()
    tags = {TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: dirty}
    if commit != UNKNOWN:
        tags[TAG_MLFLOW_GIT_COMMIT] = commit
    return tags


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def run_name_from_overrides(overrides: Sequence[str]) -> str:
    """``"a.b=1,c=x"`` from a job's overrides, without output/tracking location overrides."""
    kept = [o for o in overrides if not _override_key(o).startswith(RUN_NAME_IGNORED_PREFIXES)]
    return _truncate(",".join(kept), MAX_RUN_NAME_LENGTH) if kept else DEFAULT_RUN_NAME


@dataclass
class _JobInfo:
    """What a run needs to know about the Hydra job it belongs to."""

    overrides: List[str] = field(default_factory=list)
    choices: Dict[str, str] = field(default_factory=dict)
    sweep_dir: Optional[str] = None
    output_subdir: Optional[str] = ".hydra"  # Hydra's default; None when Hydra saves none
    log_file: Optional[str] = None


def _job_info() -> _JobInfo:
    if not HydraConfig.initialized():
        return _JobInfo()
    hydra_cfg = HydraConfig.get()
    choices = {
        str(group): "null" if choice is None else str(choice)
        for group, choice in hydra_cfg.runtime.choices.items()
        if not str(group).startswith("hydra/")
    }
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return _JobInfo(
        overrides=[str(o) for o in hydra_cfg.overrides.task],
        choices=choices,
        sweep_dir=os.path.abspath(str(hydra_cfg.sweep.dir)) if multirun else None,
        output_subdir=hydra_cfg.output_subdir,
        log_file=f"{hydra_cfg.job.name}.log",
    )


def _parent_run_id(client: MlflowClient, job: _JobInfo) -> Optional[str]:
    """The sweep's parent run id, when this job belongs to the sweep that created it."""
    parent_id = os.environ.get(PARENT_RUN_ENV)
    if not parent_id or job.sweep_dir is None:
        return None
    try:
        parent_sweep = client.get_run(parent_id).data.tags.get(TAG_SWEEP_DIR)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        log.warning("%s=%s is not a run of this store: not linking", PARENT_RUN_ENV, parent_id)
        return None
    if parent_sweep != job.sweep_dir:
        log.warning("%s=%s belongs to sweep %s, not to this job's sweep %s: not linking",
                    PARENT_RUN_ENV, parent_id, parent_sweep, job.sweep_dir)
        return None
    return parent_id


# ----------------------------------------------------------------------------- tracker


class Tracker:
    """Logs to one MLflow run; handles MLflow's size limits and batching.

    Params are immutable in MLflow: re-logging the same value is a no-op, a different value
    raises ValueError naming the key.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self._params: Dict[str, str] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        new: Dict[str, str] = {}
        for raw_key, raw_value in params.items():
            key = _truncate(str(raw_key), MAX_ENTITY_KEY_LENGTH)
            value = _truncate(str(raw_value), MAX_PARAM_VAL_LENGTH)
            logged = self._params.get(key, new.get(key))
            if logged is not None and logged != value:
                raise ValueError(f"{key}: param already logged as {logged!r}, cannot change it "
                                 f"to {value!r} (MLflow params are immutable; use a metric or tag)")
            if logged is None:
                new[key] = value
        entities = [Param(key, value) for key, value in new.items()]
        for chunk in _chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)
        self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        entities = [
            Metric(_truncate(str(key), MAX_ENTITY_KEY_LENGTH), float(value), timestamp_ms,
                   int(step))
            for key, value in metrics.items()
        ]
        for chunk in _chunks(entities, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        entities = [
            RunTag(_truncate(str(key), MAX_ENTITY_KEY_LENGTH),
                   _truncate(str(value), MAX_TAG_VAL_LENGTH))
            for key, value in tags.items()
        ]
        for chunk in _chunks(entities, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def log_artifact(self, local_path: os.PathLike | str,
                     artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: os.PathLike | str,
                      artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as .json (default) or .yaml/.yml; NumPy scalars and arrays are allowed."""
        plain = json.loads(json.dumps(obj, default=_json_default))
        if Path(artifact_file).suffix.lower() in (".yaml", ".yml"):
            text = yaml.safe_dump(plain, sort_keys=False)
        else:
            text = json.dumps(plain, indent=2)
        self.log_text(text, artifact_file)

    def log_image(self, image_rgb_uint8: np.ndarray, artifact_file: str) -> None:
        """Log an image: uint8 (H, W, 3) RGB or (H, W) gray; the suffix picks the format (.png)."""
        image = np.asarray(image_rgb_uint8)
        rgb = image.ndim == 3 and image.shape[2] == 3
        if image.dtype != np.uint8 or not (image.ndim == 2 or rgb):
            raise ValueError(f"log_image needs uint8 (H, W, 3) RGB or (H, W); got {image.dtype} "
                             f"{image.shape}")
        encoded = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb else image
        target = Path(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / target.name
            if not cv2.imwrite(str(local), encoded):
                raise ValueError(f"OpenCV cannot write an image named {target.name!r}")
            parent = target.parent.as_posix()
            self.log_artifact(local, None if parent == "." else parent)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


@contextmanager
def start_run(cfg: DictConfig, output_dir: os.PathLike | str) -> Iterator[Tracker]:
    """One MLflow run for this job: params, tags, resolved config and ``.hydra/`` logged.

    Ends FINISHED, FAILED (the exception is recorded as tag ``error`` and ``error.txt``, then
    re-raised) or KILLED (KeyboardInterrupt). Inside a multirun the run links to the sweep's
    parent run through ``mlflow.parentRunId``.
    """
    output_dir = Path(output_dir).resolve()
    client, experiment_id = _open_client(cfg)
    job = _job_info()
    tags = {
        **resolve_tags({}),
        **_git_tags(),
        TAG_OUTPUT_DIR: str(output_dir),
        TAG_OVERRIDES: " ".join(job.overrides),
        **{f"{TAG_CHOICE_PREFIX}{group}": choice for group, choice in job.choices.items()},
    }
    parent_id = _parent_run_id(client, job)
    if parent_id:
        tags[TAG_PARENT] = parent_id
    name = cfg.tracking.run_name or run_name_from_overrides(job.overrides)
    tags = {key: _truncate(str(value), MAX_TAG_VAL_LENGTH) for key, value in tags.items()}
    run = client.create_run(experiment_id, run_name=_truncate(str(name), MAX_RUN_NAME_LENGTH),
                            tags=tags)
    tracker = Tracker(client, run.info.run_id)
    status = RunStatus.FINISHED
    try:
        tracker.log_params(flatten_params(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        if job.output_subdir and (output_dir / job.output_subdir).is_dir():
            tracker.log_artifacts(output_dir / job.output_subdir, job.output_subdir)
        yield tracker
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        mark_interrupted()
        raise
    except BaseException as err:
        status = RunStatus.FAILED
        _record_error(tracker, err)
        raise
    finally:
        if job.log_file and (output_dir / job.log_file).is_file():
            _log_quietly(tracker.log_artifact, output_dir / job.log_file)
        client.set_terminated(run.info.run_id, RunStatus.to_string(status))


def _record_error(tracker: Tracker, err: BaseException) -> None:
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    _log_quietly(tracker.set_tags, {TAG_ERROR: f"{type(err).__name__}: {err}"})
    _log_quietly(tracker.log_text, text, "error.txt")


def _log_quietly(function: Any, *args: Any) -> None:
    """Log something on the way out of a run; a failure is reported but must not mask the
    job's own outcome (the run is still ended and the job's exception still propagates)."""
    try:
        function(*args)
    except (MlflowException, OSError) as err:
        log.warning("could not log %s to MLflow: %s", args[-1], err)


# ----------------------------------------------------------------------------- sweeps


class MlflowSweepCallback(Callback):
    """Parent MLflow run per Hydra multirun.

    on_multirun_start creates the parent run and exports its id in ``INSTABOOST_PARENT_RUN_ID``
    (launchers that spawn processes inherit it; on_job_start sets it again for pickled copies);
    on_job_end records each job's status as tag ``job.<num>.status`` and ends the parent FAILED
    at the first failed job (Hydra 1.3's BasicSweeper then re-raises and skips
    on_multirun_end); on_multirun_end ends it FINISHED when every child succeeded.
    """

    def __init__(self) -> None:
        self.parent_run_id: Optional[str] = None
        self.uri: Optional[str] = None
        self.failed_jobs: List[int] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        client, experiment_id = _open_client(config)
        sweep_overrides = [str(o) for o in config.hydra.overrides.task]
        tags = {
            **resolve_tags({}),
            **_git_tags(),
            TAG_SWEEP_DIR: os.path.abspath(str(config.hydra.sweep.dir)),
            TAG_SWEEP_OVERRIDES: _truncate(" ".join(sweep_overrides), MAX_TAG_VAL_LENGTH),
        }
        run_name = "sweep " + run_name_from_overrides(sweep_overrides)
        run = client.create_run(experiment_id, run_name=_truncate(run_name, MAX_RUN_NAME_LENGTH),
                                tags=tags)
        self.parent_run_id = run.info.run_id
        self.uri = tracking_uri(config)
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        _OPEN_PARENTS[self.parent_run_id] = self.uri
        log.info("MLflow parent run %s for sweep %s", self.parent_run_id, tags[TAG_SWEEP_DIR])

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id:
            os.environ[PARENT_RUN_ENV] = self.parent_run_id

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self.parent_run_id:
            return
        client = MlflowClient(tracking_uri=self.uri)
        client.set_tag(self.parent_run_id, f"job.{config.hydra.job.num}.status",
                       job_return.status.name)
        if job_return.status == JobStatus.FAILED:
            self.failed_jobs.append(int(config.hydra.job.num))
        if self.failed_jobs:
            # Final already: one failed child fails the sweep. Ending it now (and again after
            # each later job, to move its end time) leaves nothing RUNNING if the sweeper
            # raises before on_multirun_end.
            client.set_terminated(self.parent_run_id, RunStatus.to_string(RunStatus.FAILED))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.parent_run_id:
            return
        client = MlflowClient(tracking_uri=self.uri)
        multirun_yaml = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if multirun_yaml.is_file():
            client.log_artifact(self.parent_run_id, str(multirun_yaml))
        failed = bool(self.failed_jobs) or _has_failed_children(client, self.parent_run_id)
        status = RunStatus.FAILED if failed else RunStatus.FINISHED
        client.set_terminated(self.parent_run_id, RunStatus.to_string(status))
        _OPEN_PARENTS.pop(self.parent_run_id, None)
        if os.environ.get(PARENT_RUN_ENV) == self.parent_run_id:
            del os.environ[PARENT_RUN_ENV]


def _has_failed_children(client: MlflowClient, parent_run_id: str) -> bool:
    """True when a child run (possibly logged by another process) ended FAILED or KILLED."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    bad = ("FAILED", "KILLED")
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'"
    )
    return any(child.info.status in bad for child in children)


def mark_interrupted() -> None:
    """Record that an interrupt (Ctrl-C, or SIGTERM raised as KeyboardInterrupt) stops this
    process, so sweep parents left open end KILLED, not FAILED. ``start_run`` records it for an
    interrupt inside a job's run; the entry point calls this for one that comes between runs
    (validation, MindSpore's import, Hydra composing the next job)."""
    global _INTERRUPTED
    _INTERRUPTED = True


@atexit.register
def _end_open_parents() -> None:
    """End parent runs this process left RUNNING (FAILED, or KILLED after an interrupt)."""
    status = RunStatus.to_string(RunStatus.KILLED if _INTERRUPTED else RunStatus.FAILED)
    for run_id, uri in list(_OPEN_PARENTS.items()):
        _OPEN_PARENTS.pop(run_id, None)
        try:
            client = MlflowClient(tracking_uri=uri)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status)
                client.set_tag(run_id, TAG_ERROR, "the sweep stopped before on_multirun_end")
        except MlflowException as err:
            log.error("could not end MLflow parent run %s in %s: %s", run_id, uri, err)


__all__ = [
    "MlflowSweepCallback",
    "PARENT_RUN_ENV",
    "Tracker",
    "artifact_location",
    "flatten_params",
    "git_state",
    "mark_interrupted",
    "run_name_from_overrides",
    "start_run",
    "tracking_uri",
]
