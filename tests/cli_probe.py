"""`python tests/cli_probe.py ARGS...`: the `harness` command line, recording into the file named by
$HARNESS_PROBE_FILE each model it loads (`model <its models.ALIAS.id>`) and each stage it starts (`stage <name>`),
one per line. Tests check with it what a command did (no model loaded, no stage started) rather
than how long it took."""

from __future__ import annotations

import os
import sys

from harness import cli
from harness.executor import Executor
from harness.pool import ModelPool


def _record(kind: str, name: str) -> None:
    with open(os.environ["HARNESS_PROBE_FILE"], "a", encoding="utf-8") as file:
        file.write(f"{kind} {name}\n")


def _recording(method, kind: str, name):
    def recorded(self, arg):
        _record(kind, name(self, arg))
        return method(self, arg)

    return recorded


ModelPool.model = _recording(ModelPool.model, "model", lambda pool, alias: pool.spec.models[alias].id)
Executor.run = _recording(Executor.run, "stage", lambda executor, stage: stage.name)

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
