"""The session: the one driver of `harness run`, the pytest plugin and `harness.run`.

A spec without a matrix is a one-point sweep. A session *collects* every point of a sweep
once (`harness.runner.collect`: every check that can fail on the user's input, before anything
runs), refuses points that would compute the same, then *executes* the points it is asked
for and writes the sweep folder of a matrix. `harness run` executes every point in order; the
pytest plugin executes a point when the first of its criteria is checked.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from harness import runner
from harness.errors import ExitCode, InputError
from harness.overrides import Override
from harness.runlog import logged_warnings
from harness.stages.criteria import CriterionResult
from harness.stages.stats import StatsStage
from harness.sweep import Point, Sweep, expand


def to_stderr(line: str) -> None:
    """The default log: progress and stage lines on stderr."""
    print(line, file=sys.stderr)


@dataclass
class Outcome:
    """What a spec's run gave: each point's run, and for a matrix the sweep folder and criteria."""

    points: list[tuple[Point, runner.RunOutcome]]
    """Each point and its run (one point without a matrix)."""
    sweep_dir: Path | None
    """A matrix's sweep folder; None without a matrix and on ranks other than 0, which write nothing."""
    sweep_results: list[CriterionResult]
    """The sweep criteria's verdicts (none without a matrix)."""
    seconds: float
    is_matrix: bool = False

    @property
    def run_dir(self) -> Path | None:
        """Where the outputs are: the run folder, or a matrix's sweep folder."""
        return self.sweep_dir if self.is_matrix else self.points[0][1].run_dir

    @property
    def results(self) -> list[CriterionResult]:
        """The run's criteria, or a matrix's sweep criteria."""
        return self.sweep_results if self.is_matrix else self.points[0][1].results

    @property
    def all_results(self) -> list[CriterionResult]:
        """Every point's criteria, then the sweep criteria."""
        return [result for _, outcome in self.points for result in outcome.results] + self.sweep_results

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.PASSED if all(result.passed for result in self.all_results) else ExitCode.FAILED


@dataclass
class Session:
    """One invocation's settings; `collect` a sweep once, then `execute` its points and `finish` it."""

    runs_dir: Path = Path("runs")
    use_cache: bool = True
    log: Callable[[str], None] = to_stderr
    tag: str | None = None
    plans: dict[Path, list[runner.Plan | None]] = field(default_factory=dict)
    """Each collected sweep's point plans, by spec path: a point is collected once, and its plan
    (with the models it loaded) let go once it executed."""

    def collect(self, sweep: Sweep) -> list[runner.Plan]:
        """Every point's plan (all checks first); InputError when two points would compute the same."""
        if sweep.path not in self.plans:
            with logged_warnings(self.log):
                plans = [runner.collect(sweep.path, point.spec, Path(self.runs_dir), self.use_cache, self.log, point.overrides,
                                        point.id if point.values else None, point.run_label(self.tag))
                         for point in sweep.points]
                if sweep.is_matrix:
                    refuse_identical_points(sweep, plans)
            self.plans[sweep.path] = plans
        return self.plans[sweep.path]

    def execute(self, sweep: Sweep, index: int) -> runner.RunOutcome:
        """Point `index`'s run (collecting the sweep first, once); each point executes once."""
        plans = self.collect(sweep)
        plan, plans[index] = plans[index], None
        if plan is None:
            raise AssertionError(f"{sweep.points[index].id}: executed twice in one session")
        with logged_warnings(self.log):
            return runner.execute(plan, time.perf_counter())

    def finish(self, sweep: Sweep, outcomes: list[tuple[Point, runner.RunOutcome]], started: float) -> Outcome:
        """The sweep's outcome; for a matrix, the sweep folder written from the point runs."""
        if not sweep.is_matrix or outcomes[0][1].run_dir is None:  # None: a helper process under accelerate launch
            return Outcome(outcomes, None, [], time.perf_counter() - started, sweep.is_matrix)
        from harness.sweep_report import write_sweep  # pandas: only when a matrix writes its sweep folder

        sweep_dir, results = write_sweep(sweep, outcomes, Path(self.runs_dir), self.tag)
        return Outcome(outcomes, sweep_dir, results, time.perf_counter() - started, True)

    def run(self, sweep: Sweep, on_point: Callable[[Point, runner.RunOutcome], None] = lambda point, outcome: None) -> Outcome:
        """Collect every point, execute each in order (`on_point` sees each as it finishes), finish."""
        started = time.perf_counter()
        self.collect(sweep)
        outcomes = []
        try:
            for index, point in enumerate(sweep.points):
                outcomes.append((point, self.execute(sweep, index)))
                on_point(point, outcomes[-1][1])
        finally:
            del self.plans[sweep.path]  # its models go with it; a file named twice runs twice
        return self.finish(sweep, outcomes, started)


def refuse_identical_points(sweep: Sweep, plans: list[runner.Plan]) -> None:
    """InputError when two points would compute the same (every stage's key equal)."""
    keys = [stage_keys(plan) for plan in plans]
    for (i, a), (j, b) in itertools.combinations(enumerate(keys), 2):
        if a == b:
            raise InputError(
                f"{sweep.path}: matrix: points {i + 1} and {j + 1} are identical ({sweep.points[i].id} and "
                f"{sweep.points[j].id}): every stage has the same inputs; vary a key that changes what is computed"
            )


def stage_keys(plan: runner.Plan) -> dict[str, str]:
    """Every stage's cache key, computing nothing: each stage's output is stood in for by its
    placeholder, so two plans with the same keys would compute the same numbers."""
    planning = replace(plan, executor=replace(plan.executor, planning=True, keys={}, log=lambda line: None))
    samples, _, measured = runner.texts_and_measures(planning)
    planning.executor.run(StatsStage(runner.per_sample_table(planning, measured, samples), plan.spec))
    return planning.executor.keys


def run_spec(
    spec_path: Path,
    runs_dir: Path = Path("runs"),
    use_cache: bool = True,
    log: Callable[[str], None] = to_stderr,
    overrides: Sequence[Override] = (),
    tag: str | None = None,
    on_point: Callable[[Point, runner.RunOutcome], None] = lambda point, outcome: None,
) -> Outcome:
    """Run a spec file (every point of its matrix) end to end."""
    return Session(Path(runs_dir), use_cache, log, tag).run(expand(Path(spec_path), overrides), on_point)
