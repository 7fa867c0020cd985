"""What a wheel installs: every package of the source tree, and the report templates as package
data (a built wheel running the shipped specs from another folder is `.ci/run`'s wheel step)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from harness.templates import TEMPLATES_DIR

REPO = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_of_the_source_tree_is_listed():
    setuptools = pyproject()["tool"]["setuptools"]
    found = {
        ".".join(folder.relative_to(REPO).parts)
        for top in ("harness", "metrics")
        for folder in [REPO / top, *(REPO / top).rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    }
    listed = set(setuptools["packages"])
    assert found <= listed, f"missing from pyproject.toml's packages: {sorted(found - listed)}"
    folders = [REPO / setuptools["package-dir"].get(name, name.replace(".", "/")) for name in listed]
    assert all(folder.is_dir() for folder in folders), "a listed package that is not in the tree"


def test_the_shipped_templates_are_package_data():
    setuptools = pyproject()["tool"]["setuptools"]
    assert setuptools["package-dir"]["harness.report_templates"] == "reports/templates"
    patterns = setuptools["package-data"]["harness.report_templates"]
    templates = sorted(path.name for path in (REPO / "reports" / "templates").iterdir())
    assert templates and all(any(Path(name).match(pattern) for pattern in patterns) for name in templates)
    assert TEMPLATES_DIR.resolve() == (REPO / "reports" / "templates").resolve()  # this checkout's, editable
