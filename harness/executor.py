"""The stage protocol and the one executor that runs every stage.

A stage declares what it is and how to compute it; the executor does the rest: the cache
key, cache get/put, per-unit resume, sharding across processes, progress, timing and the
run-log line.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.artifacts import content_hash
from harness.cache import StageCache
from harness.errors import ExitCode, Interrupted, RunFailure
from harness.progress import Progress, Task


class Stage:
    """One cached step of the pipeline: subclasses set the three names and define `inputs`
    and `compute`; the other methods have defaults for a stage computed in one piece."""

    name: str
    """Its label in the run log, timings and manifest, e.g. `capture[human]`."""
    kind: str
    """Cache folder of the stage, e.g. `capture`."""
    version: int
    """Part of the cache key: bumped when a code change alters the stage's output."""
    progress_unit = "items"
    """What its progress counts (`work`)."""
    progress = Task("", None, "", time.monotonic)
    """While the executor computes the stage's units: the task reporting them, through which
    `compute` may report within a unit (generation: each decoded token); otherwise silent."""

    def inputs(self) -> dict:
        """Everything that determines the output (JSON-able); hashed into the cache key."""
        raise NotImplementedError

    def units(self) -> list[list[int]] | None:
        """Work units (lists of item indices), or None for a stage computed in one piece.

        Called only when the output is not cached, so it may load a model."""
        return None

    def work(self, unit: list[int]) -> int:
        """How many `progress_unit`s the unit is: its items, unless the stage counts finer."""
        return len(unit)

    def compute(self, unit: list[int] | None, folder: Path) -> Any:
        """One unit's items (one per index, in order), or the whole output when `unit` is None.

        `folder` is the stage's cache folder, for side files such as saved activations."""
        raise NotImplementedError

    def finish(self, items: list) -> Any:
        """The stored output, from every unit's items in index order."""
        return items

    def check(self, output: Any) -> str | None:
        """What is wrong with a cached or computed output (a count that does not match the
        inputs, say), or None."""
        return None

    def describe(self, output: Any) -> str:
        """The detail at the end of the stage's log line."""
        return ""

    def placeholder(self, key: str) -> Any:
        """What stands in for the output in a plan that only computes cache keys (`Executor.planning`):
        the output's shape with every text or number derived from `key`, so each later stage's key
        differs exactly when this one's does."""
        raise NotImplementedError


@dataclass
class CompiledCalls:
    """Seconds of a stage's calls into `torch.compile`d code, compilation kept apart: the first
    call of each input shape compiles it."""

    compile_seconds: float = 0.0
    """The first call of each shape, compilation included."""
    run_seconds: float = 0.0
    """Every other call (and every call when nothing is compiled)."""
    graphs: set[tuple[int, ...]] = field(default_factory=set)
    """The input shapes compiled so far."""

    def record(self, shape: tuple[int, ...], seconds: float, compiled: bool) -> None:
        if compiled and shape not in self.graphs:
            self.graphs.add(shape)
            self.compile_seconds += seconds
        else:
            self.run_seconds += seconds


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, a cluster scheduler): handled like Ctrl-C, exit 143."""


@dataclass
class Shard:
    """This process's share of the work under `accelerate launch` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    device: str | None = None

    @classmethod
    def detect(cls) -> "Shard":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))


@dataclass
class Executor:
    cache: StageCache
    log: Callable[[str], None]
    shard: Shard = field(default_factory=Shard)
    timings: dict[str, float] = field(default_factory=dict)
    reuse: dict[str, str] = field(default_factory=dict)
    """Per stage: "reused" or "computed"."""
    keys: dict[str, str] = field(default_factory=dict)
    """Per stage: its cache key."""
    header: str = ""
    """Logged with the first stage line, so a bad input found by the first stage prints only its error."""
    planning: bool = False
    """Compute every stage's key and nothing else: `run` returns the stage's placeholder."""
    progress: Progress | None = None
    """Progress of work units, model loads and decoding; default: heartbeat lines to `log`
    (a bar on a terminal), from rank 0 only."""

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = Progress(self.log_line, enabled=self.shard.rank == 0)

    def run(self, stage: Stage) -> Any:
        key = content_hash({"v": stage.version, **stage.inputs()})
        self.keys[stage.name] = key
        if self.planning:
            return stage.placeholder(key)
        resumed = 0
        with self.timed(stage.name):
            output = self.cache.get(stage.kind, key)
            if output is not None and (problem := stage.check(output)):
                self.cache.discard(self.cache.folder(stage.kind, key) / "result.json", problem)
                output = None
            reused = output is not None
            if output is None:
                output, resumed = self._compute(stage, key)
                if problem := stage.check(output):
                    raise RunFailure(f"{stage.name}: {problem}")
                if self.shard.rank == 0:
                    self.cache.put(stage.kind, key, output)
        detail = stage.describe(output)
        if resumed:
            detail += f" ({resumed} batches resumed from an earlier, interrupted run)"
        self.note(stage.name, reused, detail)
        return output

    def _compute(self, stage: Stage, key: str) -> tuple[Any, int]:
        units = stage.units()
        if units is None:
            # one piece stores nothing before its result, so a stage that fails on its input
            # (too few paragraphs) leaves no cache folder behind; the path is only passed along
            return stage.compute(None, self.cache.root / stage.kind / key), 0
        folder = self.cache.folder(stage.kind, key)
        # A resumed run keeps the batches it started with (an `auto` budget may come out
        # differently now), so its numbers match an uninterrupted run.
        plan = self.cache.read(folder / "plan.json", key)
        if plan is not None:
            units = plan
        elif self.shard.rank == 0:
            self.cache.write(folder / "plan.json", key, units)
        resumed, done = 0, 0
        with self.progress.task(stage.name, sum(map(stage.work, units)), stage.progress_unit) as task:
            stage.progress = task
            try:
                for index, unit in enumerate(units):
                    if index % self.shard.world == self.shard.rank:  # the plan never depends on the process count
                        path = self.cache.unit_path(stage.kind, key, index)
                        items = self.cache.read(path, key)
                        if items is not None and len(items) == len(unit):
                            resumed += 1
                        else:
                            self.cache.write(path, key, stage.compute(unit, folder))
                    done += stage.work(unit)
                    task.reach(done)
            finally:
                del stage.progress  # back to the class's silent task
        self.shard.barrier()
        items: list[Any] = [None] * sum(len(unit) for unit in units)
        for index, unit in enumerate(units):
            unit_items = self.cache.read(self.cache.unit_path(stage.kind, key, index), key, written_by_this_run=True)
            if unit_items is None or len(unit_items) != len(unit):
                raise RunFailure(f"{stage.name}: work unit {index} is missing from {folder}")
            for position, item in zip(unit, unit_items):
                items[position] = item
        return stage.finish(items), resumed

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time a step under `name`; Ctrl-C or SIGTERM inside it says how to resume."""
        start = time.perf_counter()
        try:
            yield
        except KeyboardInterrupt as exc:
            code = ExitCode.TERMINATED if isinstance(exc, Terminated) else ExitCode.INTERRUPTED
            raise Interrupted(
                f"{'terminated' if code == ExitCode.TERMINATED else 'interrupted'} during {name}; finished "
                f"batches are kept in {self.cache.root} — run the same command again to resume from there",
                code,
            ) from None
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def note(self, name: str, reused: bool, detail: str = "") -> None:
        self.reuse[name] = "reused" if reused else "computed"
        self.log_line(f"  {name:<28} {self.reuse[name]:<9} {self.timings.get(name, 0.0):7.1f}s  {detail}".rstrip())

    def log_line(self, line: str) -> None:
        """A line of the run log, after the header."""
        if self.header:
            header, self.header = self.header, ""
            self.log(header)
        self.log(line)
