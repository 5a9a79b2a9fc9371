"""Shared test helpers."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def shared_data_dir(name: str) -> Path:
    """Path of ../shared/data/<name>, or skip the test when this clone has no shared data."""
    path = SHARED_DATA / name
    if not (path / "annotations.json").is_file():
        pytest.skip(f"real test data {path} is absent (a user's clone has no ../shared/data)")
    return path
