"""Shared test helpers."""
import contextlib
import traceback
from collections import defaultdict
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


@contextlib.contextmanager
def traceable_call_stack():
    """Lets ``ms.jit(capture_mode="trace")`` run under pytest. MindSpore 2.10 records the file
    and line of every calling frame for each traced operator and fails on a frame without
    source (pytest started with ``python -m`` has "<frozen runpy>"); this gives it the frames
    that have a file."""
    from mindspore.graph import jit_trace

    def caller_lines():
        frames = [frame for frame, _ in traceback.walk_stack(None)
                  if not frame.f_code.co_filename.startswith("<")]
        return [f.f_code.co_filename for f in frames], [f.f_lineno for f in frames]

    original = jit_trace._get_caller_lines
    jit_trace._get_caller_lines = caller_lines
    try:
        yield
    finally:
        jit_trace._get_caller_lines = original


class RecordingTracker:
    """Stands in for instaboost.tracking.Tracker: records metrics (by name: the steps and the
    values logged) and artifacts ((file name, artifact folder)); images are dropped."""

    def __init__(self):
        self.steps = defaultdict(list)
        self.values = defaultdict(list)
        self.artifacts = []

    def log_metrics(self, metrics, step):
        for key, value in metrics.items():
            self.steps[key].append(step)
            self.values[key].append(value)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((Path(path).name, artifact_path))

    def log_image(self, image, artifact_file):
        pass
