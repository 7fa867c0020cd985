"""Report stage: diagnostics, figures and RESULTS.md of a synthetic but complete run folder."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import pearsonr

from harness.artifacts import read_jsonl, write_json, write_jsonl
from harness.inputs import read_json
from harness.stages.criteria import evaluate_criteria, to_json
from harness.diagnostics import repeated_ngram_fraction, text_diagnostics
from harness.errors import InputError
from harness.rundir import Manifest, load_run, write_manifest
from harness.stages.report import render_report
from harness.schema import Spec
from harness.stages.stats import compute_stats, load_table

N_SAMPLES, N_LAYERS = 12, 4
DELTA_LAYERS = (0, 2, 3)
PRIMARY = "human_vs_model"
WORDS = "the river flows past old stone walls and green fields under a grey sky".split()
CELLS = [["both held", "only the effect held"], ["only the correlation held", "neither held"]]
"""The verdict grid's sentences: [[both criteria passed, only the row's], [only the column's, neither]]."""


def outcome_sentence(effect: bool, correlation: bool) -> str:
    return CELLS[not effect][not correlation]


def spec_data(**overrides) -> dict:
    data = {
        "name": "synthetic",
        "description": "A synthetic run for the report tests.",
        "models": {"base": {"id": "dummy/model"}},
        "conditions": {"human": {"source": "human"}, "model": {"source": "generate"}},
        "metrics": ["smoothness", "magnitude"],
        "stats": {"bootstrap_resamples": 200},
        "criteria": {
            "model_text_smoother": "smoothness.overall.d > 0 and smoothness.overall.p < 0.05",
            "smoothness_tracks_surprise": "correlation.pooled.r > 0 and correlation.pooled.p < 0.05",
        },
        "report": {"verdict": {"rows": "model_text_smoother", "columns": "smoothness_tracks_surprise", "cells": CELLS}},
    }
    return data | overrides


def make_run(root: Path, layer_scale: dict[int, float] | None = None, ce_slope: float = 8.0, **spec_overrides) -> Path:
    """Write every file of a finished run (seeded), statistics by harness.stages.stats; return the folder.

    `layer_scale` multiplies the smoothness of some layers (a residual norm that grows with depth);
    `ce_slope` is how much smoothness rises with CE within a condition."""
    rng = np.random.default_rng(0)
    spec = Spec.model_validate(spec_data(**spec_overrides))
    run_dir = root / "runs" / spec.name / "run-1"
    run_dir.mkdir(parents=True)
    spec_file = root / "specs" / "synthetic.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))

    # Smoothness rises with CE; the human text is more surprising, the shuffled text the smoothest.
    offsets = {"human": (3.0, 10.0), "model": (1.5, 0.0), "shuffled": (4.0, -30.0)}
    rows, texts, deltas = [], [], []
    for condition in spec.conditions:
        ce_offset, smooth_offset = offsets[condition]
        for sample in range(N_SAMPLES):
            ce = ce_offset + rng.normal(0, 0.3)
            rows += [(sample, condition, "", "ce_loss", ce), (sample, condition, "", "ce_loss_response", ce + 0.1)]
            for layer in range(N_LAYERS):
                smooth = (100 + 10 * layer + smooth_offset + ce_slope * ce + rng.normal(0, 3)) * (layer_scale or {}).get(layer, 1)
                rows += [(sample, condition, layer, "smoothness", smooth), (sample, condition, layer, "magnitude", 50 + rng.normal())]
            tokens = _response_tokens(condition, sample, [" " + str(word) for word in rng.choice(WORDS, size=20 + sample)])
            texts.append(
                {
                    "sample_id": sample,
                    "condition": condition,
                    "prompt": "A first sentence.",
                    "response": "".join(tokens).strip(),
                    "n_response_tokens": len(tokens),
                    "stopped_early": sample % 3 == 0 if condition == "model" else None,
                    "generator": "base" if condition == "model" else None,
                    "tokens": tokens,
                }
            )
            for layer in DELTA_LAYERS:
                norms = rng.uniform(1, 10, size=len(tokens) - 1).tolist()
                deltas.append({"sample_id": sample, "condition": condition, "layer": layer, "tokens": tokens, "norms": norms})

    with open(run_dir / "per_sample.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample_id", "condition", "layer", "metric", "value"])
        writer.writerows(rows)
    write_jsonl(run_dir / "texts.jsonl", texts)
    write_jsonl(run_dir / "token_deltas.jsonl", deltas)
    stats = compute_stats(load_table(run_dir / "per_sample.csv"), spec)
    write_json(run_dir / "stats.json", stats)
    write_json(run_dir / "criteria.json", to_json(evaluate_criteria(spec.criteria, stats)))
    write_manifest(run_dir, Manifest(
        harness_version="0.1.0", spec_name=spec.name, spec_file=str(spec_file), spec_file_in_repo=None, spec_hash="abc123",
        run_id="run-1", started="2024-01-01T00:00:00+00:00", git_commit="deadbeef",
        packages={"torch": "2.13", "scipy": "1.0"}, processes=1, seeds={}, cache_keys={},
        models={"base": {"identity": "hub:dummy/model@abc", "source": {"kind": "hub", "id": "dummy/model", "revision": "main"}, "device": "cpu"}},
        timings={"data": 1.5, "capture[human]": 2.5}, cache={"data": "reused", "capture[human]": "computed"},
    ))
    return run_dir


def _response_tokens(condition: str, sample: int, tokens: list[str]) -> list[str]:
    if condition == "human":
        return tokens + [" ,", " 1", " @", "-", "@", " 2"]  # WikiText's tokenization
    if condition == "model" and sample % 2 == 0:
        return tokens + " the river flows past the river flows past the river".split(" ")[1:]  # a loop
    return tokens


def row_cells(markdown: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell.replace("*", ""))]


def shows(cell: str, *values: float) -> bool:
    """The cell shows these values, in order, to the 4 significant digits of the report."""
    shown = numbers(cell)
    return len(shown) == len(values) and all(s == pytest.approx(v, rel=1e-3, abs=1e-12) for s, v in zip(shown, values))


def section(markdown: str, heading: str) -> str:
    start = markdown.index(heading)
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, str, dict]:
    run_dir = make_run(tmp_path_factory.mktemp("run"))
    results = render_report(run_dir)
    return run_dir, results.read_text(encoding="utf-8"), read_json(run_dir / "stats.json")


def test_summary_table_shows_descriptives_and_primary_comparison(rendered):
    _, text, stats = rendered
    for metric, first_cell in [("ce_loss", "ce_loss"), ("ce_loss_response", "ce_loss_response"), ("smoothness", "smoothness (overall)")]:
        cells = row_cells(text, first_cell)
        assert shows(cells[1], stats[f"{metric}.human.mean"], stats[f"{metric}.human.sd"])
        assert shows(cells[2], stats[f"{metric}.model.mean"], stats[f"{metric}.model.sd"])
        paired = f"{metric}.overall"
        assert shows(cells[3], *(stats[f"{paired}.{s}"] for s in ("mean_diff", "mean_diff_ci_low", "mean_diff_ci_high")))
        assert shows(cells[4], *(stats[f"{paired}.{s}"] for s in ("d", "d_ci_low", "d_ci_high")))
        assert [shows(cells[i], stats[f"{paired}.{s}"]) for i, s in [(5, "t"), (6, "p"), (7, "wilcoxon_p"), (8, "n")]] == [True] * 4


def test_correlation_table_shows_every_scope(rendered):
    _, text, stats = rendered
    for scope, first_cell in [("pooled", "pooled (human and model)"), ("human", "human"), ("model", "model"), ("difference", "difference (human − model)")]:
        cells = row_cells(section(text, "## Correlation"), first_cell)
        prefix = f"correlation.{scope}"
        assert shows(cells[1], stats[f"{prefix}.r"], stats[f"{prefix}.ci_low"], stats[f"{prefix}.ci_high"])
        assert shows(cells[2], stats[f"{prefix}.p"]) and shows(cells[3], stats[f"{prefix}.n"])


def test_per_layer_table_marks_holm_significant_layers(rendered):
    _, text, stats = rendered
    table = section(text, "## Per-layer")
    for layer in range(N_LAYERS):
        prefix = f"smoothness.layer{layer}"
        significant = stats[f"{prefix}.p_holm"] < 0.05
        cells = row_cells(table, f"**{layer}**" if significant else str(layer))
        expected = [stats[f"{prefix}.{s}"] for s in ("mean_a", "mean_b", "mean_diff")]
        assert [shows(cell, value) for cell, value in zip(cells[1:4], expected)] == [True] * 3
        assert shows(cells[4], stats[f"{prefix}.d"], stats[f"{prefix}.d_ci_low"], stats[f"{prefix}.d_ci_high"])
        assert shows(cells[5], stats[f"{prefix}.p"]) and shows(cells[6], stats[f"{prefix}.p_holm"]) and shows(cells[7], stats[f"{prefix}.p_bh"])
        assert cells[6].startswith("**") == significant


def test_verdict_follows_the_criteria(rendered):
    _, text, stats = rendered
    effect = stats["smoothness.overall.d"] > 0 and stats["smoothness.overall.p"] < 0.05
    correlation = stats["correlation.pooled.r"] > 0 and stats["correlation.pooled.p"] < 0.05
    verdict = section(text, "## Verdict")
    assert f"**{outcome_sentence(effect, correlation)}.**" in verdict
    assert f"**▶ {outcome_sentence(effect, correlation)}**" in verdict
    assert verdict.count("▶") == 1


@pytest.mark.parametrize(
    "d, p, r, r_p",
    [(1.2, 0.001, 0.6, 0.001), (1.2, 0.001, -0.1, 0.6), (0.1, 0.5, 0.6, 0.001), (-1.0, 0.001, 0.1, 0.5)],
)
def test_each_outcome_is_chosen_by_the_numbers(tmp_path, d, p, r, r_p):
    run_dir = make_run(tmp_path, report={"plots": False, "verdict": spec_data()["report"]["verdict"]})
    stats = read_json(run_dir / "stats.json")
    for prefix in ("", f"{PRIMARY}."):
        stats |= {f"{prefix}smoothness.overall.d": d, f"{prefix}smoothness.overall.p": p}
        stats |= {f"{prefix}correlation.pooled.r": r, f"{prefix}correlation.pooled.p": r_p}
    write_json(run_dir / "stats.json", stats)
    write_json(run_dir / "criteria.json", to_json(evaluate_criteria(spec_data()["criteria"], stats)))
    verdict = section(render_report(run_dir).read_text(), "## Verdict")
    assert f"**▶ {outcome_sentence(d > 0 and p < 0.05, r > 0 and r_p < 0.05)}**" in verdict
    assert ("significant in the opposite direction" in verdict) == (d < 0 and p < 0.05)


def test_without_a_verdict_grid_the_report_says_so(tmp_path):
    text = render_report(make_run(tmp_path, report={"plots": False})).read_text()
    assert "▶" not in text and "the spec defines no verdict grid" in section(text, "## Verdict")


def test_plots_are_written_and_embedded(rendered):
    run_dir, text, _ = rendered
    pngs = sorted(path.name for path in run_dir.glob("*.png"))
    assert len(pngs) == 5  # no windows, no directions: neither their heatmap nor their projection panels
    assert "per_sample_by_condition.png" in pngs
    for name in pngs:
        assert (run_dir / name).stat().st_size > 10_000
        assert f"]({name})" in text


def test_plots_off_draws_nothing(tmp_path):
    run_dir = make_run(tmp_path, report={"plots": False})
    text = render_report(run_dir).read_text()
    assert not list(run_dir.glob("*.png"))
    assert "![" not in text


def test_token_attribution_shows_the_largest_steps(rendered):
    run_dir, text, _ = rendered
    run = load_run(run_dir)
    middle = sorted(DELTA_LAYERS)[len(DELTA_LAYERS) // 2]
    for condition in ("human", "model"):
        rows = [r for r in run.token_deltas if r["layer"] == middle and r["condition"] == condition]
        norm, row, step = max((n, r, i) for r in rows for i, n in enumerate(r["norms"]))
        cells = row_cells(section(text, "## Token-level attribution").split(f"**{condition}**")[1], str(row["sample_id"]))
        assert int(cells[1]) == step + 1 and shows(cells[2], norm)
        assert f"**{row['tokens'][step + 1].strip()}**" in cells[3]


def threat_lines(text: str) -> list[str]:
    """The verdict section's list of the threats that fired."""
    verdict = section(text, "## Verdict")
    return [line for line in verdict.splitlines() if line.startswith("- ⚠ [")]


def test_one_layer_with_a_huge_norm_is_a_threat_named_beside_the_verdict(tmp_path, rendered):
    run_dir = make_run(tmp_path, layer_scale={2: 1000.0}, report={"plots": False})
    text, stats = render_report(run_dir).read_text(), read_json(run_dir / "stats.json")
    assert stats["smoothness.layers.share_of_overall_max"] > 0.99
    layers = section(text, "## Threats").split("threat-layers")[1].split("\n- ")[0]
    assert "⚠ **Layer weight**" in layers and "layers 2 " in layers  # a quarter of 4 layers: the one
    assert any("(#threat-layers)" in line and "Layers 2 (1 of 4)" in line for line in threat_lines(text))
    assert not any("(#threat-layers)" in line for line in threat_lines(rendered[1]))  # layers of like size


def test_verdict_names_its_statistics_and_the_other_criteria_as_findings(tmp_path):
    criteria = spec_data()["criteria"] | {"pairs": "correlation.difference.r > 0 and correlation.difference.p < 0.05"}
    run_dir = make_run(tmp_path, criteria=criteria, report=spec_data()["report"] | {"plots": False})
    text, stats = render_report(run_dir).read_text(), read_json(run_dir / "stats.json")
    verdict = section(text, "## Verdict")
    assert "`smoothness_tracks_surprise` (`correlation.pooled.r`, `correlation.pooled.p`)" in verdict
    passed = stats["correlation.difference.r"] > 0 and stats["correlation.difference.p"] < 0.05
    assert f"**{'PASSED' if passed else 'FAILED'}** pairs (`correlation.difference.r` = " in verdict
    assert shows(verdict.split("Correlation of the pairs' differences")[1].split("\n")[0],
                 stats["correlation.difference.r"], stats["correlation.difference.p"])


def disagreeing_scopes(stats: dict) -> list[str]:
    pooled_significant = stats["correlation.pooled.p"] < 0.05
    return [scope for scope in ("human", "model", "difference")
            if (stats[f"correlation.{scope}.r"] > 0) != (stats["correlation.pooled.r"] > 0)
            or (stats[f"correlation.{scope}.p"] < 0.05) != pooled_significant]


def test_a_pooled_correlation_made_by_the_condition_gap_is_a_threat(tmp_path, rendered):
    assert disagreeing_scopes(rendered[2]) == []  # smoothness follows CE within each condition too
    assert not any("(#threat-correlations)" in line for line in threat_lines(rendered[1]))
    run_dir = make_run(tmp_path, ce_slope=0.0, report=spec_data()["report"] | {"plots": False})
    text, stats = render_report(run_dir).read_text(), read_json(run_dir / "stats.json")
    disagree = disagreeing_scopes(stats)
    assert stats["correlation.pooled.p"] < 0.05 and disagree  # only the gap between the conditions
    assert any("(#threat-correlations)" in line and ", ".join(disagree) in line for line in threat_lines(text))
    assert "can come from the gap between the conditions alone" in section(text, "## Threats")


def test_the_most_influential_sample_is_named_and_a_threat_above_the_threshold(tmp_path):
    run_dir = make_run(tmp_path, report=spec_data()["report"] | {"plots": False, "threats": {"influence": 0.0}})
    text, stats = render_report(run_dir).read_text(), read_json(run_dir / "stats.json")
    sample = int(stats["smoothness.overall.d_loo_max_change_sample"])
    assert f"sample {sample}: d = " in section(text, "## Threats")
    assert any("(#threat-influence)" in line and f"Sample {sample} alone" in line for line in threat_lines(text))


def test_threats_and_manifest(tmp_path):
    run_dir = make_run(
        tmp_path,
        conditions={"human": {"source": "human"}, "model": {"source": "generate"}, "shuffled": {"source": "shuffle", "of": "human"}},
        stats={"bootstrap_resamples": 200, "mixed_model": False,
               "comparisons": {"human_vs_model": {"a": "human", "b": "model"}, "human_vs_shuffled": {"a": "human", "b": "shuffled"}}},
        report={"threats": {"control_must_not_be": "lowest"}},
    )
    text = render_report(run_dir).read_text()
    stats = read_json(run_dir / "stats.json")
    assert "the control condition `shuffled` has the lowest mean smoothness of all conditions" in text.replace("\n> ", " ")
    assert "Length matching was **off**" in text
    assert "**Mixed model**: not fitted." in text
    cells = row_cells(section(text, "### Comparison human_vs_shuffled"), "smoothness (overall)")
    assert shows(cells[5], stats["human_vs_shuffled.smoothness.overall.t"])
    assert "shuffled (shuffle)" in text and "| capture[human] | 2.5 | computed |" in text
    assert "deadbeef" in text and "revision = `main`" in text and "ran on `cpu`" in text


def test_custom_template_path(rendered, tmp_path):
    run_dir, _, _ = rendered
    template = tmp_path / "mine.md.j2"
    template.write_text("# {{ title }}: {{ verdict.text }}\n")
    text = render_report(run_dir, template).read_text()
    assert text.startswith("# synthetic: ") and text.strip().endswith(tuple(sum(CELLS, [])))


def test_spec_template_relative_to_spec_file(tmp_path):
    run_dir = make_run(tmp_path, report={"template": "local.md.j2", "plots": False})
    (tmp_path / "specs" / "local.md.j2").write_text("local {{ metric }}\n")
    assert render_report(run_dir).read_text() == "local smoothness\n"


def test_missing_template_is_an_input_error(tmp_path):
    run_dir = make_run(tmp_path, report={"template": "nope.md.j2", "plots": False})
    with pytest.raises(InputError, match=r"synthetic\.yaml: report\.template: template 'nope\.md\.j2' not found"):
        render_report(run_dir)
    assert not (run_dir / "RESULTS.md").exists()


def test_broken_template_is_an_input_error(tmp_path):
    template = tmp_path / "broken.j2"
    template.write_text("{{ no_such_value }}\n")
    with pytest.raises(InputError, match="broken.j2"):
        render_report(make_run(tmp_path, report={"plots": False}), template)


# --- diagnostics --------------------------------------------------------------------------


def test_repeated_ngram_fraction_of_a_loop():
    # 12 tokens, 9 four-grams; the last 3 repeat the first 3.
    assert repeated_ngram_fraction("the cat sat on the mat the cat sat on the mat".split(), 4) == pytest.approx(3 / 9)
    assert repeated_ngram_fraction("no repeats in these words here".split(), 4) == 0
    assert repeated_ngram_fraction(["too", "short"], 4) == 0


def test_a_digit_loop_repeats_in_tokens_though_it_is_one_word():
    tokens = [" 12", " ironclads", " and", " ", *"12" + "0" * 40]  # digits are tokens of their own
    assert repeated_ngram_fraction(tokens) > 0.7
    assert repeated_ngram_fraction(" 12 ironclads and 12000000000000000000000000000000000000000000".split()) == 0


def test_text_diagnostics_per_condition(rendered):
    run = load_run(rendered[0])
    diagnostics = text_diagnostics(run.texts, run.table, run.spec)
    for condition in ("human", "model"):
        texts = [t for t in run.texts if t["condition"] == condition]
        got = diagnostics["conditions"][condition]
        fractions = [repeated_ngram_fraction(t["tokens"]) for t in texts]
        assert got["repeated_ngram_fraction"] == pytest.approx({"mean": np.mean(fractions), "max": max(fractions)})
        lengths = [t["n_response_tokens"] for t in texts]
        assert got["response_tokens"] == pytest.approx({"mean": np.mean(lengths), "min": min(lengths), "max": max(lengths)})
        rows = run.table[(run.table["condition"] == condition) & (run.table["metric"] == "smoothness")]
        smoothness = [rows[rows["sample_id"] == str(t["sample_id"])]["value"].mean() for t in texts]
        assert got["repetition_vs_metric"]["n"] == N_SAMPLES
        if condition == "model":  # the human texts never loop: see the next test
            assert got["repetition_vs_metric"]["r"] == pytest.approx(pearsonr(fractions, smoothness).statistic)
    human, model = diagnostics["conditions"]["human"], diagnostics["conditions"]["model"]
    assert human["stopped_early_share"] is None
    assert model["stopped_early_share"] == pytest.approx(4 / 12)  # samples 0, 3, 6, 9
    assert human["artifact_share"] == {"line_breaks": 0.0, "wikitext_at_tokens": 1.0, "space_before_punctuation": 1.0}
    assert model["artifact_share"]["wikitext_at_tokens"] == 0.0


def test_repetition_association_undefined_for_constant_repetition(rendered):
    run = load_run(rendered[0])
    diagnostics = text_diagnostics(run.texts, run.table, run.spec)
    # The human texts never loop: r is undefined, and None keeps the output valid JSON.
    assert diagnostics["conditions"]["human"]["repetition_vs_metric"]["r"] is None
    assert not math.isnan(diagnostics["conditions"]["model"]["repetition_vs_metric"]["r"])


def test_renders_without_optional_stats(tmp_path):
    run_dir = make_run(tmp_path, criteria={}, report={"plots": False})
    stats = read_json(run_dir / "stats.json")
    optional = ("mixedlm.", "_ci_", ".ci_", "correlation.")
    write_json(run_dir / "stats.json", {k: v for k, v in stats.items() if not any(part in k for part in optional)})
    text = render_report(run_dir).read_text()
    assert "**Mixed model**: not fitted." in text
    assert shows(row_cells(text, "smoothness (overall)")[4], stats["smoothness.overall.d"])  # the interval shows as –
    assert "[–, –]" in row_cells(text, "smoothness (overall)")[4]
    assert "The pooled correlation was not computed" in text


def test_the_report_stage_draws_once_and_renders_every_time(tmp_path):
    """A second publish of unchanged data reuses the figures, diagnostics and context; RESULTS.md is
    still rendered (a changed template shows at once); changed data draws anew."""
    from harness.cache import StageCache
    from harness.executor import Executor
    from harness.stages.report import report_parts
    from harness.stages.report_stage import publish_report

    run_dir = make_run(tmp_path)
    log: list[str] = []
    executor = Executor(StageCache(tmp_path / "cache"), log.append)
    first = publish_report(executor, run_dir, report_parts, None).read_text(encoding="utf-8")
    figures = {path.name: path.read_bytes() for path in run_dir.glob("*.png")}
    for path in run_dir.glob("*.png"):
        path.unlink()
    again = Executor(StageCache(tmp_path / "cache"), log.append)
    assert publish_report(again, run_dir, report_parts, None).read_text(encoding="utf-8") == first
    assert again.reuse["report"] == "reused" and executor.reuse["report"] == "computed"
    assert figures and {path.name: path.read_bytes() for path in run_dir.glob("*.png")} == figures
    template = tmp_path / "mine.md.j2"
    template.write_text("{{ run_id }}: {{ verdict.text }}\n")
    assert publish_report(again, run_dir, report_parts, template).read_text().startswith("run-1: ")
    spec_file = run_dir / "spec.yaml"
    spec_file.write_text(spec_file.read_text().replace("A synthetic run", "A synthetic rerun"))
    publish_report(again, run_dir, report_parts, None)
    assert again.reuse["report"] == "computed"


def test_a_reused_report_context_keeps_its_nan_numbers_and_its_texts(tmp_path):
    """The report read back from the cache renders as the computed one did: its NaN numbers are
    numbers (a mixed model that did not converge has NaN coefficients) and a token spelled "inf"
    is still a text."""
    from harness.cache import StageCache
    from harness.executor import Executor
    from harness.stages.report import report_parts
    from harness.stages.report_stage import publish_report

    run_dir = make_run(tmp_path, report={"plots": False})
    stats = read_json(run_dir / "stats.json")
    write_json(run_dir / "stats.json", {k: (math.nan if k.endswith(("mixedlm.x_coef", "mixedlm.x_p")) else v)
                                        for k, v in stats.items()})
    deltas = run_dir / "token_deltas.jsonl"
    write_jsonl(deltas, [row | {"tokens": ["inf"] * len(row["tokens"])} for row in read_jsonl(deltas)])
    first = publish_report(Executor(StageCache(tmp_path / "cache"), print), run_dir, report_parts, None).read_text()
    assert "**inf**" in first  # the attributed token
    again = Executor(StageCache(tmp_path / "cache"), print)
    assert publish_report(again, run_dir, report_parts, None).read_text() == first
    assert again.reuse["report"] == "reused"
