"""The package's layering rules, checked on the source: the model never sees Hydra or MLflow."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "instaboost"


def _imported_roots(path: Path) -> set:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_model_code_never_imports_hydra_omegaconf_or_mlflow():
    offenders = {}
    for folder in ("models", "structures"):
        for path in (PACKAGE / folder).rglob("*.py"):
            bad = _imported_roots(path) & {"hydra", "omegaconf", "mlflow"}
            if bad:
                offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not offenders, offenders


def test_only_the_tracking_module_talks_to_mlflow():
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "mlflow" in _imported_roots(p))
    assert users == ["tracking.py"], users
