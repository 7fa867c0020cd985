"""`harness compare RUN_A RUN_B`: the key statistics of two runs side by side."""

from __future__ import annotations

import re
from pathlib import Path

from harness.errors import InputError
from harness.numbers import format_number
from harness.rundir import is_run_dir, read_criteria, read_stats

KEY_STATISTICS = re.compile(
    r"^(ce_loss(_response)?\.[A-Za-z0-9_]+\.mean"
    r"|[A-Za-z0-9_]+\.overall\.(d|p|mean_diff)"
    r"|correlation\.[A-Za-z0-9_]+\.r"
    r"|mixedlm\.(x_coef|x_p))$"
)
"""Unprefixed names: the primary comparison's effects, CE per condition, correlations."""


def _load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    if not is_run_dir(run_dir):
        raise InputError(f"{run_dir}: not a finished run folder (no stats.json / criteria.json)")
    return read_stats(run_dir), read_criteria(run_dir)


def compare_runs(run_a: Path, run_b: Path) -> str:
    """Markdown: one row per key statistic present in either run, then the criteria outcomes."""
    stats_a, criteria_a = _load_run(run_a)
    stats_b, criteria_b = _load_run(run_b)
    names = [n for n in dict.fromkeys([*stats_a, *stats_b]) if KEY_STATISTICS.match(n)]
    lines = [
        f"| statistic | A: {run_a} | B: {run_b} | B − A |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        a, b = stats_a.get(name), stats_b.get(name)
        delta = b - a if a is not None and b is not None else None
        lines.append(f"| {name} | {format_number(a)} | {format_number(b)} | {format_number(delta)} |")
    lines += ["", "| criterion | A | B |", "|---|---|---|"]
    outcome_a = {c["name"]: c["passed"] for c in criteria_a}
    outcome_b = {c["name"]: c["passed"] for c in criteria_b}
    word = {True: "PASSED", False: "FAILED", None: "—"}
    for name in dict.fromkeys([*outcome_a, *outcome_b]):
        lines.append(f"| {name} | {word[outcome_a.get(name)]} | {word[outcome_b.get(name)]} |")
    return "\n".join(lines)
