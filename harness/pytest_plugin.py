"""pytest plugin: `pytest specs/gemma3-270m.yaml` runs the experiment, one test per criterion.

Registered through the `pytest11` entry point. A YAML file is collected when it is a spec
(it has `conditions` or `extends`) and pytest was pointed at it or at its folder; the
experiment runs once, when the first of its criteria is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from harness.errors import HarnessError


def pytest_collect_file(parent: pytest.Collector, file_path: Path):
    if file_path.suffix not in (".yaml", ".yml") or file_path.name.startswith("_"):
        return None
    try:
        content = yaml.safe_load(file_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        content = None
    if isinstance(content, dict) and ("conditions" in content or "extends" in content):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecError(Exception):
    """A spec that cannot run: reported as one line."""


class SpecFile(pytest.File):
    """A spec file: its criteria are the tests."""

    outcome = None

    def collect(self):
        from harness.spec import load_spec

        try:
            spec = load_spec(self.path)
        except HarnessError as exc:
            raise self.CollectError(str(exc)) from None
        for name in spec.criteria:
            yield CriterionItem.from_parent(self, name=name)

    def run_once(self):
        if self.outcome is None:
            from harness.runner import run_spec

            try:
                self.outcome = run_spec(self.path, Path(self.config.getoption("harness_runs_dir")))
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
