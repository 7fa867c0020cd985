"""pytest plugin: `pytest specs/gemma3-270m.yaml` runs the experiment, one test per criterion.

Registered through the `pytest11` entry point. A YAML file is collected when it is a spec
(it has `conditions` or `extends`) or does not parse at all, and pytest was pointed at it or
at its folder; a spec that does not load is a collection error with the one line `harness
validate` prints, and never stops its siblings from being collected. The experiment runs
once, when the first of its criteria is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.errors import HarnessError


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    if file_path.suffix not in (".yaml", ".yml") or file_path.name.startswith("_"):
        return None
    if _may_be_spec(file_path):
        return SpecFile.from_parent(parent, path=file_path)
    return None


def _may_be_spec(path: Path) -> bool:
    """A mapping with `conditions` or `extends`, or a file that does not parse (only loading
    it as a spec says what is wrong, and CI must not go green without it)."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, RecursionError, OSError):  # ValueError: undecodable bytes, `!!int x`
        return True
    return isinstance(content, dict) and ("conditions" in content or "extends" in content)


class SpecError(Exception):
    """A spec that cannot run: reported as one line."""


class SpecFile(pytest.File):
    """A spec file: its criteria are the tests."""

    outcome = None

    def collect(self):
        from harness.spec import load_spec

        try:
            spec = load_spec(self._as_typed())
        except HarnessError as exc:
            raise self.CollectError(f"error: {exc}") from None
        for name in spec.criteria:
            yield CriterionItem.from_parent(self, name=name)

    def _as_typed(self) -> Path:
        """The path as `harness validate` names it when given this folder: relative to the working dir."""
        try:
            return self.path.relative_to(Path.cwd())
        except ValueError:
            return self.path

    def run_once(self):
        if self.outcome is None:
            from harness.runner import run_spec
            from harness.writing import check_writable_folder

            runs_dir = Path(self.config.getoption("harness_runs_dir"))
            try:
                check_writable_folder(runs_dir, "--harness-runs-dir")
                self.outcome = run_spec(self.path, runs_dir)
            except HarnessError as exc:
                self.outcome = exc
        if isinstance(self.outcome, Exception):
            raise SpecError(str(self.outcome))
        return self.outcome


class CriterionFailed(Exception):
    """A criterion whose statistics did not meet the stated hypothesis."""


class CriterionItem(pytest.Item):
    def runtest(self) -> None:
        from harness.stages.criteria import format_result

        outcome = self.parent.run_once()
        result = next(r for r in outcome.results if r.name == self.name)
        self.user_properties.append(("run_dir", str(outcome.run_dir)))
        if not result.passed:
            raise CriterionFailed(format_result(result))

    def repr_failure(self, excinfo, style=None):
        if excinfo.errisinstance((CriterionFailed, SpecError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, self.name


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--harness-runs-dir", dest="harness_runs_dir", default="runs", help="run folders for spec tests")
