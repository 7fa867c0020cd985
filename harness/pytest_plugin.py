"""pytest plugin: `pytest specs/gemma3-270m.yaml` runs the experiment, one test per criterion.

Registered through the `pytest11` entry point. A spec with a `matrix:` gives one node per
point (`spec.yaml::name[temperature=0.7]::criterion`) and one for its sweep criteria. A YAML file is collected when it is a spec
(it has `conditions` or `extends`) or does not parse at all, and pytest was pointed at it or
at its folder; a spec that does not load is a collection error with the one line `harness
validate` prints, and never stops its siblings from being collected. The experiment runs
once, when the first of its criteria is checked, through the one `harness.session.Session`
of the pytest run (each point collected once). The plugin loads in every pytest process, so
it imports the engine inside its functions: a suite with no spec in it never pays for it.
"""

from __future__ import annotations

import time
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
    """A spec file: its criteria are the tests; with a matrix, one node per point (its criteria
    below it, ids `file::name[key=value]::criterion`) and a `sweep` node for the sweep criteria.
    Every run goes through the pytest session's one `harness.session.Session`, which collects
    each spec's points once."""

    outcome = None

    def collect(self):
        from harness.sweep import expand

        try:
            self.sweep = expand(self._as_typed(), self.config.stash[_OVERRIDES])
        except HarnessError as exc:
            raise self.CollectError(f"error: {exc}") from None
        if not self.sweep.is_matrix:
            for name in self.sweep.points[0].spec.criteria:
                yield CriterionItem.from_parent(self, name=name)
            return
        self.points = [PointNode.from_parent(self, name=point.id, index=index) for index, point in enumerate(self.sweep.points)]
        yield from self.points
        if self.sweep.criteria:
            yield SweepNode.from_parent(self, name="sweep")

    def _as_typed(self) -> Path:
        """The path as `harness validate` names it when given this folder: relative to the working dir."""
        try:
            return self.path.relative_to(Path.cwd())
        except ValueError:
            return self.path

    def run_once(self):
        """The spec's run (a spec without a matrix), run when its first criterion is checked."""
        return _once(self, lambda: _session(self.config).execute(self.sweep, 0))


class PointNode(pytest.Collector):
    """One point of a matrix spec: its run, and its criteria as items."""

    outcome = None

    def __init__(self, *, index: int, **kwargs):
        super().__init__(**kwargs)
        self.index = index
        self.point = self.parent.sweep.points[index]

    def collect(self):
        for name in self.point.spec.criteria:
            yield CriterionItem.from_parent(self, name=name)

    def run_once(self):
        """The point's run; the session collects (and compares) every point of the spec first."""
        return _once(self, lambda: _session(self.config).execute(self.parent.sweep, self.index))


class SweepNode(pytest.Collector):
    """The sweep criteria of a matrix spec: every point runs (once), then the sweep folder is written."""

    outcome = None

    def collect(self):
        for name in self.parent.sweep.criteria:
            yield CriterionItem.from_parent(self, name=name)

    def run_once(self):
        def finish():
            spec_file = self.parent
            outcomes = [(node.point, node.run_once()) for node in spec_file.points]
            return _session(self.config).finish(spec_file.sweep, outcomes, time.perf_counter())

        return _once(self, finish)


def _session(config: pytest.Config):
    """The pytest session's harness session, made when the first spec runs."""
    if _SESSION not in config.stash:
        from harness.session import Session
        from harness.writing import check_writable_folder

        runs_dir = Path(config.getoption("harness_runs_dir"))
        check_writable_folder(runs_dir, "--harness-runs-dir")
        config.stash[_SESSION] = Session(runs_dir)
    return config.stash[_SESSION]


def _once(node, run):
    """`node.outcome`: the run's outcome, or the error it ended in (raised as SpecError on every item)."""
    if node.outcome is None:
        try:
            node.outcome = run()
        except HarnessError as exc:
            node.outcome = exc
    if isinstance(node.outcome, Exception):
        raise SpecError(str(node.outcome))
    return node.outcome


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


_KEYWORD = pytest.StashKey[str]()
_OVERRIDES = pytest.StashKey[list]()
"""`--harness-set` and `--harness-limit`, parsed as `harness run` parses `--set` and `--limit`."""
_SESSION = pytest.StashKey[object]()


def pytest_configure(config: pytest.Config) -> None:
    from harness.overrides import command_line

    try:
        config.stash[_OVERRIDES] = command_line(config.getoption("harness_set"), config.getoption("harness_limit"))
    except HarnessError as exc:
        raise pytest.UsageError(f"error: {exc}") from None
    if (getattr(config.option, "lf", False) or getattr(config.option, "failedfirst", False)) and not _cached_ids_round_trip():
        config.issue_config_time_warning(pytest.PytestConfigWarning(
            f"pytest {pytest.__version__} re-reads a cached test id's first `[` as the start of its parameters, so "
            "--lf/--ff cannot find a failed criterion of a matrix point (`spec.yaml::name[key=value]::criterion`) "
            "and may select other tests (pytest-dev/pytest#15045): use a pytest below 9.2"), stacklevel=2)
    # pytest's -k grammar has no `=`, which a matrix point's id has (`temperature=0.7`): such an
    # expression is matched here instead, with the same words (substrings, and/or/not) on node ids
    if "=" in (config.option.keyword or ""):
        config.stash[_KEYWORD] = config.option.keyword
        config.option.keyword = ""


def _cached_ids_round_trip() -> bool:
    """Whether this pytest reads a matrix point's criterion id back from its cache as it wrote it."""
    try:
        from _pytest.nodeid import NodeId  # pytest 9.2 on; before it, cached ids were plain strings
    except ImportError:
        return True
    return NodeId.parse("s.yaml::s[k=v]::c") == NodeId(path="s.yaml", names=("s[k=v]", "c"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expression = config.stash.get(_KEYWORD, None)
    if expression:
        from harness.select import keyword_matches

        selected = [item for item in items if keyword_matches(item.nodeid, expression)]
        config.hook.pytest_deselected(items=[item for item in items if item not in selected])
        items[:] = selected


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "harness spec tests")
    group.addoption("--harness-runs-dir", dest="harness_runs_dir", default="runs", metavar="D",
                    help="run folders for spec tests (harness run's --runs-dir)")
    group.addoption("--harness-set", dest="harness_set", action="append", default=[], metavar="KEY=VALUE",
                    help="set a spec key for every spec test, e.g. dataset.n_samples=8 (harness run's --set; repeatable)")
    group.addoption("--harness-limit", dest="harness_limit", type=int, default=None, metavar="N",
                    help="run only the first N samples of every spec test (harness run's --limit)")
