"""Every option of every config group composes, is typed by its schema and passes validation;
schema errors (unknown key, wrong type) fail at composition and name the key."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from instaboost.config import CONFIG_DIR, PROJECT_ROOT, unique_token
from instaboost.config import schema
from instaboost.config.validate import validate
from tests.conftest import MANDATORY_OVERRIDES, compose_config

GROUP_DIRS = sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir())
OPTIONS = [(d.name, f.stem) for d in GROUP_DIRS for f in sorted(d.glob("*.yaml"))]
# Schema type of each group's node, per option (dataset options have their own schemas).
GROUP_TYPES = {
    "detector": schema.DetectorConfig,
    "backbone": schema.BackboneConfig,
    "augmentation": schema.AugmentationConfig,
    "schedule": schema.ScheduleConfig,
    "hardware": schema.HardwareConfig,
    "tracking": schema.TrackingConfig,
}
DATASET_TYPES = {
    "demo": schema.DemoDatasetConfig,
    "coco_folder": schema.CocoFolderDatasetConfig,
    "coco2017": schema.Coco2017DatasetConfig,
}
TOKEN_PATTERN = re.compile(r"_(\d+)-([0-9a-f]{8})$")


def _with_mandatory(group: str, option: str) -> list[str]:
    overrides = [f"{group}={option}"]
    if group == "dataset":
        overrides += MANDATORY_OVERRIDES.get(option, [])
    if group == "experiment":
        overrides += MANDATORY_OVERRIDES.get(option, [])
    return overrides


def test_every_group_has_options() -> None:
    expected = {"detector", "backbone", "augmentation", "schedule", "hardware", "dataset",
                "tracking", "experiment"}
    assert {d.name for d in GROUP_DIRS} == expected
    assert all(list(d.glob("*.yaml")) for d in GROUP_DIRS)


def test_groups_offer_only_their_yaml_options() -> None:
    # What `run.py --help` lists and a `group=option` override accepts: the schemas live
    # outside the groups, so a bare schema is never offered as an option.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for group_dir in GROUP_DIRS:
            offered = loader.get_group_options(group_dir.name)
            assert offered == sorted(f.stem for f in group_dir.glob("*.yaml")), group_dir.name


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_composes_typed_and_valid(group: str, option: str) -> None:
    cfg = compose_config(_with_mandatory(group, option))
    validate(cfg)
    for name, node_type in GROUP_TYPES.items():
        assert OmegaConf.get_type(cfg[name]) is node_type, name
    assert OmegaConf.get_type(cfg.dataset) is DATASET_TYPES[cfg.dataset.name]
    if group not in ("experiment", "tracking"):
        assert cfg[group].name == option


def test_default_config() -> None:
    cfg = compose_config(return_hydra_config=True)
    assert cfg.task == "train"
    assert cfg.seed == 42
    for group, choice in [("detector", "mask_rcnn"), ("backbone", "resnet50"),
                          ("augmentation", "instaboost"), ("schedule", "demo"),
                          ("hardware", "cpu"), ("dataset", "demo")]:
        assert cfg.hydra.runtime.choices[group] == choice
    assert cfg.paths.output_root == str(PROJECT_ROOT / "outputs")
    assert cfg.paths.cache_dir == str(PROJECT_ROOT / "outputs" / "cache")
    assert Path(cfg.hydra.run.dir).is_absolute() and Path(cfg.hydra.sweep.dir).is_absolute()
    assert cfg.hydra.job.chdir is False
    assert cfg.hydra.callbacks.mlflow_sweep._target_ == "instaboost.tracking.MlflowSweepCallback"
    assert TOKEN_PATTERN.search(cfg.hydra.sweep.dir)
    assert cfg.dataset.train_images.startswith(cfg.paths.cache_dir)


def test_seed_recipe_experiment() -> None:
    cfg = compose_config(["experiment=mask_rcnn_r50_instaboost_4x",
                          *MANDATORY_OVERRIDES["mask_rcnn_r50_instaboost_4x"]],
                         return_hydra_config=True)
    choices = cfg.hydra.runtime.choices
    assert (choices.dataset, choices.schedule, choices.hardware, choices.augmentation) == (
        "coco2017", "4x", "gpu", "instaboost")
    assert cfg.schedule.epochs == 48 and list(cfg.schedule.lr_steps) == [32, 44]
    assert cfg.hardware.device_target == "GPU"
    assert cfg.augmentation.aug_prob == 0.5
    assert list(cfg.augmentation.action_candidate) == ["normal", "horizontal", "skip"]
    assert cfg.dataset.train_images == "/data/coco/train2017"
    assert cfg.dataset.val_annotations == "/data/coco/annotations/instances_val2017.json"


def test_coco_folder_val_defaults_to_train_root() -> None:
    cfg = compose_config(["dataset=coco_folder", "dataset.train_root=/d/set"])
    assert cfg.dataset.val_images == "/d/set/images"
    assert cfg.dataset.train_annotations == "/d/set/annotations.json"
    cfg = compose_config(["dataset=coco_folder", "dataset.train_root=/d/a",
                          "dataset.val_root=/d/b"])
    assert cfg.dataset.val_annotations == "/d/b/annotations.json"


def test_smoke_overrides_are_small(cfg_global: DictConfig) -> None:
    validate(cfg_global)
    assert cfg_global.schedule.max_steps == 2
    assert cfg_global.schedule.img_height == cfg_global.schedule.img_width == 128
    assert cfg_global.dataset.num_train == 4 and cfg_global.hardware.device_target == "CPU"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("schedule.lrr=0.1", "schedule.lrr"),
        ("schedule.batch_size=abc", "schedule.batch_size"),
        ("augmentation.aug_prob=often", "augmentation.aug_prob"),
        ("backbone.norm_eval=maybe", "backbone.norm_eval"),
        ("detector.neck.out_channels=1.5", "detector.neck.out_channels"),
        ("detector.rpn.anchor_strides=[4,x]", "detector.rpn.anchor_strides"),
        ("hardware.gpus=2", "hardware.gpus"),
    ],
)
def test_schema_rejects_at_composition(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    text = f"{info.value} {info.value.__cause__}"
    assert key in text, text


def test_schema_rejects_unknown_key_in_a_yaml(tmp_path: Path) -> None:
    (tmp_path / "schedule").mkdir()
    (tmp_path / "schedule" / "typo.yaml").write_text(
        "defaults:\n  - /schedule_schema@_here_\n  - _self_\nname: typo\nbatch_sise: 4\n")
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([f"hydra.searchpath=[file://{tmp_path}]", "schedule=typo"])
    assert "batch_sise" in f"{info.value} {info.value.__cause__}"


def test_project_root_resolver() -> None:
    root = OmegaConf.create({"root": "${project_root:}"}).root
    assert root == str(PROJECT_ROOT)
    assert (Path(root) / "instaboost" / "config" / "__init__.py").is_file()


def test_unique_token_is_stable_in_a_process() -> None:
    token = unique_token()
    assert token == unique_token()
    assert token.startswith(f"{os.getpid()}-")
    assert OmegaConf.create({"t": "${unique_token:}"}).t == token


_PRINT_DIRS = """
from hydra import compose, initialize_config_dir
from instaboost.config import CONFIG_DIR
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose(config_name="config", return_hydra_config=True)
    print(cfg.hydra.sweep.dir)
    print(cfg.hydra.run.dir)
"""


def test_two_sweeps_started_together_get_different_folders() -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _PRINT_DIRS], cwd=PROJECT_ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    sweep_dirs = [out.split()[0] for out, _ in outputs]
    assert sweep_dirs[0] != sweep_dirs[1]
    tokens = [TOKEN_PATTERN.search(d).groups() for d in sweep_dirs]
    # Even with identical timestamps the pid + random suffix keeps the folders apart.
    assert tokens[0] != tokens[1]
    assert {int(pid) for pid, _ in tokens} == {p.pid for p in procs}
    for out, _ in outputs:
        sweep_dir, run_dir = out.split()
        assert TOKEN_PATTERN.search(sweep_dir).group(0) == TOKEN_PATTERN.search(run_dir).group(0)

