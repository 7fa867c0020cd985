"""The stats stage on a synthetic per-sample table: seconds and peak memory (run by hand).

The table has the reference experiment's shape at scale: ``--n-samples`` samples x 2
conditions (human, model) x ``--layers`` layers x the baseline spec's 5 trajectory metrics,
plus ce_loss and ce_loss_response per text; the statistics are the baseline spec's (2000 BCa
resamples, correlation, mixed model). The stage is timed as the runner runs it: read
per_sample.csv, compute every statistic. ``--baseline FILE`` also times another version of
``harness/stages/stats.py`` (e.g. ``git show 48feee9:harness/stages/stats.py > /tmp/old.py``)
on the same table, reports the ratio, and how far its statistics are from this version's.

    python benchmarks/bench_stats.py                        # 2000 samples, 26 layers
    python benchmarks/bench_stats.py --n-samples 200 --baseline /tmp/old.py
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import statsmodels.formula.api  # noqa: F401  imported here, so that neither timed version pays the ~1 s import

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.schema import Spec  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.stages import stats as current  # noqa: E402
from harness.statnames import TEXT_METRIC_NAMES  # noqa: E402

CONDITIONS = {"human": 1.0, "model": 0.0}
"""Condition -> how much smoother-vs-rougher its trajectories are (an effect to find)."""


def synthetic_table(spec: Spec, n_samples: int, n_layers: int, seed: int) -> pd.DataFrame:
    """Long-form per-sample table: a per-sample level, a condition effect growing with depth, noise."""
    rng = np.random.default_rng(seed)
    level = rng.normal(size=(n_samples, 1))
    depth = np.arange(1, n_layers + 1) / n_layers
    frames = []
    for condition, effect in CONDITIONS.items():
        for metric in spec.metrics:
            values = 10 + level + effect * depth + rng.normal(0, 0.5, (n_samples, n_layers))
            frames.append(_long(condition, metric, values, layers=range(n_layers)))
        for metric in TEXT_METRIC_NAMES:
            values = 2 + 0.3 * level[:, 0] + 0.5 * effect + rng.normal(0, 0.3, n_samples)
            frames.append(_long(condition, metric, values[:, None], layers=[None]))
    return pd.concat(frames, ignore_index=True)


def _long(condition: str, metric: str, values: np.ndarray, layers) -> pd.DataFrame:
    n_samples, n_layers = values.shape
    return pd.DataFrame(
        {
            "sample_id": np.repeat(np.arange(n_samples), n_layers),
            "condition": condition,
            "layer": pd.array(np.tile(list(layers), n_samples), dtype="Int64"),
            "metric": metric,
            "value": values.ravel(),
        }
    )


def reset_peak_rss() -> None:
    """Make getrusage's ru_maxrss restart from the current RSS (Linux: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib(kind: str) -> float:
    """Current (``VmRSS``) or peak since the last reset (``VmHWM``) resident memory, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{kind}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {kind}")


@dataclass
class Timing:
    """One timed stats stage: wall and CPU seconds (all threads), of which reading the table."""

    statistics: dict[str, float]
    wall: float
    cpu: float
    read_wall: float
    peak_mib: float
    """Peak RSS above the RSS at the start."""

    def line(self) -> str:
        return (f"{self.wall:.2f} s wall, {self.cpu:.2f} s CPU (read {self.read_wall:.2f} s wall), "
                f"peak RSS +{self.peak_mib:.0f} MiB, {len(self.statistics)} statistics")


def timed_stage(module: ModuleType, csv: Path, spec: Spec) -> Timing:
    """The stage as the runner runs it: read per_sample.csv, compute every statistic."""
    reset_peak_rss()
    before = rss_mib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    table = module.load_table(csv)
    read = time.perf_counter() - start
    result = module.compute_stats(table, spec)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Timing(result, wall, cpu, read, rss_mib("VmHWM") - before)


def load_module(path: Path) -> ModuleType:
    module_spec = importlib.util.spec_from_file_location("baseline_stats", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up while it executes
    module_spec.loader.exec_module(module)
    return module


def differences(new: dict[str, float], old: dict[str, float]) -> tuple[list[str], float]:
    """Point statistics that differ at all, and the largest relative change of an interval bound."""
    changed, largest = [], 0.0
    for name, value in new.items():
        before = old[name]
        if name.endswith(("ci_low", "ci_high")):
            if math.isfinite(value) and math.isfinite(before):
                largest = max(largest, abs(value - before) / max(abs(before), 1e-300))
            elif not (math.isnan(value) and math.isnan(before)):
                changed.append(name)
        elif not (value == before or (math.isnan(value) and math.isnan(before))):
            changed.append(name)
    return changed, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-samples", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--spec", type=Path, default=REPO / "specs" / "baseline.yaml", help="statistics settings and metrics")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic values")
    parser.add_argument("--baseline", type=Path, help="another stats.py to time on the same table")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as folder:
        csv = Path(folder) / "per_sample.csv"
        table = synthetic_table(spec, args.n_samples, args.layers, args.seed)
        table.to_csv(csv, index=False)
        print(
            f"table: {args.n_samples} samples x {len(CONDITIONS)} conditions x {args.layers} layers x "
            f"{len(spec.metrics)} metrics + {len(TEXT_METRIC_NAMES)} text metrics = {len(table)} rows, "
            f"{csv.stat().st_size / 2**20:.1f} MiB; {spec.stats.bootstrap_resamples} resamples"
        )
        del table
        stage = timed_stage(current, csv, spec)
        print(f"stats stage: {stage.line()}")
        without_model = spec.model_copy(update={"stats": spec.stats.model_copy(update={"mixed_model": False})})
        print(f"  without the mixed model (stats.mixed_model: false): {timed_stage(current, csv, without_model).line()}")
        if args.baseline:
            old = timed_stage(load_module(args.baseline), csv, spec)
            print(f"baseline {args.baseline}: {old.line()}")
            print(f"baseline / this: {old.wall / stage.wall:.1f}x wall, {old.cpu / stage.cpu:.1f}x CPU")
            changed, largest = differences(stage.statistics, old.statistics)
            print(f"point statistics that differ: {len(changed)} {changed[:5]}; "
                  f"largest relative change of an interval bound: {largest:.2g}")


if __name__ == "__main__":
    main()
