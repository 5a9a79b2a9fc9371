"""Config support: OmegaConf resolvers and the typed schemas of ``conf/``.

Importing this package (``run.py`` and the tests do it before Hydra composes) registers:

``${project_root:}``  absolute path of the repository root (the folder holding ``instaboost/``
                      and ``conf/``), so default output folders never depend on the cwd.
``${unique_token:}``  ``<pid>-<random hex>``, drawn once per process and cached, so two sweeps
                      started in the same second (even the same microsecond) get different
                      folders, while every job of one sweep sees the same value.
"""
from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

from instaboost.config.schema import register_schemas

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "conf"
# 4 random bytes = 8 hex characters; with the pid a collision needs the same pid and draw.
_TOKEN_BYTES = 4
# The dataset option that is generated on first use (its files need not exist before the run).
GENERATED_DATASET = "demo"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def requested_tracking_uri(setting) -> str | None:
    """The store a run was asked for: ``tracking.uri``, else env MLFLOW_TRACKING_URI; None when
    neither is set (the tracker then uses its default SQLite store)."""
    uri = setting or os.environ.get(TRACKING_URI_ENV)
    return str(uri) if uri else None


def project_root() -> str:
    """Absolute repository root as a string (resolver ``project_root``)."""
    return str(PROJECT_ROOT)


@lru_cache(maxsize=1)
def unique_token() -> str:
    """Per-process token ``<pid>-<hex>`` (resolver ``unique_token``)."""
    return f"{os.getpid()}-{secrets.token_hex(_TOKEN_BYTES)}"


def register_resolvers() -> None:
    """Register the project's resolvers (idempotent)."""
    OmegaConf.register_new_resolver("project_root", project_root, replace=True)
    # use_cache also keeps the value inside a config, so a launcher that ships the config to
    # another process (new pid) still resolves the sweep folder the parent resolved.
    OmegaConf.register_new_resolver("unique_token", unique_token, replace=True, use_cache=True)


register_resolvers()
register_schemas()

__all__ = ["CONFIG_DIR", "GENERATED_DATASET", "PROJECT_ROOT", "TRACKING_URI_ENV", "project_root",
           "register_resolvers", "requested_tracking_uri", "unique_token"]
