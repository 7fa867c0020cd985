"""harness: a declarative, pytest-style experiment harness for LM interpretability.

The Python API (for notebooks and scripts) is two functions:

    import harness

    outcome = harness.run("specs/quickstart.yaml", overrides={"dataset.n_samples": 8}, runs_dir="runs")
    outcome.exit_code, [result.name for result in outcome.results if not result.passed]
    run = harness.load_run(outcome.run_dir)
    run.stats["smoothness.overall.d"], run.table.head()

`import harness` imports neither torch nor the engine: each function imports what it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from harness.rundir import RunRecord
    from harness.session import Outcome

__version__ = "0.1.0"


def run(
    spec: str | Path,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    runs_dir: str | Path = "runs",
    *,
    limit: int | None = None,
    use_cache: bool = True,
    tag: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Run a spec file (every point of its matrix) as `harness run` does, and return its outcome.

    `overrides`: `{key.path: value}` or `["key.path=value", ...]`, set and recorded exactly as
    `--set`; `limit`: `--limit`. A bad input raises `harness.errors.InputError` (one line).
    """
    from harness.overrides import Override, command_line, flow, parse_set  # lazy: `import harness` stays light
    from harness.session import run_spec, to_stderr

    if isinstance(overrides, Mapping):
        sets = [Override(key, value, f"--set {key}={flow(value)}") for key, value in overrides.items()]
    else:
        sets = [parse_set(text) for text in overrides]
    every = [*sets, *command_line(limit=limit)]
    return run_spec(Path(spec), Path(runs_dir), use_cache, log or to_stderr, every, tag)


def load_run(path: str | Path) -> RunRecord:
    """A finished run folder read back: its spec, manifest, texts, per-sample table, statistics and criteria."""
    from harness.rundir import load_run as load  # lazy: `import harness` stays light

    return load(Path(path))
