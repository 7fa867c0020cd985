"""Extensions from other packages: a throw-away plugin distribution (a `*.dist-info` with an
`entry_points.txt` on sys.path) registers a trajectory metric and a condition source through
the public decorators; a spec uses both end to end on the tiny model. A plugin that fails to
import or takes a registered name is one error line naming its package, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PLUGIN = '''
"""A plugin: one trajectory metric, one condition source."""
from typing import Literal

from harness.metrics import layer_metric
from harness.sources import ConditionSpec, condition_source, text


@layer_metric
def mean_abs_activation(hidden, mask):
    """Mean absolute activation over the response tokens."""
    weights = mask.to(hidden.dtype)
    return (hidden.abs().mean(-1) * weights).sum(-1) / weights.sum(-1)


class ReversedCondition(ConditionSpec):
    """Another condition's response with its words in reverse order."""

    source: Literal["reverse_words"]
    of: str

    def derived_from(self):
        return [self.of]


@condition_source(ReversedCondition)
def reverse_words(name, condition, context):
    return [text(t["prompt"], " ".join(t["response"].split()[::-1])) for t in context.texts[condition.of]]
'''


def plugin_folder(root: Path, dist: str, module: str, code: str) -> Path:
    """A folder that, on sys.path, is an installed distribution `dist` with one `harness.plugins` entry point."""
    folder = root / dist
    info = folder / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[harness.plugins]\n{module} = {module}\n")
    (folder / f"{module}.py").write_text(code)
    return folder


def harness_cli(*args: str, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(path)}, timeout=1200)


def plugin_spec(folder: Path, model_dir: Path) -> Path:
    path = folder / "plugged.yaml"
    path.write_text(textwrap.dedent(f"""
        name: plugged
        models:
          base: {{id: "{model_dir}"}}
        dataset: {{n_samples: 6, min_tokens: 40, max_tokens: 400}}
        conditions:
          reversed: {{source: reverse_words, of: human}}
          human: {{source: human}}
        metrics: [mean_abs_activation, smoothness]
        stats: {{bootstrap_resamples: 200, correlate: [ce_loss, mean_abs_activation]}}
        runtime: {{token_budget: 600}}
        report: {{plots: false}}
        criteria:
          plugin_metric_measured: mean_abs_activation.overall.p >= 0 and mean_abs_activation.overall.p <= 1
    """))
    return path


def test_a_plugin_metric_and_condition_source_run_end_to_end(tmp_path, tiny_model_dir):
    plugins = plugin_folder(tmp_path, "harness_demo_plugin", "harness_demo_plugin", PLUGIN)
    spec = plugin_spec(tmp_path, tiny_model_dir)
    listed = harness_cli("ls", "metrics", path=plugins, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:2] == ["mean_abs_activation", "harness_demo_plugin"] for line in listed.stdout.splitlines())
    assert any(line.split()[:2] == ["smoothness", "harness"] for line in listed.stdout.splitlines())
    sources = harness_cli("ls", "sources", path=plugins, cwd=tmp_path)
    assert any(line.split()[:2] == ["reverse_words", "harness_demo_plugin"] for line in sources.stdout.splitlines())

    run = harness_cli("run", str(spec), "--runs-dir", str(tmp_path / "runs"), path=plugins, cwd=tmp_path)
    assert run.returncode in (0, 1), run.stderr
    (run_dir,) = (tmp_path / "runs" / "plugged").iterdir()
    stats = json.loads((run_dir / "stats.json").read_text())
    assert isinstance(stats["mean_abs_activation.overall.d"], float)
    assert "mean_abs_activation.layer0.d" in stats
    (criterion,) = json.loads((run_dir / "criteria.json").read_text())
    assert criterion["name"] == "plugin_metric_measured" and criterion["passed"]
    assert criterion["values"]["mean_abs_activation.overall.p"] == stats["mean_abs_activation.overall.p"]
    texts = [json.loads(line) for line in (run_dir / "texts.jsonl").read_text().splitlines()]
    human = {row["sample_id"]: row["response"] for row in texts if row["condition"] == "human"}
    reversed_ = {row["sample_id"]: row["response"] for row in texts if row["condition"] == "reversed"}
    assert reversed_ and all(reversed_[i] == " ".join(human[i].split()[::-1]) for i in human)


@pytest.mark.parametrize("code, problem", [
    ("raise RuntimeError('no GPU here')", "failed to import (RuntimeError: no GPU here)"),
    ("from harness.metrics import layer_metric\n\n@layer_metric\ndef smoothness(hidden, mask):\n    return hidden\n",
     "registers the trajectory metric 'smoothness', which harness already registered"),
    ("from harness.metrics import text_metric\n\n@text_metric\ndef magnitude(nll, target, response):\n    return nll\n",
     "registers the trajectory metric 'magnitude', which harness already registered"),
])
def test_a_broken_plugin_is_one_line_naming_its_package_and_exit_2(tmp_path, code, problem):
    plugins = plugin_folder(tmp_path, "broken_plugin", "broken_plugin", code)
    for args in (("validate", str(REPO / "specs" / "quickstart.yaml")), ("ls", "metrics")):
        result = harness_cli(*args, path=plugins, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: plugin broken_plugin") and problem in line, line
