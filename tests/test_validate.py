"""Semantic checks: each bad value is reported with its dotted key first."""
from __future__ import annotations

import pytest
from omegaconf import DictConfig

from instaboost.config.validate import ConfigError, check_input_paths, validate
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def base_cfg() -> DictConfig:
    return compose_config()


def _errors(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    return info.value.errors


def test_defaults_are_valid(base_cfg: DictConfig) -> None:
    validate(base_cfg)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["augmentation.aug_prob=1.5"], "augmentation.aug_prob"),
        (["augmentation.color_prob=-0.1"], "augmentation.color_prob"),
        (["augmentation.action_prob=[0.5,0.2,0.2]"], "augmentation.action_prob"),
        (["augmentation.action_prob=[0.5,0.5]"], "augmentation.action_prob"),
        (["augmentation.action_prob=[1.5,-0.5,0.0]"], "augmentation.action_prob"),
        (["augmentation.action_candidate=[normal,diagonal,skip]"],
         "augmentation.action_candidate"),
        (["augmentation.action_candidate=[normal,normal,skip]"], "augmentation.action_candidate"),
        (["augmentation.dx=0"], "augmentation.dx"),
        (["augmentation.dy=-1"], "augmentation.dy"),
        (["augmentation.scale=[1.2,0.8]"], "augmentation.scale"),
        (["augmentation.scale=[0.8]"], "augmentation.scale"),
        (["augmentation.theta=[5,-5]"], "augmentation.theta"),
        (["augmentation.engine=fast"], "augmentation.engine"),
        (["augmentation.engine=instaboostfast", "augmentation.theta=[-0.5,0.5]"],
         "augmentation.theta"),
        (["schedule.keep_checkpoint_max=0"], "schedule.keep_checkpoint_max"),
        (["schedule.img_height=100"], "schedule.img_height"),
        (["schedule.img_width=130"], "schedule.img_width"),
        (["schedule.batch_size=0"], "schedule.batch_size"),
        (["schedule.epochs=0"], "schedule.epochs"),
        (["schedule.max_steps=0"], "schedule.max_steps"),
        (["schedule.lr_steps=[3,2]"], "schedule.lr_steps"),
        (["schedule=1x", "schedule.epochs=6"], "schedule.lr_steps"),   # [8, 11] never reached
        (["schedule.lr_steps=[4]"], "schedule.lr_steps"),                # demo: 4 epochs, 0..3
        (["schedule.base_lr=0"], "schedule.base_lr"),
        (["schedule.momentum=1.0"], "schedule.momentum"),
        (["schedule.loss_scale_type=auto"], "schedule.loss_scale_type"),
        (["hardware.device_target=TPU"], "hardware.device_target"),
        (["hardware.conv_impl=fft"], "hardware.conv_impl"),
        (["hardware=gpu", "hardware.conv_impl=winograd"], "hardware.device_target"),
        (["hardware.matmul_precision=float16"], "hardware.matmul_precision"),
        (["hardware.conv_impl=unfold", "hardware.matmul_precision=bfloat16"],
         "hardware.conv_impl"),
        (["hardware.device_num=0"], "hardware.device_num"),
        (["hardware.device_num=2"], "hardware.device_num"),
        (["backbone.norm=gn"], "backbone.norm"),
        (["detector.name=cascade_mask_rcnn"], "detector.name"),
        (["detector.train_cfg.rpn.sampler.add_gt_as_proposals=true"],
         "detector.train_cfg.rpn.sampler.add_gt_as_proposals"),
        (["backbone.norm_eval=true"], "backbone.norm_eval"),
        (["backbone.norm=frozen_bn"], "backbone.norm"),
        (["backbone.frozen_stages=1"], "backbone.frozen_stages"),
        (["detector.neck.num_outs=3", "detector.rpn.anchor_strides=[4,8,16]",
          "detector.roi.featmap_strides=[4,8,16]"], "detector.neck.num_outs"),
        (["backbone.depth=34"], "backbone.depth"),
        (["backbone.groups=32"], "backbone.type"),
        (["backbone.frozen_stages=7"], "backbone.frozen_stages"),
        (["detector.rpn.anchor_strides=[4,8,16,32]"], "detector.rpn.anchor_strides"),
        (["detector.train_cfg.rpn.sampler.pos_fraction=1.5"],
         "detector.train_cfg.rpn.sampler.pos_fraction"),
        (["detector.train_cfg.rcnn.assigner.pos_iou_thr=0.2"],
         "detector.train_cfg.rcnn.assigner.pos_iou_thr"),
        (["detector.bbox_head.target_stds=[0.1,0.1,0.2]"], "detector.bbox_head.target_stds"),
        (["detector.test_cfg.rcnn.score_thr=2"], "detector.test_cfg.rcnn.score_thr"),
        (["detector.num_gts=0"], "detector.num_gts"),
        (["detector.roi.sampling_ratio=0"], "detector.roi.sampling_ratio"),
        (["detector.mask_head.mask_size=32"], "detector.mask_head.mask_size"),
        # '+' appends a key even to a typed group: misspelt, it would change nothing
        (["+schedule.epoch=3"], "schedule.epoch"),
        (["+augmentation.aug_porb=0.5"], "augmentation.aug_porb"),
        (["+detector.rpn.nms_thr=0.5"], "detector.rpn.nms_thr"),
        (["+seeds=3"], "seeds"),
        (["dataset.flip_ratio=2"], "dataset.flip_ratio"),
        (["dataset.img_std=[1.0,0.0,1.0]"], "dataset.img_std"),
        (["dataset.max_images=0"], "dataset.max_images"),
        (["dataset.num_train=0"], "dataset.num_train"),
        (["seed=-1"], "seed"),
        (["tracking.experiment_name=''"], "tracking.experiment_name"),
        (["dataset=coco_folder"], "dataset.train_root"),
        (["dataset=coco2017"], "dataset.root"),
        (["experiment=mask_rcnn_r50_instaboost_4x"], "dataset.root"),
        (["experiment=mask_rcnn_r50_instaboost_4x", "dataset.root=/data/coco"],
         "backbone.norm_eval"),   # the seed's recipe keeps a pretrained backbone's statistics
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_value_names_its_key(overrides: list[str], key: str) -> None:
    errors = _errors(overrides)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{key}: "), errors


def test_action_prob_sum_tolerates_rounding() -> None:
    # 0.7 + 0.2 + 0.1 != 1.0 exactly in binary floating point.
    assert 0.7 + 0.2 + 0.1 != 1.0
    validate(compose_config(["augmentation.action_prob=[0.7,0.2,0.1]"]))
    validate(compose_config(["augmentation.action_candidate=[normal,vertical]",
                             "augmentation.action_prob=[0.9999999,0.0000001]"]))


def test_every_problem_is_reported_first_key_first() -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["augmentation.aug_prob=2", "schedule.batch_size=-1",
                                 "hardware.conv_impl=fft"]))
    keys = [error.split(":")[0] for error in info.value.errors]
    assert keys == ["augmentation.aug_prob", "schedule.batch_size", "hardware.conv_impl"]
    assert str(info.value).startswith("augmentation.aug_prob: ")
    assert isinstance(info.value, ValueError)


def test_mandatory_value_message_says_how_to_pass_it() -> None:
    errors = _errors(["dataset=coco2017"])
    assert errors == ["dataset.root: mandatory value is missing; pass it as dataset.root=<value>"]


def test_validate_does_not_modify_the_config(base_cfg: DictConfig) -> None:
    before = str(base_cfg)
    validate(base_cfg)
    assert str(base_cfg) == before


@pytest.mark.parametrize("uri", ["mlruns", "./outputs/mlruns", "/abs/mlruns", "file:///abs/mlruns"])
def test_file_store_uri_is_refused_unless_mlflow_allows_it(uri, monkeypatch) -> None:
    """MLflow 3 raises on its file store at the first run, after MindSpore has loaded."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    errors = _errors([f"tracking.uri='{uri}'"])
    assert len(errors) == 1 and errors[0].startswith("tracking.uri: ") and "sqlite:" in errors[0]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    validate(compose_config([f"tracking.uri='{uri}'"]))


def test_file_store_from_the_environment_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    errors = _errors([])
    assert len(errors) == 1 and errors[0].startswith("tracking.uri: null takes MLFLOW_TRACKING_URI")
    for uri in ("sqlite:////tmp/m.db", "http://tracking.example:5000", "databricks"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        validate(compose_config([]))


def test_missing_input_files_are_named_with_their_keys(tmp_path) -> None:
    root = tmp_path / "set"
    cfg = compose_config(["dataset=coco_folder", f"dataset.train_root={root}",
                          f"backbone.pretrained={tmp_path / 'r50.ckpt'}"])
    with pytest.raises(ConfigError) as info:
        check_input_paths(cfg)
    assert info.value.errors == [
        f"dataset.train_images: folder {root / 'images'} does not exist",
        f"dataset.val_images: folder {root / 'images'} does not exist",
        f"dataset.train_annotations: file {root / 'annotations.json'} does not exist",
        f"dataset.val_annotations: file {root / 'annotations.json'} does not exist",
        f"backbone.pretrained: file {tmp_path / 'r50.ckpt'} does not exist"]
    (root / "images").mkdir(parents=True)
    (root / "annotations.json").write_text("{}")
    (tmp_path / "r50.ckpt").write_bytes(b"")
    check_input_paths(cfg)


def test_the_demo_dataset_need_not_exist_yet(tmp_path) -> None:
    """It is generated on first use."""
    check_input_paths(compose_config([f"paths.output_root={tmp_path}"]))

