"""Progress of the steps that take more than a few seconds: stage work units, decoded tokens,
model loading, GGUF conversion.

On a terminal a step is a tqdm bar. Anywhere else (a log file, CI, nohup, SLURM) it is a line
at least every 30 s while it runs, with what is done of the total, the time elapsed and an
estimate of the time left, so a log never goes silent long enough to look hung. The executor
owns the run's `Progress`; model loading and GGUF conversion report through one too. The clock
is injected, so a test drives the heartbeat without waiting.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

PULSE_SECONDS = 1.0
"""How often a running step is checked for a due line, whether or not it reports progress itself."""
HEARTBEAT_SECONDS = 30.0 - PULSE_SECONDS
"""Outside a terminal: a line is due this long after the last one, so, checked every
PULSE_SECONDS, a running step never goes 30 s without one."""


def stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Progress:
    """Where progress goes and how often; `task` reports one step."""

    log: Callable[[str], None] = stderr_line
    """Receives the heartbeat lines (outside a terminal)."""
    clock: Callable[[], float] = time.monotonic
    interval: float = HEARTBEAT_SECONDS
    terminal: bool | None = None
    """A tqdm bar on stderr (True) or heartbeat lines (False); None: whether stderr is a terminal."""
    enabled: bool = True
    """False: report nothing (the processes other than rank 0 under `accelerate launch`)."""
    pulse: float | None = PULSE_SECONDS
    """Seconds between a background thread's checks for a due line, so a step that reports
    nothing for a while (a single long call) still gets its lines; None: no thread."""

    @contextmanager
    def task(self, label: str, total: int | None = None, unit: str = "") -> Iterator[Task]:
        """Report the step `label` while the block runs: `total` units of `unit` (None: a step
        whose size is unknown, reported by its elapsed time). The first line comes after
        `interval`: a quick step, or a bad input found at once, adds nothing to the log."""
        if not self.enabled:
            yield Task(label, total, unit, self.clock, None)
            return
        terminal = sys.stderr.isatty() if self.terminal is None else self.terminal
        bar = _bar(label, total, unit) if terminal else None
        task = Task(label, total, unit, self.clock, bar, self.log, self.interval)
        stop = threading.Event()
        thread = None
        if self.pulse is not None:
            thread = threading.Thread(target=_pulse_until, args=(task, stop, self.pulse), daemon=True)
            thread.start()
        try:
            yield task
        finally:
            stop.set()
            if thread is not None:
                thread.join()
            if bar is not None:
                bar.close()


def _pulse_until(task: Task, stop: threading.Event, seconds: float) -> None:
    while not stop.wait(seconds):
        task.pulse()


def _bar(label: str, total: int | None, unit: str) -> Any:
    from tqdm import tqdm

    if total is None:  # a step of unknown size: its elapsed time
        return tqdm(desc=f"  {label}", bar_format="{desc}  {elapsed}", leave=False)
    return tqdm(total=total, desc=f"  {label}", unit=f" {unit}" if unit else "it", leave=False, dynamic_ncols=True)


@dataclass
class Task:
    """One step being reported: `advance` as work gets done; lines come when due."""

    label: str
    total: int | None
    unit: str
    clock: Callable[[], float]
    bar: Any = None
    """The tqdm bar on a terminal, else None (heartbeat lines)."""
    log: Callable[[str], None] | None = None
    """Receives heartbeat lines; None: this task reports nothing."""
    interval: float = HEARTBEAT_SECONDS
    done: int = 0
    started: float = field(init=False)
    last_line: float = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.started = self.last_line = self.clock()

    def advance(self, amount: int = 1) -> None:
        """`amount` more units done."""
        with self._lock:
            self.done += amount
            if self.bar is not None:
                self.bar.update(amount)
        self.pulse()

    def reach(self, done: int) -> None:
        """At least `done` units done (a unit's work whose own reports fell short of it)."""
        if done > self.done:
            self.advance(done - self.done)

    def pulse(self) -> None:
        """The heartbeat line, when `interval` has passed since the last one (on a terminal,
        a redraw of the bar, so its elapsed time keeps moving)."""
        if self.bar is not None:
            with self._lock:
                self.bar.refresh()
            return
        if self.log is None:
            return
        with self._lock:
            now = self.clock()
            if now - self.last_line < self.interval:
                return
            self.last_line = now
            line = self.line(now)
        self.log(line)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        if self.total is None:
            return f"  {self.label}  {duration(elapsed)} elapsed"
        done = f"{self.done:,}/{self.total:,} {self.unit}".rstrip()
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = (
            f", about {duration(elapsed / self.done * (self.total - self.done))} left"
            if 0 < self.done < self.total else ""
        )
        return f"  {self.label}  {done}{percent}, {duration(elapsed)} elapsed{left}"


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
