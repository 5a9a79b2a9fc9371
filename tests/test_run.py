"""run.py through Hydra itself: single runs, multiruns with a parent MLflow run, failing jobs.

Most tests run ``run.main`` in this process with the test-only task ``tracker_probe`` (see
conftest.py), so they exercise Hydra, the sweep callback and the tracker against a real MLflow
store in about a second each. ``test_real_train_sweep`` runs the real training task in a
subprocess (``python run.py -m ...``).
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import run as run_module
from instaboost.config import PROJECT_ROOT
from instaboost.tracking import PARENT_RUN_ENV
from tests.conftest import PROBE_METRIC, SMOKE_OVERRIDES, run_app

QUIET_HYDRA = ["hydra/job_logging=none", "hydra/hydra_logging=none"]
SUBPROCESS_TIMEOUT_S = 300
TRAIN_TIMEOUT_S = 900


def _store_args(tmp_path: Path, uri: str) -> list[str]:
    return [f"paths.output_root={tmp_path / 'outputs'}", f"tracking.uri='{uri}'"]


def _all_runs(uri: str) -> list:
    """Runs of experiment "instaboost"."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("instaboost")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id])


def _runs(uri: str) -> dict[str, object]:
    """Runs of experiment "instaboost" by run name (names must be distinct: none hides another)."""
    runs = _all_runs(uri)
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names), names
    return dict(zip(names, runs))


def _parent_and_children(uri: str):
    """(parent run, its child runs in job order); the children name it as their parent."""
    runs = _all_runs(uri)
    parents = [r for r in runs if "sweep_dir" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r is not parent]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    # A job's output folder is <sweep_dir>/<job number>.
    return parent, sorted(children, key=lambda run: int(Path(run.data.tags["output_dir"]).name))


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR", PARENT_RUN_ENV)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_single_run(monkeypatch, tmp_path, mlflow_uri, probe_task, capsys) -> None:
    run_app(monkeypatch, run_module.main,
            [f"task={probe_task}", "augmentation=none", *_store_args(tmp_path, mlflow_uri),
             *QUIET_HYDRA])
    out = capsys.readouterr().out
    runs = _runs(mlflow_uri)
    assert list(runs) == ["task=tracker_probe,augmentation=none"]
    run = runs["task=tracker_probe,augmentation=none"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["segm/AP"] == PROBE_METRIC
    tags = run.data.tags
    assert tags["choice.augmentation"] == "none" and tags["choice.schedule"] == "demo"
    assert "augmentation=none" in tags["overrides"]
    assert "mlflow.parentRunId" not in tags
    output_dir = Path(tags["output_dir"])
    assert output_dir.parent.parent == tmp_path / "outputs" / "runs"
    assert (output_dir / "probe.txt").is_file()
    assert f"Outputs: {output_dir}" in out
    assert f"mlflow ui --backend-store-uri {mlflow_uri}" in out
    venv_mlflow = Path(sys.executable).parent / "mlflow"
    if venv_mlflow.is_file():   # the CLI beside this interpreter, which need not be on PATH
        assert f"Browse runs: {venv_mlflow} ui" in out
    hydra_files = MlflowClient(tracking_uri=mlflow_uri).list_artifacts(run.info.run_id, ".hydra")
    assert {Path(a.path).name for a in hydra_files} == {"config.yaml", "hydra.yaml",
                                                      "overrides.yaml"}


def test_sweepers_get_the_segm_ap_or_none() -> None:
    assert run_module.sweeper_value({"segm/AP": 0.31, "bbox/AP": 0.42}) == 0.31
    assert run_module.sweeper_value({"segm/AP": -1.0, "bbox/AP": 0.42}) is None
    assert run_module.sweeper_value({}) is None


# run.py's command line with a task that waits to be stopped: its marker file says it started.
_WAITING_TASK = """
import sys
import time
import types
from pathlib import Path

MARKER = Path(sys.argv[1])

def waiting(cfg, *, tracker, output_dir):
    MARKER.write_text("started")
    time.sleep(120)
    return {}

registry = types.ModuleType("instaboost.tasks")
registry.TASKS = {"waiting": waiting}
sys.modules["instaboost.tasks"] = registry
import run
sys.argv = ["run.py", *sys.argv[2:]]
run.cli()
"""


def test_sigterm_ends_the_run_killed(tmp_path, mlflow_uri) -> None:
    """Schedulers stop jobs with SIGTERM: the run must end KILLED, not stay RUNNING."""
    marker = tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAITING_TASK, str(marker), "task=waiting",
         *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA],
        cwd=PROJECT_ROOT, env=_subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.communicate(timeout=10)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "received signal 15" in stderr, stderr
    (run,) = _runs(mlflow_uri).values()
    assert run.info.status == "KILLED"


def test_browse_command_per_store() -> None:
    assert run_module.browse_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000"
    local = run_module.browse_command("sqlite:////data/my runs/mlflow.db")
    assert local.endswith(" ui --backend-store-uri 'sqlite:////data/my runs/mlflow.db'")


def test_multirun_parent_with_two_children(monkeypatch, tmp_path, mlflow_uri, probe_task) -> None:
    run_app(monkeypatch, run_module.main,
            ["-m", f"task={probe_task}", "augmentation.aug_prob=0.0,0.5",
             *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA])
    parent, children = _parent_and_children(mlflow_uri)
    assert parent.info.status == "FINISHED"
    assert [c.info.run_name for c in children] == ["task=tracker_probe,augmentation.aug_prob=0.0",
                                                   "task=tracker_probe,augmentation.aug_prob=0.5"]
    assert {c.info.status for c in children} == {"FINISHED"}
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    assert sweep_dir.parent.parent == tmp_path / "outputs" / "multirun"
    assert "augmentation.aug_prob=0.0,0.5" in parent.data.tags["sweep_overrides"]
    assert parent.data.tags["job.0.status"] == parent.data.tags["job.1.status"] == "COMPLETED"
    assert [Path(c.data.tags["output_dir"]) for c in children] == [sweep_dir / "0", sweep_dir / "1"]
    assert [c.data.params["augmentation.aug_prob"] for c in children] == ["0.0", "0.5"]
    parent_artifacts = MlflowClient(tracking_uri=mlflow_uri).list_artifacts(parent.info.run_id)
    assert [a.path for a in parent_artifacts] == ["multirun.yaml"]
    assert PARENT_RUN_ENV not in os.environ


def test_failing_job_fails_parent_and_sweep_continues(monkeypatch, tmp_path, mlflow_uri,
                                                      probe_task, capsys) -> None:
    # Hydra 1.3's BasicSweeper runs the whole batch, then re-raises the failed job's error
    # (so on_multirun_end is never called) and the app exits with status 1.
    with pytest.raises(SystemExit) as info:
        run_app(monkeypatch, run_module.main,
                ["-m", f"task={probe_task}", "augmentation.aug_prob=0.5,1.0,0.0",
                 *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA])
    assert info.value.code == 1
    assert "probe task forced to fail" in capsys.readouterr().err
    parent, children = _parent_and_children(mlflow_uri)
    assert [(c.info.run_name.split("=")[-1], c.info.status) for c in children] == [
        ("0.5", "FINISHED"), ("1.0", "FAILED"), ("0.0", "FINISHED")]
    failed = children[1]
    assert failed.data.tags["error"] == "RuntimeError: probe task forced to fail"
    assert parent.info.status == "FAILED"
    assert parent.data.tags["job.1.status"] == "FAILED"
    assert parent.data.tags["job.2.status"] == "COMPLETED"


def test_config_error_stops_before_tracking(monkeypatch, tmp_path, mlflow_uri, probe_task,
                                            capsys) -> None:
    with pytest.raises(SystemExit):
        run_app(monkeypatch, run_module.main,
                [f"task={probe_task}", "augmentation.action_prob=[0.5,0.2,0.2]",
                 *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA])
    assert "augmentation.action_prob: must sum to 1" in capsys.readouterr().err
    assert _runs(mlflow_uri) == {}


def test_missing_dataset_stops_before_tracking(monkeypatch, tmp_path, mlflow_uri, probe_task,
                                              capsys) -> None:
    """A path typo is named with its key before MindSpore loads, and no run is recorded."""
    with pytest.raises(SystemExit):
        run_app(monkeypatch, run_module.main,
                [f"task={probe_task}", "dataset=coco_folder",
                 f"dataset.train_root={tmp_path / 'no_such_set'}",
                 *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA])
    assert (f"dataset.train_images: folder {tmp_path / 'no_such_set' / 'images'} does not exist"
            in capsys.readouterr().err)
    assert _runs(mlflow_uri) == {}


def test_unknown_task_is_a_config_error(monkeypatch, tmp_path, mlflow_uri, probe_task,
                                        capsys) -> None:
    with pytest.raises(SystemExit):
        run_app(monkeypatch, run_module.main,
                ["task=no_such_task", *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA])
    assert "task: unknown task 'no_such_task'" in capsys.readouterr().err
    assert _runs(mlflow_uri) == {}


def test_single_run_ignores_a_leftover_parent_id(monkeypatch, tmp_path, mlflow_uri,
                                                 probe_task) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment_id = client.create_experiment("instaboost",
                                             artifact_location=(tmp_path / "arts").as_uri())
    stale = client.create_run(experiment_id, run_name="old sweep",
                              tags={"sweep_dir": "/somewhere/else"})
    client.set_terminated(stale.info.run_id, "FINISHED")
    monkeypatch.setenv(PARENT_RUN_ENV, stale.info.run_id)
    run_app(monkeypatch, run_module.main,
            [f"task={probe_task}", *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA])
    run = _runs(mlflow_uri)["task=tracker_probe"]
    assert run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags


def test_sweep_dying_after_start_leaves_no_running_parent(tmp_path, mlflow_uri) -> None:
    # The parent run is created in on_multirun_start; the typo then fails the sweeper's job
    # composition, so neither on_job_end nor on_multirun_end runs: the atexit guard ends it.
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", "schedule.lrr=0.1,0.2",
         *_store_args(tmp_path, mlflow_uri)],
        cwd=PROJECT_ROOT, env=_subprocess_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 1, proc.stderr
    assert "schedule.lrr" in proc.stderr
    runs = list(_runs(mlflow_uri).values())
    assert len(runs) == 1 and "sweep_dir" in runs[0].data.tags
    assert runs[0].info.status == "FAILED"


# run.py's command line, with a KeyboardInterrupt where no job's run is open: its validation.
_INTERRUPT_BETWEEN_RUNS = """
import sys
import run
def interrupted(cfg):
    raise KeyboardInterrupt("between runs")
run.validate = interrupted
sys.argv = ["run.py", *sys.argv[1:]]
run.cli()
"""


def test_sweep_interrupted_between_runs_ends_its_parent_killed(tmp_path, mlflow_uri) -> None:
    # Ctrl-C or SIGTERM while Hydra composes a job or MindSpore loads: no job's run records the
    # interrupt, so the entry point does, and the exit guard ends the parent KILLED, not FAILED.
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_BETWEEN_RUNS, "-m", "augmentation.aug_prob=0.0,0.5",
         *_store_args(tmp_path, mlflow_uri), *QUIET_HYDRA],
        cwd=PROJECT_ROOT, env=_subprocess_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert "KeyboardInterrupt: between runs" in proc.stderr, proc.stderr
    runs = list(_runs(mlflow_uri).values())
    assert len(runs) == 1 and "sweep_dir" in runs[0].data.tags
    assert runs[0].info.status == "KILLED"


def test_unusable_device_names_the_key_and_fails_the_run(tmp_path, mlflow_uri) -> None:
    # hardware=gpu where MindSpore's GPU backend cannot load (CI has no GPU): the real train
    # task refuses it at its first step, naming the key, and its MLflow run ends FAILED.
    proc = subprocess.run(
        [sys.executable, "run.py", *SMOKE_OVERRIDES, "hardware=gpu",
         *_store_args(tmp_path, mlflow_uri)],
        cwd=PROJECT_ROOT, env=_subprocess_env(), capture_output=True, text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    (run,) = _runs(mlflow_uri).values()
    assert run.data.params["hardware.device_target"] == "GPU"
    if proc.returncode == 0:
        pytest.skip("MindSpore runs on a GPU on this machine")
    assert "ConfigError: hardware.device_target: MindSpore cannot run on 'GPU'" in proc.stderr
    assert "CUDA 11" in proc.stderr
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("ConfigError: hardware.device_target")


def test_a_batch_larger_than_the_dataset_names_the_key(tmp_path, mlflow_uri) -> None:
    proc = subprocess.run(
        [sys.executable, "run.py", *SMOKE_OVERRIDES, "schedule.batch_size=8",
         *_store_args(tmp_path, mlflow_uri)],
        cwd=PROJECT_ROOT, env=_subprocess_env(), capture_output=True, text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert proc.returncode == 1
    assert "ConfigError: schedule.batch_size: 4 training images" in proc.stderr
    assert "cannot fill one batch of 8" in proc.stderr
    (run,) = _runs(mlflow_uri).values()
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_real_train_sweep(tmp_path, mlflow_uri) -> None:
    """Three smoke trainings with the real ``train`` task: one parent, three FINISHED children;
    the third job, configured as the first, trains as it did, to 1e-6 (the jobs share a process:
    nothing of one job may leak into the next). Under a dynamic loss scale, so that each job
    makes its own scaler (MindSpore's own could unscale by an earlier one's value)."""
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", *SMOKE_OVERRIDES, "schedule.loss_scale_type=dynamic",
         "schedule.loss_scale=1024", "augmentation.aug_prob=0.0,1.0,0.0",
         *_store_args(tmp_path, mlflow_uri)],
        cwd=PROJECT_ROOT, env=_subprocess_env(), capture_output=True, text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"mlflow ui --backend-store-uri {mlflow_uri}" in proc.stdout
    parent, children = _parent_and_children(mlflow_uri)
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED"
        assert "segm/AP" in child.data.metrics and "bbox/AP" in child.data.metrics
        # The data counters: evaluation counted (into the validation source's counters); the
        # samples trained on, 2 steps of batch 1, though the worker made more of the 4 ahead;
        # the augmentation grid's samples not counted as trained ones.
        counts = child.data.metrics
        assert counts["data/eval_samples"] > 0
        assert counts["data/samples"] == 2
        augmented = counts["data/instaboost_applied"] + counts["data/instaboost_no_instances"]
        assert augmented == (2 if child.data.params["augmentation.aug_prob"] == "1.0" else 0)
    assert [c.data.params["augmentation.aug_prob"] for c in children] == ["0.0", "1.0", "0.0"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    first, _, third = children
    for name in ("train/loss", "segm/AP", "bbox/AP"):
        histories = [[m.value for m in client.get_metric_history(run.info.run_id, name)]
                     for run in (first, third)]
        assert histories[0] and histories[0] == pytest.approx(histories[1], rel=1e-6), name

    # Read back as a user would, through mlflow.search_runs: every metric and artifact of a run.
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    table = mlflow.search_runs(experiment_names=["instaboost"], filter_string="tags.choice.schedule = 'smoke'")
    assert len(table) == 3 and set(table["status"]) == {"FINISHED"}
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"):
            assert f"metrics.{iou_type}/{name}" in table.columns
    for name in ("train/loss", "train/loss_rpn_cls", "train/loss_mask", "train/lr", "train/img_per_s",
                 "train/data_time"):
        assert f"metrics.{name}" in table.columns
    for child in children:
        run_id = child.info.run_id
        artifacts = {a.path for folder in ("checkpoints", "evaluation", "augmentation")
                     for a in client.list_artifacts(run_id, folder)}
        assert any(p.endswith(".ckpt") for p in artifacts), artifacts
        assert {"evaluation/coco_results.json", "evaluation/per_category_ap.md",
                "augmentation/samples.png"} <= artifacts


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "param", "value"),
    [
        ("hardware.matmul_precision=bfloat16", "hardware.matmul_precision", "bfloat16"),
        # the other backbones of the README: grouped 3x3 convolutions (ResNeXt) take the unfold
        # path of the C++ kernels, not Winograd's
        ("backbone=resnet101", "backbone.depth", "101"),
        ("backbone=resnext101_64x4d", "backbone.groups", "64"),
    ],
    ids=["bfloat16", "resnet101", "resnext101_64x4d"],
)
def test_real_train_with_another_option(tmp_path, mlflow_uri, override, param, value) -> None:
    """An offered option trains end to end: FINISHED, the option logged, finite loss, evaluated."""
    proc = subprocess.run(
        [sys.executable, "run.py", *SMOKE_OVERRIDES, override, *_store_args(tmp_path, mlflow_uri)],
        cwd=PROJECT_ROOT, env=_subprocess_env(), capture_output=True, text=True,
        timeout=TRAIN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list(_runs(mlflow_uri).values())
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params[param] == value
    assert math.isfinite(runs[0].data.metrics["train/loss"])
    assert "segm/AP" in runs[0].data.metrics
