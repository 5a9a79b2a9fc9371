"""`import instaboost` makes idle OpenMP threads sleep (before MindSpore loads libgomp), keeps a
policy the user set, and warns when MindSpore was imported first (too late to take effect)."""
import os
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)


def test_import_sets_passive_policy_unless_the_user_chose_one():
    show = "import os, instaboost; print(os.environ['OMP_WAIT_POLICY'])"
    assert _run(show).stdout.strip() == "PASSIVE"
    assert _run(show, OMP_WAIT_POLICY="ACTIVE").stdout.strip() == "ACTIVE"


def test_importing_mindspore_first_is_reported():
    late = _run("import mindspore, instaboost")
    assert "mindspore was imported before instaboost" in late.stderr
    assert "RuntimeWarning" in late.stderr
    early = _run("import instaboost, mindspore")
    assert "mindspore was imported before instaboost" not in early.stderr
