"""Data transforms: InstaBoost engines + step, geometric transforms.

Engine registry: `build_instaboost_engine(name, params)` builds an engine from the
augmentation section (the seed's parameter names). Engines are imported lazily, so the
reference library is only imported when it is used:

    "instaboostfast"  reference_engine.InstaBoostFastEngine (PyPI instaboostfast 0.1.2, fixed)
    "project"         project_engine.ProjectInstaBoostEngine (this project's fast engine)
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from instaboost.data.stats import DataStats
from instaboost.data.transforms.instaboost_aug import InstaBoostAug

# The engine keyword arguments, under the seed's names. Other keys of the augmentation
# section (name, engine, aug_prob) belong to the registry and the step.
ENGINE_PARAM_NAMES = ("action_candidate", "action_prob", "scale", "dx", "dy", "theta",
                      "color_prob", "heatmap_flag")
ENGINES: dict[str, tuple[str, str]] = {
    "instaboostfast": ("instaboost.data.transforms.reference_engine", "InstaBoostFastEngine"),
    "project": ("instaboost.data.transforms.project_engine", "ProjectInstaBoostEngine"),
}


def _plain(value: Any) -> Any:
    """Lists/tuples (also OmegaConf ListConfig) -> list; scalars unchanged."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return value
    return [_plain(v) for v in value]


def engine_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The engine keyword arguments picked out of an augmentation section (dict or DictConfig)."""
    missing = [name for name in ENGINE_PARAM_NAMES if name not in params]
    if missing:
        raise KeyError(f"augmentation parameters miss {missing}; an engine needs {list(ENGINE_PARAM_NAMES)}")
    return {name: _plain(params[name]) for name in ENGINE_PARAM_NAMES}


def build_instaboost_engine(name: str, params: Mapping[str, Any]):
    """Engine `name` ("instaboostfast" | "project") built from the seed-named `params`."""
    if name not in ENGINES:
        raise ValueError(f"unknown InstaBoost engine {name!r}; known: {sorted(ENGINES)}")
    module_name, class_name = ENGINES[name]
    module = importlib.import_module(module_name)
    engine_cls = getattr(module, class_name, None)
    if engine_cls is None:
        raise ImportError(f"{module_name} defines no {class_name} (InstaBoost engine {name!r})")
    return engine_cls(**engine_params(params))


def build_instaboost_step(params: Mapping[str, Any], *, stats: DataStats | None = None
                          ) -> InstaBoostAug | None:
    """The InstaBoost pipeline step of an augmentation section, or None when aug_prob == 0
    (no engine is built then, so the baseline never imports the reference library)."""
    aug_prob = float(params["aug_prob"])
    if aug_prob == 0.0:
        return None
    engine = build_instaboost_engine(str(params["engine"]), params)
    return InstaBoostAug(engine, aug_prob, stats=stats)


__all__ = ["ENGINES", "ENGINE_PARAM_NAMES", "InstaBoostAug", "build_instaboost_engine",
           "build_instaboost_step", "engine_params"]
