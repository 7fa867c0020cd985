"""What a wheel installs: every package of the source tree, and the report templates as package
data (a built wheel running the shipped specs from another folder is `.ci/wheel`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from harness.templates import TEMPLATES_DIR

REPO = Path(__file__).resolve().parent.parent


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def package_folder(name: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools takes package `name` from: its longest mapped prefix, else its own path."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in package_dir:
            return REPO / package_dir[prefix] / Path(*parts[cut:])
    return REPO / Path(*parts)


def test_every_package_of_the_source_tree_is_listed():
    setuptools = setuptools_table()
    listed = {package_folder(name, setuptools.get("package-dir", {})).resolve() for name in setuptools["packages"]}
    assert all(folder.is_dir() for folder in listed), "a listed package that is not in the tree"
    sources = {
        folder.resolve()
        for top in ("harness", "metrics")
        for folder in [REPO / top, *(REPO / top).rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
    }
    missing = sorted(str(folder.relative_to(REPO)) for folder in sources - listed)
    assert missing == [], f"source folders no package in pyproject.toml installs: {missing}"


def test_the_shipped_templates_are_package_data():
    setuptools = setuptools_table()
    assert package_folder("harness.report_templates", setuptools["package-dir"]) == REPO / "reports" / "templates"
    patterns = setuptools["package-data"]["harness.report_templates"]
    templates = sorted(path.name for path in (REPO / "reports" / "templates").iterdir())
    assert templates and all(any(Path(name).match(pattern) for pattern in patterns) for name in templates)
    assert TEMPLATES_DIR.resolve() == (REPO / "reports" / "templates").resolve()  # this checkout's, editable


def test_the_wheel_claims_no_generic_top_level_name():
    """metrics/ installs as harness.metrics (a package-dir mapping), never as a top-level `metrics`."""
    setuptools = setuptools_table()
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"harness"}
    assert package_folder("harness.metrics", setuptools["package-dir"]) == REPO / "metrics"
