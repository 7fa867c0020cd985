"""Peak memory and time of the input bombs of issue 24, each through the real reader in a fresh
process: `python benchmarks/bombs.py FOLDER` (FOLDER: scratch space; sparse files take no disk).
Prints one line per bomb: the error line, peak RSS (MiB) and seconds. Not a test: no clock in tests.
The dataset bombs run end to end through `harness run` in `benchmarks/dataset_bombs.py`."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "directions: sparse 4 GiB .npy, lying header": ("npy", "from harness.inputs import tensor_file; tensor_file(P, 'directions.probe.path')"),
    "template: nested range(100000)": ("t1", "from harness.templates import render_template; render_template(P, {})"),
    "template: 7 ** (10**9)": ("t2", "from harness.templates import render_template; render_template(P, {})"),
    "template: 'a' * 10**9": ("t3", "from harness.templates import render_template; render_template(P, {})"),
    "template: doubling ~ in a loop": ("t4", "from harness.templates import render_template; render_template(P, {})"),
    "template: 10^8 characters written": ("t5", "from harness.templates import render_template; render_template(P, {})"),
}
TEMPLATES = {
    "t1": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "t2": "{{ 7 ** (10**9) }}",
    "t3": "{{ 'a' * 10**9 }}",
    "t4": "{% set ns = namespace(v='ab') %}{% for i in range(40) %}{% set ns.v = ns.v ~ ns.v %}{% endfor %}",
    "t5": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


def make(folder: Path, name: str) -> Path:
    import numpy as np

    if name in TEMPLATES:
        path = folder / f"{name}.md.j2"
        path.write_text(TEMPLATES[name] + "\n")
        return path
    if name == "npy":
        path = folder / "probe.npy"
        np.save(path, np.ones((3, 32), dtype=np.float32))
    with path.open("r+b") as file:
        file.truncate(4 * 2**30)
    return path


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for label, (name, code) in CASES.items():
        path = make(folder, name)
        script = (f"from pathlib import Path; P = Path({str(path)!r})\ntry:\n    {code}\n"
                  "except Exception as exc:\n    print(str(exc)[-150:])\n")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
        print(f"{label}: {seconds:.1f} s, peak RSS of the largest process so far {peak:.0f} MiB: {done.stdout.strip()}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
