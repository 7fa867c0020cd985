"""Sweeps on a tiny local model: matrix expansion, shared stages, sweep criteria, the combined
report, command-line overrides, and the pytest items of a matrix spec."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from statsmodels.stats.multitest import multipletests

from harness import sweep_report
from harness.errors import InputError
from harness.overrides import command_line, parse_set
from harness.spec import load_spec
from harness.session import run_spec
from harness.sweep import expand, sweep_statistics
from test_run import Log, tiny_spec

REPO = Path(__file__).resolve().parent.parent
MATRIX = """
matrix:
  conditions.model.generation.temperature: [0, 0.9]
sweep_criteria:
  smoother_everywhere: sweep.model_text_smoother.passed_fraction == 1
  effect_after_fdr: sweep.smoothness.overall.p.p_bh.max < 0.05
"""


def harness_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("sweep")
    tiny_spec(folder, tiny_model_dir, name="tinybase")
    spec = folder / "tinysweep.yaml"
    spec.write_text("extends: tinybase.yaml\nname: tinysweep\nreport: {plots: true}\n" + MATRIX)
    log = Log()
    outcome = run_spec(spec, folder / "runs", log=log)
    return folder, spec, outcome, log


def test_points_are_ordinary_runs_with_pytest_ids(swept):
    folder, _, outcome, _ = swept
    assert [point.id for point, _ in outcome.points] == [
        "tinysweep[temperature=0]", "tinysweep[temperature=0.9]"]
    for point, run in outcome.points:
        manifest = json.loads((run.run_dir / "manifest.json").read_text())
        assert manifest["point"] == point.id
        assert manifest["overrides"] == [f"matrix: conditions.model.generation.temperature={point.values['conditions.model.generation.temperature']}"]
        resolved = load_spec(run.run_dir / "spec.yaml")
        assert resolved.conditions["model"].generation.temperature == point.values["conditions.model.generation.temperature"]
        assert not resolved.matrix and run.run_dir.parent == folder / "runs" / "tinysweep"
        assert f"Point `{point.id}`" in (run.run_dir / "RESULTS.md").read_text()


def test_shared_stages_are_computed_once(swept):
    _, _, outcome, log = swept
    computed = log.stages("computed")
    # data and the human capture serve both points; only the temperature's stages run twice
    assert computed.count("data") == 1 and computed.count("capture[human]") == 1
    assert computed.count("generate[model]") == 2 and computed.count("capture[model]") == 2
    assert log.stages("reused").count("data") == 1


def test_sweep_statistics_and_criteria_follow_the_point_runs(swept):
    _, _, outcome, _ = swept
    stats = [json.loads((run.run_dir / "stats.json").read_text()) for _, run in outcome.points]
    criteria = [json.loads((run.run_dir / "criteria.json").read_text()) for _, run in outcome.points]
    sweep = json.loads((outcome.sweep_dir / "sweep.json").read_text())
    values = sweep["statistics"]
    d = [point["smoothness.overall.d"] for point in stats]
    assert values["sweep.smoothness.overall.d.min"] == min(d) and values["sweep.smoothness.overall.d.max"] == max(d)
    p = [point["smoothness.overall.p"] for point in stats]
    assert values["sweep.smoothness.overall.p.p_bh.max"] == pytest.approx(max(multipletests(p, method="fdr_bh")[1]))
    passed = [next(c["passed"] for c in rows if c["name"] == "model_text_smoother") for rows in criteria]
    assert values["sweep.model_text_smoother.passed_count"] == sum(passed)
    verdicts = {row["name"]: row["passed"] for row in sweep["criteria"]}
    assert verdicts == {"smoother_everywhere": all(passed),
                        "effect_after_fdr": max(multipletests(p, method="fdr_bh")[1]) < 0.05}
    assert [r.name for r in outcome.all_results][-2:] == ["smoother_everywhere", "effect_after_fdr"]


def test_bh_by_hand():
    """BH across three points: p_(i) * m / i, made monotone from the top."""
    stats = sweep_statistics([{"x.p": 0.01}, {"x.p": 0.04}, {"x.p": 0.03}], [[], [], []])
    assert stats["sweep.x.p.p_bh.min"] == pytest.approx(0.03) and stats["sweep.x.p.p_bh.max"] == pytest.approx(0.04)
    assert stats["sweep.x.p.median"] == 0.03


def test_the_combined_report_links_each_point_and_draws_relative_depth(swept):
    _, _, outcome, _ = swept
    report = (outcome.sweep_dir / "RESULTS.md").read_text()
    for point, run in outcome.points:
        assert f"`{point.id}`" in report and f"(../{run.run_dir.name}/RESULTS.md)" in report
        assert (outcome.sweep_dir / f"../{run.run_dir.name}/RESULTS.md").is_file()
    assert "effect_by_relative_depth.png" in report
    assert (outcome.sweep_dir / "effect_by_relative_depth.png").stat().st_size > 0
    assert outcome.sweep_dir.name.endswith("-sweep")


def test_a_rerun_reuses_every_stage(swept):
    folder, spec, _, _ = swept
    log = Log()
    run_spec(spec, folder / "runs", log=log)
    assert not [stage for stage in log.stages("computed") if stage != "report"]


def test_identical_points_are_an_error(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, extra="matrix: {description: [one, two]}\n")
    with pytest.raises(InputError, match=r"points 1 and 2 are identical"):
        run_spec(spec, tmp_path / "runs", log=Log())
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir())
    # pytest too: every point's items fail on it before either point runs
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pytest", spec.name, "--harness-runs-dir", "runs", "-p", "no:cacheprovider", "-k", "two"]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    failed = re.findall(r"^FAILED \S+\[description=two\]::\w+", result.stdout, re.MULTILINE)
    assert result.returncode == 1 and len(failed) == len(load_spec(spec).criteria), result.stdout[-2000:]
    assert "points 1 and 2 are identical" in result.stdout
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir())


def test_an_invalid_point_names_its_key_and_value(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, extra="matrix: {dataset.n_samples: [6, -3]}\n")
    with pytest.raises(InputError, match=r"matrix: dataset.n_samples=-3: dataset.n_samples: .*greater than or equal to 3"):
        expand(spec)


def test_sweep_criteria_are_checked_like_criteria(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, extra="matrix: {dataset.n_samples: [5, 6]}\nsweep_criteria: {x: sweep.smoothnes.overall.d.min > 0}\n")
    with pytest.raises(InputError, match=r"sweep_criteria.x: unknown name 'smoothnes'.*did you mean 'smoothness'"):
        expand(spec)
    no_matrix = tiny_spec(tmp_path, tiny_model_dir, name="plain", extra="sweep_criteria: {x: sweep.smoothness.overall.d.min > 0}\n")
    with pytest.raises(InputError, match="sweep_criteria: needs a matrix"):
        expand(no_matrix)


def test_overrides_set_typed_values_and_name_themselves_in_errors(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir)
    loaded = load_spec(spec, command_line(["conditions.model.generation.temperature=0.5", "stats.mixed_model=false"], 4, "cpu"))
    assert loaded.conditions["model"].generation.temperature == 0.5 and loaded.stats.mixed_model is False
    assert loaded.dataset.n_samples == 4 and loaded.models["base"].device_map == "cpu"
    with pytest.raises(InputError, match=r"^\S+tiny.yaml: --set nonexistent.key=1: nonexistent: unknown key$"):
        load_spec(spec, [parse_set("nonexistent.key=1")])
    with pytest.raises(InputError, match=r"--limit 2: dataset.n_samples: "):
        load_spec(spec, command_line(limit=2))
    with pytest.raises(InputError, match=r"--set oops: expected key.path=value"):
        parse_set("oops")


def test_the_cli_runs_a_sweep_with_overrides_and_lists_its_statistics(swept):
    folder, spec, outcome, _ = swept
    result = harness_cli("run", str(spec), "--runs-dir", str(folder / "runs"), "--set", "stats.ddof=0", "--tag", "ddof0", cwd=folder)
    assert result.returncode in (0, 1), result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("tinysweep[temperature=0.9]  →  ") for line in lines)
    assert re.fullmatch(r"(\d+ passed)?(, )?(\d+ failed)? in [\d.]+s", lines[-1]), lines[-1]
    assert sum(int(n) for n in re.findall(r"(\d+) (?:passed|failed)", lines[-1])) == 2 * 2 + 2
    assert "stats" in result.stderr and "generate[model]" in result.stderr
    assert not re.search(r"generate\[model\]\s+computed", result.stderr)  # ddof enters the stats stage only
    runs = sorted((folder / "runs" / "tinysweep").glob("*-ddof0-*"))
    assert {run.name.split("-ddof0-")[1] for run in runs} == {"temperature=0", "temperature=0.9", "sweep"}

    listed = harness_cli("ls", "stats", str(outcome.points[0][1].run_dir), cwd=folder)
    assert listed.returncode == 0 and "smoothness.overall.d" in listed.stdout.splitlines()
    assert "human_vs_model.smoothness.layer<N>.p_holm" in listed.stdout.splitlines()
    of_spec = harness_cli("ls", "stats", str(spec), cwd=folder)
    run_names = set(listed.stdout.splitlines())
    assert run_names <= set(of_spec.stdout.splitlines())  # a spec lists what its runs write
    assert "sweep.model_text_smoother.passed_count|passed_fraction" in of_spec.stdout

    compared = harness_cli("compare", str(outcome.sweep_dir), cwd=folder)
    assert compared.returncode == 0, compared.stderr
    assert all(str(run.run_dir) in compared.stdout for _, run in outcome.points)


def test_cli_override_errors_are_one_line_exit_2(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir)
    for bad in ("nonexistent.key=1", "dataset.n_samples=-3"):
        result = harness_cli("run", str(spec), "--set", bad, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ") and f"--set {bad}: " in result.stderr
    assert not (tmp_path / "runs").exists()


def test_pytest_items_per_point_and_criterion_with_k_on_values(swept):
    folder, spec, _, _ = swept
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pytest", str(spec), "--harness-runs-dir", str(folder / "runs"), "-p", "no:cacheprovider"]
    result = subprocess.run([*args, "-v", "-k", "temperature=0.9"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode in (0, 1), result.stdout[-3000:]
    ran = re.findall(r"::(tinysweep\[[^\]]+\])::(\w+) (?:PASSED|FAILED)", result.stdout)
    assert ran and {point for point, _ in ran} == {"tinysweep[temperature=0.9]"}, result.stdout[-3000:]
    assert {criterion for _, criterion in ran} == {"model_text_less_surprising", "model_text_smoother"}
    assert re.search(r"::sweep::smoother_everywhere", subprocess.run(
        [*args, "--collect-only", "-q"], cwd=folder, env=env, capture_output=True, text=True, timeout=600).stdout)


def test_last_failed_reruns_only_the_failed_items(swept):
    folder, _, _, _ = swept
    spec = folder / "tinysweep_lf.yaml"
    spec.write_text("extends: tinysweep.yaml\nname: tinysweep_lf\ncriteria: {never: smoothness.overall.n < 0}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "pytest", spec.name, "--harness-runs-dir", "runs", "-q", "-k", "temperature=0.9"]
    first = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 1 and (folder / ".pytest_cache").is_dir(), first.stdout[-2000:]
    failed = set(re.findall(r"^FAILED (\S+::\S+)", first.stdout, re.MULTILINE))
    assert "tinysweep_lf.yaml::tinysweep_lf[temperature=0.9]::never" in failed, first.stdout[-2000:]
    again = subprocess.run([*args, "--lf", "--collect-only"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    listed = {line for line in again.stdout.splitlines() if "::" in line}
    assert listed == failed, again.stdout[-2000:]


def test_lf_warns_on_a_pytest_that_reads_cached_ids_back_wrongly(monkeypatch):
    """pytest 9.2 parses a cached id's first `[` as its parameters (pytest-dev/pytest#15045), so a
    matrix point's criterion never matches its --lf entry: the plugin says so."""
    from harness import pytest_plugin

    class LossyNodeId:  # pytest 9.2's parse: the bracket mid-id starts the parameters
        def __init__(self, path, names=(), params=None):
            self.key = (path, tuple(names), params)

        def __eq__(self, other):
            return self.key == other.key

        @classmethod
        def parse(cls, nodeid):
            path, _, tail = nodeid.partition("::")
            names, bracket, params = tail.partition("[")
            return cls(path, names.split("::"), params.removesuffix("]") if bracket else None)

    monkeypatch.setitem(sys.modules, "_pytest.nodeid", SimpleNamespace(NodeId=LossyNodeId))
    assert not pytest_plugin._cached_ids_round_trip()
    monkeypatch.delitem(sys.modules, "_pytest.nodeid")
    monkeypatch.setattr("builtins.__import__", _without("_pytest.nodeid"))
    assert pytest_plugin._cached_ids_round_trip()  # before pytest 9.2: cached ids were plain strings


def _without(module: str):
    real = __import__

    def importing(name, *args, **kwargs):
        if name == module:
            raise ImportError(name)
        return real(name, *args, **kwargs)

    return importing


def test_validate_covers_matrix_points_and_the_schema_documents_sweeps(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, extra="matrix: {dataset.n_samples: [5, 6], stats.ddof: [0, 1]}\n")
    result = harness_cli("validate", str(spec), cwd=tmp_path)
    headers = [line for line in result.stdout.splitlines() if line.startswith("# ")]
    assert result.returncode == 0 and headers == [
        f"# {spec}::tiny[n_samples={n},ddof={ddof}] (resolved)" for n in (5, 6) for ddof in (0, 1)], result.stdout
    assert "\nmatrix:" not in result.stdout  # each point is an ordinary spec
    (tmp_path / "other.yaml").write_text("extends: tiny.yaml\nname: other\nmatrix: null\n")
    listed = harness_cli("validate", str(tmp_path), cwd=tmp_path)
    assert f"ok     {spec}  (tiny, 4 points)" in listed.stdout and "2 valid, 0 invalid" in listed.stdout, listed.stdout
    schema = json.loads(harness_cli("schema", cwd=tmp_path).stdout)
    for key in ("matrix", "sweep_criteria"):
        assert "description" in schema["properties"][key]
    version = harness_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == "harness 0.1.0"
    helped = harness_cli("--help", cwd=tmp_path).stdout
    assert all(name in helped for name in ("HARNESS_CACHE_DIR", "HARNESS_MODEL_CACHE", "HARNESS_DEBUG"))


def test_ls_lists_the_registries(tmp_path):
    from harness.metrics import LAYER_METRICS, PROJECTION_METRICS, TEXT_METRICS

    from harness.data_sources import DATA_SOURCES
    from harness.sources import SOURCES

    every_metric = [*LAYER_METRICS, *PROJECTION_METRICS, *TEXT_METRICS]
    every_source = [*SOURCES, *(f"dataset: {name}" for name in DATA_SOURCES)]
    for what, names in (("metrics", every_metric), ("sources", every_source)):
        result = harness_cli("ls", what, cwd=tmp_path)
        assert result.returncode == 0
        assert [" ".join(line.split()[:2]) if line.startswith("dataset: ") else line.split()[0]
                for line in result.stdout.splitlines()] == names
    specs = harness_cli("ls", "specs", str(REPO / "specs"), cwd=tmp_path)
    assert "cross-model-offline, 2 points" in specs.stdout and "temperature-sweep-offline, 4 points" in specs.stdout


def test_exitfirst_stops_after_the_first_failing_spec(swept):
    folder, _, _, _ = swept
    for name in ("a_fails", "b_fails"):
        (folder / "x" / f"{name}.yaml").parent.mkdir(exist_ok=True)
        (folder / "x" / f"{name}.yaml").write_text(f"extends: ../tinybase.yaml\nname: {name}\ncriteria: {{never: smoothness.overall.n < 0}}\n")
    result = harness_cli("run", str(folder / "x"), "-x", "--runs-dir", str(folder / "runs"), cwd=folder)
    assert result.returncode == 1
    assert "a_fails.yaml  →" in result.stdout and "b_fails.yaml  →" not in result.stdout
    assert "stopped after the first failure (-x)" in result.stdout


def test_relative_depth_divides_by_the_models_number_of_layers(swept, tiny_model_dir):
    """The manifest records the capture model's depth, so layers captured from a deep model's
    first half sit in the first half of the relative-depth axis."""
    _, _, outcome, _ = swept
    config = json.loads((tiny_model_dir / "config.json").read_text())
    run_dir = outcome.points[0][1].run_dir
    assert sweep_report.model_layers(run_dir, "base") == config["num_hidden_layers"]
    stats = {"smoothness.layer0.d": 0.5, "smoothness.layer2.d": 1.0}
    rows = sweep_report._depth_rows(["deep", "unknown"], [stats, stats], [12, None], "smoothness")
    assert [(row["point"], row["relative_depth"]) for row in rows] == [("deep", 0), ("deep", 2 / 12), ("unknown", 0), ("unknown", 2 / 3)]


def test_the_sweep_says_how_many_samples_its_points_share(swept, tmp_path):
    _, _, outcome, _ = swept
    points = json.loads((outcome.sweep_dir / "sweep.json").read_text())["points"]
    assert [point["shared_samples"] for point in points] == [{"shared": 6, "of": 6, "percent": 100.0}] * 2
    assert "| 6/6 (100 %) |" in (outcome.sweep_dir / "RESULTS.md").read_text()
    # points whose tokenizers kept partly different paragraphs: counted by dataset id and prompt
    folders = []
    for name, ids in (("a", [1, 2, 3, 4]), ("b", [2, 3, 4, 5]), ("c", [3, 4, 2])):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "samples.jsonl").write_text("".join(
            json.dumps({"sample_id": i, "id": str(row), "prompt": f"prompt {row}"}) + "\n" for i, row in enumerate(ids)))
        folders.append(folder)
    assert [(s["shared"], s["of"]) for s in sweep_report.shared_samples(folders)] == [(3, 4), (3, 4), (3, 3)]


def test_a_dose_response_sweep_has_a_trend_its_figure_and_says_what_was_changed(tmp_path, tiny_model_dir):
    import json

    import numpy as np
    from scipy.stats import spearmanr

    np.save(tmp_path / "probe.npy", np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32))
    base = tiny_spec(tmp_path, tiny_model_dir, name="tinybase")
    spec = tmp_path / "dose.yaml"
    spec.write_text(
        "extends: tinybase.yaml\nname: dose\nreport: {plots: true}\n"
        "directions: {probe: {path: probe.npy}}\n"
        "conditions:\n  model: null\n"
        "  steered: {source: intervene, of: human, at: {layers: [1], positions: response},"
        " do: {add: {direction: probe, scale: 1.0}}}\n"
        "criteria: {model_text_less_surprising: null, model_text_smoother: null, moved: kl_from_clean.steered.mean > 0}\n"
        "matrix: {conditions.steered.do.add.scale: [1.0, 4.0, 16.0]}\n"
        "sweep_criteria: {grows: sweep.ce_loss.overall.d.trend.rho < 0}\n"
    )
    assert base.is_file()
    outcome = run_spec(spec, tmp_path / "runs", log=Log())
    sweep = json.loads((outcome.sweep_dir / "sweep.json").read_text())
    points = [json.loads((outcome.sweep_dir.parent / point["run"] / "stats.json").read_text()) for point in sweep["points"]]
    name = "kl_from_clean.steered.mean"
    rho, p = spearmanr([1.0, 4.0, 16.0], [stats[name] for stats in points])
    assert sweep["statistics"][f"sweep.{name}.trend.rho"] == pytest.approx(rho)
    assert sweep["statistics"][f"sweep.{name}.trend.p"] == pytest.approx(p)
    assert [row["name"] for row in sweep["criteria"]] == ["grows"]
    report = (outcome.sweep_dir / "RESULTS.md").read_text()
    assert "## Dose-response" in report and (outcome.sweep_dir / "dose_response.png").stat().st_size > 0
    first = outcome.sweep_dir.parent / sweep["points"][0]["run"]
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["interventions"]["steered"]["do"] == {"add": {"direction": "probe", "scale": 1.0}}
    assert manifest["interventions"]["steered"]["direction"]["path"].endswith("probe.npy")
    assert "## What was changed" in (first / "RESULTS.md").read_text()


def test_a_trend_needs_a_one_key_numeric_matrix(tmp_path, tiny_model_dir):
    spec = tiny_spec(tmp_path, tiny_model_dir, extra="matrix: {dataset.n_samples: [5, 6], dataset.min_tokens: [40, 41]}\n"
                                                      "sweep_criteria: {x: sweep.smoothness.overall.d.trend.rho > 0}\n")
    with pytest.raises(InputError, match="sweep_criteria.x: a trend needs a matrix of one key with numeric values"):
        expand(spec)
