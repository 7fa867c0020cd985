"""`harness compare RUN_A RUN_B ...`: statistics of runs (or a sweep's points) side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.errors import InputError
from harness.numbers import format_number
from harness.rundir import is_run_dir, read_criteria, read_stats
from harness.select import pattern_matches
from harness.statnames import KEY_STATISTICS


def _load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: not a finished run folder (no stats.json / criteria.json)")
    return read_stats(run_dir), read_criteria(run_dir)


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders named: a sweep folder stands for its points' runs."""
    from harness.sweep_report import is_sweep_dir, point_runs

    return [run for path in paths for run in (point_runs(path) if is_sweep_dir(path) else [path])]


def compare_runs(paths: list[Path], patterns: Sequence[str] = ()) -> str:
    """Markdown: a row per statistic (a column per run, and B − A for two), then the criteria outcomes.

    The statistics: those `patterns` select (`harness.select.pattern_matches`), every one of them;
    without patterns, the key statistics whose values differ between the runs, with a line saying
    how many were left out as equal."""
    runs = run_folders(paths)
    if len(runs) < 2:
        raise InputError(f"{paths[0]}: compare needs two runs or a sweep folder with two points or more")
    loaded = [_load_run(run) for run in runs]
    every = list(dict.fromkeys(name for stats, _ in loaded for name in stats))
    left_out = ""
    if patterns:
        names = [name for name in every if any(pattern_matches(name, pattern) for pattern in patterns)]
        if not names:
            asked = " ".join(f"--stat {pattern!r}" for pattern in patterns)
            raise InputError(f"{asked}: matches none of the {len(every)} statistics of these runs "
                             f"(harness ls stats {runs[0]} lists them)")
    else:
        key = [name for name in every if KEY_STATISTICS.match(name)]
        names = [name for name in key if not _equal([stats.get(name) for stats, _ in loaded])]
        if len(names) < len(key):
            left_out = (f"\n{len(key) - len(names)} of {len(key)} key statistics are equal in every run and left out; "
                        "`--stat PATTERN` shows any statistic.\n")
    letters = [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(len(runs))]
    pair = len(runs) == 2
    lines = [
        "| statistic |" + "".join(f" {letter}: {run} |" for letter, run in zip(letters, runs)) + (" B − A |" if pair else ""),
        "|---|" + "---:|" * (len(runs) + pair),
    ]
    for name in names:
        values = [stats.get(name) for stats, _ in loaded]
        cells = [format_number(value) for value in values]
        if pair:
            a, b = values
            cells.append(format_number(b - a if a is not None and b is not None else None))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(left_out)
    lines += ["| criterion |" + "".join(f" {letter} |" for letter in letters), "|---|" + "---|" * len(runs)]
    outcomes = [{c["name"]: c["passed"] for c in criteria} for _, criteria in loaded]
    word = {True: "PASSED", False: "FAILED", None: "—"}
    for name in dict.fromkeys(name for outcome in outcomes for name in outcome):
        lines.append(f"| {name} | " + " | ".join(word[outcome.get(name)] for outcome in outcomes) + " |")
    return "\n".join(lines)


def _equal(values: list[float | None]) -> bool:
    """The same value in every run (NaN equal to NaN, a missing value to a missing value)."""
    return len({repr(value) for value in values}) == 1
