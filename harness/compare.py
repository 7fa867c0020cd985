"""`harness compare RUN_A RUN_B`: the key statistics of two runs side by side."""

from __future__ import annotations

import math
import re
from pathlib import Path

from harness.artifacts import read_json
from harness.errors import InputError

KEY_STATISTICS = re.compile(
    r"^(ce_loss(_response)?\.[A-Za-z0-9_]+\.mean"
    r"|[A-Za-z0-9_]+\.overall\.(d|p|mean_diff)"
    r"|correlation\.[A-Za-z0-9_]+\.r"
    r"|mixedlm\.(x_coef|x_p))$"
)
"""Unprefixed names: the primary comparison's effects, CE per condition, correlations."""


def _load_run(run_dir: Path) -> tuple[dict, list[dict]]:
    if not (run_dir / "stats.json").is_file():
        raise InputError(f"{run_dir}: not a finished run folder (no stats.json)")
    return read_json(run_dir / "stats.json"), read_json(run_dir / "criteria.json")


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4g}"


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
        lines.append(f"| {name} | {_cell(a)} | {_cell(b)} | {_cell(delta)} |")
    lines += ["", "| criterion | A | B |", "|---|---|---|"]
    outcome_a = {c["name"]: c["passed"] for c in criteria_a}
    outcome_b = {c["name"]: c["passed"] for c in criteria_b}
    word = {True: "PASSED", False: "FAILED", None: "—"}
    for name in dict.fromkeys([*outcome_a, *outcome_b]):
        lines.append(f"| {name} | {word[outcome_a.get(name)]} | {word[outcome_b.get(name)]} |")
    return "\n".join(lines)
