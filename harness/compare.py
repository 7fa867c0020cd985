"""`harness compare RUN_A RUN_B ...`: the key statistics of runs (or a sweep's points) side by side."""

from __future__ import annotations

from pathlib import Path

from harness.errors import InputError
from harness.numbers import format_number
from harness.rundir import is_run_dir, read_criteria, read_stats
from harness.statnames import KEY_STATISTICS


def _load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: not a finished run folder (no stats.json / criteria.json)")
    return read_stats(run_dir), read_criteria(run_dir)


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders named: a sweep folder stands for its points' runs."""
    from harness.sweep_report import is_sweep_dir, point_runs

    return [run for path in paths for run in (point_runs(path) if is_sweep_dir(path) else [path])]


def compare_runs(paths: list[Path]) -> str:
    """Markdown: one row per key statistic present in any run (a column per run, and B − A for
    two), then the criteria outcomes."""
    runs = run_folders(paths)
    if len(runs) < 2:
        raise InputError(f"{paths[0]}: compare needs two runs or a sweep folder with two points or more")
    loaded = [_load_run(run) for run in runs]
    names = [n for n in dict.fromkeys(name for stats, _ in loaded for name in stats) if KEY_STATISTICS.match(n)]
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
    lines += ["", "| criterion |" + "".join(f" {letter} |" for letter in letters), "|---|" + "---|" * len(runs)]
    outcomes = [{c["name"]: c["passed"] for c in criteria} for _, criteria in loaded]
    word = {True: "PASSED", False: "FAILED", None: "—"}
    for name in dict.fromkeys(name for outcome in outcomes for name in outcome):
        lines.append(f"| {name} | " + " | ".join(word[outcome.get(name)] for outcome in outcomes) + " |")
    return "\n".join(lines)
