"""The tracker against a real MLflow store (SQLite in tmp_path), read back with mlflow's client."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from omegaconf import DictConfig, OmegaConf

from instaboost import tracking
from instaboost.tracking import (
    Tracker,
    artifact_location,
    flatten_params,
    run_name_from_overrides,
    start_run,
    tracking_uri,
)
from tests.conftest import PARENT_RUN_ENV

TRACKED_GROUPS = ("detector", "backbone", "augmentation", "schedule", "hardware", "dataset",
                  "tracking")


def _only_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("instaboost")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _artifact_text(uri: str, run_id: str, path: str, dst: Path) -> str:
    local = download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                               tracking_uri=uri)
    return Path(local).read_text()


# ----------------------------------------------------------------------------- store choice


def test_uri_precedence(cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg.tracking.uri = None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri(cfg) == "http://tracking.example:5000"
    assert artifact_location(cfg) is None  # a server chooses its own artifact store
    cfg.tracking.uri = "sqlite:////elsewhere/m.db"
    assert tracking_uri(cfg) == "sqlite:////elsewhere/m.db"


def test_default_store_is_absolute_even_for_a_relative_output_root(
        cfg: DictConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg.tracking.uri = None
    cfg.paths.output_root = "rel_out"
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path / 'rel_out' / 'mlflow.db'}"
    assert artifact_location(cfg) == (tmp_path / "rel_out" / "mlartifacts").as_uri()
    cfg.tracking.artifact_root = "arts"
    assert artifact_location(cfg) == (tmp_path / "arts").as_uri()
    cfg.tracking.artifact_root = "s3://bucket/arts"
    assert artifact_location(cfg) == "s3://bucket/arts"


# ----------------------------------------------------------------------------- params


def test_flatten_params_covers_every_tracked_leaf(cfg: DictConfig) -> None:
    params = flatten_params(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for group in TRACKED_GROUPS:
        assert any(key.startswith(f"{group}.") for key in params), group
    assert params["seed"] == "42" and params["task"] == "train"
    assert params["augmentation.action_prob"] == "[1.0, 0.0, 0.0]"
    assert params["detector.train_cfg.rpn.assigner.pos_iou_thr"] == "0.7"
    assert params["schedule.max_steps"] == "2"
    assert params["dataset.train_images"] == resolved["dataset"]["train_images"]
    assert not any(key.startswith(("paths.", "hydra.")) for key in params)


def test_conftest_uses_the_parent_run_variable() -> None:
    assert PARENT_RUN_ENV == tracking.PARENT_RUN_ENV


def test_run_name_from_overrides() -> None:
    assert run_name_from_overrides([]) == "default"
    assert run_name_from_overrides(["augmentation.aug_prob=0.5"]) == "augmentation.aug_prob=0.5"
    assert run_name_from_overrides(
        ["schedule=smoke", "paths.output_root=/x", "tracking.uri=sqlite:///m.db", "+seed=3"]
    ) == "schedule=smoke,+seed=3"
    assert len(run_name_from_overrides([f"k={'v' * 400}"])) == tracking.MAX_RUN_NAME_LENGTH


def test_param_limits_and_immutability(cfg: DictConfig, tmp_path: Path, mlflow_uri: str) -> None:
    many = {f"group.key_{i:03d}": i for i in range(250)}  # > 2 log_batch calls of 100
    long_key = "k" * 300
    with start_run(cfg, tmp_path) as tracker:
        tracker.log_params(many)
        tracker.log_params({long_key: "v" * 7000, "list": [1, 2]})
        tracker.log_params({"group.key_000": 0})  # same value again: fine
        with pytest.raises(ValueError, match="^group.key_001: param already logged"):
            tracker.log_params({"group.key_001": 99})
    _, run = _only_run(mlflow_uri)
    params = run.data.params
    assert all(params[key] == str(value) for key, value in many.items())
    truncated_key = next(key for key in params if key.startswith("kkk"))
    assert len(truncated_key) == 250 and len(params[truncated_key]) == 6000
    assert params["list"] == "[1, 2]"


# ----------------------------------------------------------------------------- runs


def test_run_records_params_tags_artifacts_metrics(cfg: DictConfig, tmp_path: Path,
                                                   mlflow_uri: str) -> None:
    output_dir = tmp_path / "job"
    (output_dir / ".hydra").mkdir(parents=True)
    (output_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    with start_run(cfg, output_dir) as tracker:
        assert isinstance(tracker, Tracker)
        tracker.log_metrics({"loss": 2.0, "segm/AP": 0.1}, step=0)
        tracker.log_metrics({"loss": 1.0}, step=5)
        tracker.log_dict({"ap": np.float32(0.25), "per_class": np.arange(3)}, "eval/coco.json")
        tracker.log_dict({"a": 1}, "eval/table.yaml")
        tracker.log_image(np.zeros((8, 12, 3), np.uint8), "images/sample.png")
        tracker.set_tags({"stage": "eval"})
        with pytest.raises(ValueError, match="uint8"):
            tracker.log_image(np.zeros((8, 12, 3), np.float32), "images/bad.png")
    client, run = _only_run(mlflow_uri)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "default"
    assert run.data.params == flatten_params(cfg)
    tags = run.data.tags
    assert tags["output_dir"] == str(output_dir)
    assert tags["overrides"] == ""
    assert tags["stage"] == "eval"
    commit, dirty = tracking.git_state()
    assert (tags["git_commit"], tags["git_dirty"]) == (commit, dirty)
    assert "mlflow.parentRunId" not in tags
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (5, 1.0)]
    assert run.data.metrics["segm/AP"] == pytest.approx(0.1)

    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", ".hydra", "eval", "images"} <= names
    dst = tmp_path / "download"
    logged_cfg = yaml.safe_load(_artifact_text(mlflow_uri, run_id, "config.yaml", dst))
    assert logged_cfg == OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(_artifact_text(mlflow_uri, run_id, "eval/coco.json", dst)) == {
        "ap": 0.25, "per_class": [0, 1, 2]}
    assert _artifact_text(mlflow_uri, run_id, ".hydra/overrides.yaml", dst) == "[]\n"
    assert [a.path for a in client.list_artifacts(run_id, "images")] == ["images/sample.png"]

    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "outputs" / "mlartifacts").as_uri()


def test_failing_job_ends_failed_and_reraises(cfg: DictConfig, tmp_path: Path,
                                              mlflow_uri: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(cfg, tmp_path) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("boom")
    _, run = _only_run(mlflow_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom"
    text = _artifact_text(mlflow_uri, run.info.run_id, "error.txt", tmp_path / "dl")
    assert "Traceback" in text and "RuntimeError: boom" in text


def test_interrupted_job_ends_killed(cfg: DictConfig, tmp_path: Path, mlflow_uri: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "_INTERRUPTED", False)
    with pytest.raises(KeyboardInterrupt):
        with start_run(cfg, tmp_path):
            raise KeyboardInterrupt
    _, run = _only_run(mlflow_uri)
    assert run.info.status == "KILLED"


def test_runs_in_one_process_never_nest(cfg: DictConfig, tmp_path: Path, mlflow_uri: str) -> None:
    with start_run(cfg, tmp_path / "a") as first:
        with start_run(cfg, tmp_path / "b") as second:
            assert first.run_id != second.run_id
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("instaboost")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert all("mlflow.parentRunId" not in r.data.tags for r in runs)
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_deleted_experiment_is_reported(cfg: DictConfig, tmp_path: Path, mlflow_uri: str) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    client.delete_experiment(
        client.create_experiment("instaboost", artifact_location=(tmp_path / "arts").as_uri()))
    with pytest.raises(RuntimeError, match="^tracking.experiment_name: .*deleted"):
        with start_run(cfg, tmp_path):
            pass


def test_git_state_unknown_without_git_or_repo(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    tracking.git_state.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert tracking.git_state() == ("unknown", "unknown")
    tracking.git_state.cache_clear()
    monkeypatch.undo()
    monkeypatch.setattr(tracking, "PROJECT_ROOT", tmp_path)  # not a git work tree
    assert tracking.git_state() == ("unknown", "unknown")
    tracking.git_state.cache_clear()


def test_run_name_setting_wins_over_the_overrides(cfg: DictConfig, tmp_path: Path,
                                                  mlflow_uri: str) -> None:
    cfg.tracking.run_name = "r50 baseline"
    with start_run(cfg, tmp_path):
        pass
    _, run = _only_run(mlflow_uri)
    assert run.info.run_name == "r50 baseline"


def test_job_log_and_exact_override_string_are_recorded(cfg: DictConfig, tmp_path: Path,
                                                        mlflow_uri: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a Hydra job: the overrides tag is the command line's, and the job's log file is
    uploaded when the run ends (after everything the job logged)."""
    job = tracking._JobInfo(overrides=["augmentation.aug_prob=0.5", "seed=3"],
                            choices={"augmentation": "instaboost", "experiment": "null"},
                            log_file="run.log")
    monkeypatch.setattr(tracking, "_job_info", lambda: job)
    with start_run(cfg, tmp_path):
        (tmp_path / "run.log").write_text("epoch 1/1 step 2/2 loss 1.0\n")
    client, run = _only_run(mlflow_uri)
    assert run.data.tags["overrides"] == "augmentation.aug_prob=0.5 seed=3"
    assert run.info.run_name == "augmentation.aug_prob=0.5,seed=3"
    assert run.data.tags["choice.experiment"] == "null"
    assert "run.log" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "loss 1.0" in _artifact_text(mlflow_uri, run.info.run_id, "run.log", tmp_path / "dl")


def test_git_state_reads_the_commit_and_the_dirty_flag(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git on this machine")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t",
                               "-c", "user.email=t@example.com", *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    monkeypatch.setattr(tracking, "PROJECT_ROOT", tmp_path.resolve())
    tracking.git_state.cache_clear()
    try:
        assert tracking.git_state() == (git("rev-parse", "HEAD"), "false")
        (tmp_path / "new.txt").write_text("untracked\n")
        tracking.git_state.cache_clear()
        assert tracking.git_state() == (git("rev-parse", "HEAD"), "true")
    finally:
        tracking.git_state.cache_clear()
