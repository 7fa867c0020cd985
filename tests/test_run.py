"""The runner end to end on a tiny local model: outputs, cache reuse, determinism, clean failures."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.session import run_spec

RUN_FILES = {"spec.yaml", "manifest.json", "samples.jsonl", "texts.jsonl", "per_sample.csv", "stats.json", "criteria.json", "RESULTS.md"}


def tiny_spec(folder: Path, model_dir: Path, name: str = "tiny", extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        models:
          base: {{id: "{model_dir}"}}
        dataset:
          n_samples: 6
          min_tokens: 40
          max_tokens: 400
        conditions:
          human: {{source: human}}
          model: {{source: generate, generation: {{max_new_tokens: 12}}}}
        metrics: [smoothness, magnitude]
        stats: {{bootstrap_resamples: 200}}
        runtime: {{generation_batch_size: 4, token_budget: 600}}
        report: {{plots: false}}
        criteria:
          model_text_less_surprising: ce_loss.model.mean < ce_loss.human.mean
          model_text_smoother: smoothness.overall.d > 0 and smoothness.overall.p < 0.05
    """) + textwrap.dedent(extra))
    return path


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    def stages(self, word: str) -> list[str]:
        return [line.split()[0] for line in self if len(line.split()) > 1 and line.split()[1] == word]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("run")
    spec = tiny_spec(folder, tiny_model_dir)
    log = Log()
    outcome = run_spec(spec, folder / "runs", log=log)
    return folder, spec, outcome, log


def test_a_run_writes_every_artifact(first_run):
    folder, spec, outcome, log = first_run
    assert RUN_FILES <= {p.name for p in outcome.run_dir.iterdir()}
    assert outcome.run_dir.parent == folder / "runs" / "tiny"
    texts = [json.loads(line) for line in (outcome.run_dir / "texts.jsonl").read_text().splitlines()]
    assert len(texts) == 12 and {t["condition"] for t in texts} == {"human", "model"}
    assert all(t["n_response_tokens"] > 0 and t["response"] for t in texts)
    rows = (outcome.run_dir / "per_sample.csv").read_text().splitlines()
    assert rows[0] == "sample_id,condition,layer,metric,value"
    assert len(rows) - 1 == 2 * 6 * (2 + 2 * 3)  # per text: 2 CE metrics + 2 metrics x 3 layers
    criteria = json.loads((outcome.run_dir / "criteria.json").read_text())
    assert [c["name"] for c in criteria] == ["model_text_less_surprising", "model_text_smoother"]
    assert outcome.exit_code == (0 if all(c["passed"] for c in criteria) else 1)
    assert "generate[model]" in log.stages("computed")
    manifest = json.loads((outcome.run_dir / "manifest.json").read_text())
    assert {"data", "generate[model]", "capture[human]", "capture[model]", "stats"} <= set(manifest["timings"])


def test_a_rerun_reuses_every_stage_and_gives_identical_numbers(first_run):
    folder, spec, outcome, _ = first_run
    log = Log()
    again = run_spec(spec, folder / "runs", log=log)
    assert {"data", "generate[model]", "capture[human]", "capture[model]", "stats"} <= set(log.stages("reused"))
    assert not any(stage.startswith(("generate", "capture", "load")) for stage in log.stages("computed"))
    for name in ("per_sample.csv", "stats.json", "criteria.json"):
        assert (again.run_dir / name).read_bytes() == (outcome.run_dir / name).read_bytes(), name
    # provenance survives reuse: the weights are named although no model was loaded
    first, cached = (json.loads((run.run_dir / "manifest.json").read_text()) for run in (outcome, again))
    assert cached["models"]["base"]["identity"] == first["models"]["base"]["identity"]
    assert cached["models"]["base"]["source"]["content_sha256"] == first["models"]["base"]["source"]["content_sha256"]
    assert first["models"]["base"]["device"] == "cpu" and cached["models"]["base"]["device"] is None
    assert cached["spec_file"] == first["spec_file"] == str(spec.resolve())
    assert cached["format_version"] == 1 and cached["cache"]["capture[human]"] == "reused"


def test_changed_stats_settings_recompute_only_the_stats(first_run):
    folder, _, outcome, _ = first_run
    variant = folder / "tiny_ddof0.yaml"
    variant.write_text("extends: tiny.yaml\nname: tiny_ddof0\nstats: {ddof: 0}\n")
    log = Log()
    run = run_spec(variant, folder / "runs", log=log)
    assert {"capture[human]", "capture[model]"} <= set(log.stages("reused"))
    assert "stats" in log.stages("computed")
    before = json.loads((outcome.run_dir / "stats.json").read_text())
    after = json.loads((run.run_dir / "stats.json").read_text())
    n, d = before["smoothness.human.n"], before["smoothness.overall.d"]
    # d_z with the population SD is sqrt(n / (n - 1)) times d_z with the sample SD
    assert after["smoothness.overall.d"] == pytest.approx(d * (n / (n - 1)) ** 0.5, rel=1e-9)


def test_no_cache_recomputes_the_same_bytes(first_run):
    folder, spec, outcome, _ = first_run
    log = Log()
    fresh = run_spec(spec, folder / "runs", use_cache=False, log=log)
    assert "generate[model]" in log.stages("computed")
    assert (fresh.run_dir / "per_sample.csv").read_bytes() == (outcome.run_dir / "per_sample.csv").read_bytes()


def test_a_sibling_spec_reuses_shared_stages(first_run, tiny_model_dir):
    folder, _, outcome, _ = first_run
    sibling = folder / "tiny_shuffled.yaml"
    sibling.write_text(textwrap.dedent("""
        extends: tiny.yaml
        name: tiny_shuffled
        conditions:
          shuffled: {source: shuffle, of: human, seed: 1}
    """))
    log = Log()
    run = run_spec(sibling, folder / "runs", log=log)
    assert {"data", "generate[model]", "capture[human]", "capture[model]"} <= set(log.stages("reused"))
    assert "capture[shuffled]" in log.stages("computed")
    texts = [json.loads(line) for line in (run.run_dir / "texts.jsonl").read_text().splitlines()]
    by_condition = {(t["condition"], t["sample_id"]): t["response"] for t in texts}
    for sample in range(6):
        assert sorted(by_condition["shuffled", sample].split()) == sorted(by_condition["human", sample].split())


def test_cached_stats_keep_nan_and_infinity(tmp_path, tiny_model_dir, monkeypatch):
    """JSON holds neither: a cached stats stage must give back what the computed one gave."""
    from harness.artifacts import number
    from harness.cache import StageCache
    from harness.executor import Executor
    from harness.spec import load_spec
    from harness.stages import stats

    computed = {"a.nan": float("nan"), "a.inf": float("inf"), "a.neg_inf": float("-inf"), "a.value": 0.25}
    monkeypatch.setattr(stats, "compute_stats", lambda table, spec: dict(computed))
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir))
    table = "sample_id,condition,layer,metric,value\n0,human,,ce_loss,1.0\n"
    results = []
    for _ in range(2):
        log = Log()
        executor = Executor(StageCache(tmp_path / "cache"), log)
        results.append({name: number(value) for name, value in executor.run(stats.StatsStage(table, spec)).items()})
    assert log.stages("reused") == ["stats"]
    for result in results:
        assert result.keys() == computed.keys()
        assert math.isnan(result["a.nan"]) and result["a.inf"] == math.inf and result["a.neg_inf"] == -math.inf
        assert result["a.value"] == 0.25


def harness_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_a_fully_cached_rerun_imports_no_model_or_plotting_library(first_run):
    """Every stage reused, the report too: neither torch, transformers, pandas, scipy nor matplotlib
    is imported (their imports were most of a cached run's time)."""
    folder, spec, outcome, _ = first_run
    code = (
        "import sys\n"
        "from harness.cli import main\n"
        f"code = main(['run', {str(spec)!r}, '--runs-dir', {str(folder / 'runs')!r}])\n"
        "heavy = ('torch', 'transformers', 'pandas', 'scipy', 'matplotlib')\n"
        "print(code, sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "computed" not in result.stderr, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"{int(outcome.exit_code)} []"


def test_bad_model_path_is_one_line_exit_2_and_writes_nothing(tmp_path):
    spec = tiny_spec(tmp_path, tmp_path / "no-such-model")
    result = harness_cli("run", str(spec), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "models.base" in result.stderr and str(spec) in result.stderr
    assert not (tmp_path / "runs").exists()


def test_length_matching_truncates_each_pair_to_the_shorter_response(first_run, tiny_model_dir):
    folder = first_run[0]
    matched = folder / "tiny_matched.yaml"
    matched.write_text("extends: tiny.yaml\nname: tiny_matched\ncapture: {length_matching: true}\n")
    run = run_spec(matched, folder / "runs", log=Log())
    texts = [json.loads(line) for line in (run.run_dir / "texts.jsonl").read_text().splitlines()]
    lengths = {(t["condition"], t["sample_id"]): t["n_response_tokens"] for t in texts}
    unmatched = [json.loads(line) for line in (first_run[2].run_dir / "texts.jsonl").read_text().splitlines()]
    original = {(t["condition"], t["sample_id"]): t["n_response_tokens"] for t in unmatched}
    for sample in range(6):
        assert lengths["human", sample] == lengths["model", sample] == min(original["human", sample], original["model", sample])


def test_compare_and_junit_through_the_cli(first_run):
    folder, spec, outcome, _ = first_run
    result = harness_cli("compare", str(outcome.run_dir), str(outcome.run_dir), "--stat", "smoothness.overall.d",
                         "-o", str(folder / "cmp.md"), cwd=folder)
    assert result.returncode == 0, result.stderr
    stats = json.loads((outcome.run_dir / "stats.json").read_text())
    assert f"| smoothness.overall.d | {stats['smoothness.overall.d']:.4g} | {stats['smoothness.overall.d']:.4g} | 0 |" in result.stdout
    assert (folder / "cmp.md").read_text().strip() == result.stdout.strip()

    junit = folder / "junit.xml"
    result = harness_cli("run", str(folder), "-k", "tiny and not shuffled", "--runs-dir", str(folder / "runs"),
                         "--junitxml", str(junit), cwd=folder)
    assert result.returncode in (0, 1), result.stderr
    assert "model_text_smoother" in junit.read_text() and "<testsuites" in junit.read_text()


def test_a_non_default_capture_site_is_named_in_the_table_and_usable_in_criteria(first_run):
    folder = first_run[0]
    sites = folder / "tiny_sites.yaml"
    sites.write_text(
        "extends: tiny.yaml\nname: tiny_sites\ncapture: {sites: [resid_post, attn_out]}\n"
        "criteria: {attention_smoother: smoothness_attn_out.overall.d > 0}\n"
    )
    run = run_spec(sites, folder / "runs", log=Log())
    rows = (run.run_dir / "per_sample.csv").read_text().splitlines()
    metrics = {row.split(",")[3] for row in rows[1:]}
    assert {"smoothness", "smoothness_attn_out", "magnitude_attn_out"} <= metrics
    before = (first_run[2].run_dir / "per_sample.csv").read_text().splitlines()
    assert [row for row in rows if "_attn_out" not in row] == before  # resid_post unchanged by the other site
    [result] = [r for r in run.results if r.name == "attention_smoother"]
    assert result.error is None and set(result.values) == {"smoothness_attn_out.overall.d"}


@pytest.mark.parametrize(
    "variant, field",
    [("conditions: {model: {generation: {seed: 7}}}", "runtime.generation_batch_size: batches of 4 prompts"),
     # the budget only batches the forward: a generation measured while decoding is reused
     ("runtime: {token_budget: 601}", "runtime.token_budget: forwards of 601 padded tokens")],
)
def test_a_batch_beyond_free_memory_is_an_input_error_before_its_stage_computes(first_run, monkeypatch, variant, field):
    """With 1 MiB free, a new generation (or, with the generations reused, a new capture) stops
    before computing, naming the runtime setting."""
    from harness import models
    from harness.errors import InputError

    monkeypatch.setattr(models, "free_memory_bytes", lambda device: 2**20)
    folder = first_run[0]
    spec = folder / "tiny_huge.yaml"
    spec.write_text(f"extends: tiny.yaml\nname: tiny_huge\n{variant}\n")
    with pytest.raises(InputError, match=f"tiny_huge.yaml: {re.escape(field)} need about .* GiB, and cpu has 0.0 GiB free"):
        run_spec(spec, folder / "runs", log=Log())
    assert not (folder / "runs" / "tiny_huge").exists()


def test_compiled_run_matches_the_eager_run(first_run):
    """runtime.compile end to end: generation and capture run compiled (not reused from the eager
    run's cache), the log names the compiled shapes, and the numbers agree with the eager run's
    within fp32 tolerance (greedy continuations identical)."""
    folder, _, eager, _ = first_run
    spec = folder / "tiny_compiled.yaml"
    spec.write_text("extends: tiny.yaml\nname: tiny_compiled\nruntime: {compile: true}\n")
    log = Log()
    compiled = run_spec(spec, folder / "runs", log=log)
    assert any("capture[model]" in line and "compiled forward: " in line for line in log)
    assert any(re.search(r"generate\[model\]\s+computed.*compiled \d+ graphs", line) for line in log)
    assert (compiled.run_dir / "texts.jsonl").read_text() == (eager.run_dir / "texts.jsonl").read_text()
    rows = [(compiled.run_dir / "per_sample.csv").read_text().splitlines(), (eager.run_dir / "per_sample.csv").read_text().splitlines()]
    assert len(rows[0]) == len(rows[1])
    for got, expected in zip(rows[0][1:], rows[1][1:]):
        assert got.rsplit(",", 1)[0] == expected.rsplit(",", 1)[0]
        assert float(got.rsplit(",", 1)[1]) == pytest.approx(float(expected.rsplit(",", 1)[1]), rel=1e-4, abs=1e-6)
