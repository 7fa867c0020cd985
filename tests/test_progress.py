"""Progress outside a terminal: a heartbeat line at least every 30 s, with what is done, the time
elapsed and the time left; generation reports its tokens as they are decoded. A fake clock
drives the heartbeat: no test waits or reads the wall clock."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from conftest import build_tiny_model
from test_generate import GREEDY, NEW_TOKENS, prompts  # noqa: F401  (a fixture)

from harness.cache import StageCache
from harness.executor import Executor, Stage
from harness.progress import HEARTBEAT_SECONDS, Progress, duration
from harness.stages import generate


class FakeClock:
    """Seconds that pass only when the test says so (`step`: how far each reading moves it)."""

    def __init__(self, step: float = 0.0):
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def heartbeat(clock: FakeClock) -> tuple[Progress, list[str]]:
    lines: list[str] = []
    return Progress(lines.append, clock=clock, interval=30, terminal=False, pulse=None), lines


def test_a_line_when_the_interval_has_passed_with_done_total_and_time_left():
    clock = FakeClock()
    progress, lines = heartbeat(clock)
    with progress.task("generate[model]", total=1000, unit="tokens") as task:
        for _ in range(29):  # 29 s of 10 tokens a second: not due yet
            clock.now += 1
            task.advance(10)
        assert lines == []
        clock.now += 1
        task.advance(10)
        assert lines == ["  generate[model]  300/1,000 tokens (30%), 30s elapsed, about 1m10s left"]
        clock.now += 29.5
        task.pulse()  # 29.5 s after the last line: still quiet
        clock.now += 0.5
        task.pulse()  # nothing advanced, but the step is still running: a line anyway
        assert lines[1] == "  generate[model]  300/1,000 tokens (30%), 1m00s elapsed, about 2m20s left"
        clock.now += 45
        task.reach(1000)
    assert lines[2] == "  generate[model]  1,000/1,000 tokens (100%), 1m45s elapsed"
    assert len(lines) == 3


def test_a_step_of_unknown_size_reports_its_elapsed_time():
    clock = FakeClock()
    progress, lines = heartbeat(clock)
    with progress.task("load[base]") as task:
        for _ in range(100):
            clock.now += 1
            task.pulse()
    assert lines == ["  load[base]  30s elapsed", "  load[base]  1m00s elapsed", "  load[base]  1m30s elapsed"]


def test_a_background_pulse_reports_a_step_that_reports_nothing_itself():
    """The thread checks every `pulse` seconds (real ones, here a millisecond) whether a line is due
    by the injected clock, which moves a heartbeat per reading: lines come without any `advance`."""
    lines: list[str] = []
    two_lines = threading.Event()

    def log(line: str) -> None:
        lines.append(line)
        if len(lines) == 2:
            two_lines.set()

    progress = Progress(log, clock=FakeClock(step=30), interval=30, terminal=False, pulse=0.001)
    with progress.task("load[base]"):
        two_lines.wait(timeout=60)  # a bound, should the thread never report (the assertion then says so)
    assert lines[:2] == ["  load[base]  30s elapsed", "  load[base]  1m00s elapsed"]


def test_disabled_progress_and_a_terminal_write_no_lines(capsys):
    lines: list[str] = []
    for progress in (Progress(lines.append, clock=FakeClock(step=60), terminal=False, enabled=False, pulse=None),
                     Progress(lines.append, clock=FakeClock(step=60), terminal=True, pulse=None)):
        with progress.task("capture[human]", total=4, unit="texts") as task:
            task.advance(4)
    assert lines == []
    assert "capture[human]" in capsys.readouterr().err  # the terminal's tqdm bar


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


# --- what the stages report -----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer))


def test_generation_reports_each_decoding_step_of_the_batch(llama, tiny_tokenizer, prompts):
    counts: list[int] = []
    outputs = generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0, on_tokens=counts.append)
    assert counts == [len(prompts)] * NEW_TOKENS  # one call per step, a token per row
    assert outputs == generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0)


def test_the_executor_reports_generated_tokens_within_a_work_unit(llama, tiny_tokenizer, prompts, tmp_path):
    """One batch (a CPU's whole generation is one work unit) still reports every step: with a clock
    that moves a heartbeat per reading, each step gives a line, in tokens, up to the total."""
    lines: list[str] = []
    progress = Progress(lines.append, clock=FakeClock(step=HEARTBEAT_SECONDS), terminal=False, pulse=None)
    executor = Executor(StageCache(tmp_path, True, lines.append), lines.append, progress=progress)
    loaded = SimpleNamespace(model=llama, tokenizer=tiny_tokenizer, input_device="cpu")
    pool = SimpleNamespace(model=lambda alias: loaded, key=lambda alias: {"identity": "tiny-llama"}, spec_path="tiny.yaml")
    stage = generate.GenerateStage("generate[model]", prompts, "base", GREEDY, len(prompts), False, pool)
    executor.run(stage)
    total = len(prompts) * NEW_TOKENS
    heartbeats = [line for line in lines if "elapsed" in line]
    assert [int(line.split()[1].split("/")[0]) for line in heartbeats] == [
        len(prompts) * step for step in range(1, NEW_TOKENS + 1)]
    assert all(f"/{total} tokens" in line for line in heartbeats)
    assert stage.progress is Stage.progress  # silent again once computed


class Counting(Stage):
    """A stage of three units that reports nothing within them."""

    name, kind, version = "count", "count", 1

    def inputs(self) -> dict:
        return {}

    def units(self) -> list[list[int]]:
        return [[0, 1], [2], [3, 4, 5]]

    def compute(self, unit, folder):
        return [index * 2 for index in unit]


def test_the_executor_counts_the_items_of_finished_units(tmp_path):
    lines: list[str] = []
    progress = Progress(lines.append, clock=FakeClock(step=HEARTBEAT_SECONDS), terminal=False, pulse=None)
    executor = Executor(StageCache(tmp_path, True, lines.append), lines.append, progress=progress)
    assert executor.run(Counting()) == [0, 2, 4, 6, 8, 10]
    assert [line.split()[1] for line in lines if "elapsed" in line] == ["2/6", "3/6", "6/6"]
