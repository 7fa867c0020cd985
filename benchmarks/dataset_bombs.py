"""Peak memory and time of `harness run` on hostile dataset files (issue: `dataset.path` once took
21 GB on 300 MB of NUL bytes). Each case is a JSONL source; the error must come at collection,
one line, exit 2. Prints one line per case: exit code, peak RSS (`/usr/bin/time -v`), seconds,
the error line; and the same for `harness validate` on the spec (the floor: imports only).

    python benchmarks/dataset_bombs.py

Not a test: wall time and memory are measured here, never asserted in tests/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "tests" / "bad_inputs" / "_base.yaml"
MB = 10**6


def nul_file(size: int):
    def write(path: Path) -> None:
        with path.open("wb") as handle:
            handle.truncate(size)
    return write


def long_line(size: int):
    def write(path: Path) -> None:
        row = {"question": "A prompt.", "answer": "x" * size}
        path.write_text(json.dumps({"question": "A prompt.", "answer": "An answer."}) + "\n" + json.dumps(row) + "\n",
                        encoding="utf-8")
    return write


def dense_nul_file(size: int):
    """Real NUL bytes on disk (not sparse): what a reader that reads them all would swallow."""
    def write(path: Path) -> None:
        with path.open("wb") as handle:
            for _ in range(size // MB):
                handle.write(b"\0" * MB)
    return write


def valid_rows(path: Path) -> None:
    path.write_text("".join(json.dumps({"question": f"Prompt {i}.", "answer": "An answer."}) + "\n" for i in range(3)),
                    encoding="utf-8")


CASES = {
    "a valid 3-row file (the run's floor)": valid_rows,
    "300 MB of NUL bytes": dense_nul_file(300 * MB),
    "200 MB of NUL bytes (under the size limit)": dense_nul_file(200 * MB),
    "one 20 MB line": long_line(20 * MB),
}


def measured(args: list[str]) -> tuple[int, int, float, str]:
    """(exit code, peak RSS in MB, seconds, first error line) of `python -m harness ARGS`. The valid
    file's run stops at its placeholder model (`tests/bad_inputs/_base.yaml`), after the file was
    read: its peak is what a run costs before any stage (torch and transformers imported)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "harness", *args], cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return done.returncode, peak_kb // 1024, seconds, errors[0] if errors else ""


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        spec = folder / "spec.yaml"
        spec.write_text(f"extends: {BASE}\ndataset: {{source: jsonl, path: data.jsonl, columns: {{prompt: question}}, "
                        "responses: {human: answer}, n_samples: null, min_tokens: null, max_tokens: null}\n", encoding="utf-8")
        code, peak, seconds, _ = measured(["validate", str(spec)])
        print(f"harness validate (floor: no torch)                      exit {code}  peak {peak:5d} MB  {seconds:5.1f} s")
        for name, write in CASES.items():
            write(folder / "data.jsonl")
            code, peak, seconds, line = measured(["run", str(spec), "--runs-dir", str(folder / "runs")])
            print(f"harness run, {name:<42} exit {code}  peak {peak:5d} MB  {seconds:5.1f} s  {line[-110:]}")
            (folder / "data.jsonl").unlink()
        # the same bombs as WikiText's raw `dataset.path` (the case that once reached 21 GB)
        spec.write_text(f"extends: {BASE}\ndataset: {{path: data.txt}}\n", encoding="utf-8")
        for name in ("300 MB of NUL bytes", "one 20 MB line"):
            CASES[name](folder / "data.txt")
            code, peak, seconds, line = measured(["run", str(spec), "--runs-dir", str(folder / "runs")])
            print(f"harness run, wikitext path: {name:<27} exit {code}  peak {peak:5d} MB  {seconds:5.1f} s  {line[-110:]}")
            (folder / "data.txt").unlink()


if __name__ == "__main__":
    main()
