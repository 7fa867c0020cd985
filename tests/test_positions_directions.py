"""Position windows and projections onto direction sets, end to end on a tiny local model: the
metrics recomputed by hand from saved float32 activations, their statistic names in criteria,
the windows x layers correction, and `harness directions` with a held-out split."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from statsmodels.stats.multitest import multipletests

from harness import listing
from harness.session import run_spec

REPO = Path(__file__).resolve().parent.parent
WINDOWS = [(0, 3), (3, 8), (8, 400)]


def spec_file(folder: Path, model_dir: Path, name: str, directions: str, extra: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        name: {name}
        models:
          base: {{id: "{model_dir}"}}
        dataset: {{n_samples: 8, min_tokens: 40, max_tokens: 400}}
        conditions:
          human: {{source: human}}
          model: {{source: generate, generation: {{max_new_tokens: 12}}}}
        capture: {{save_activations: true, activation_dtype: float32, windows: {[list(w) for w in WINDOWS]}}}
        metrics: [smoothness, projection_variance, projection_smoothness, projection_mean]
        directions: {directions}
        stats: {{bootstrap_resamples: 50, mixed_model: false}}
        runtime: {{generation_batch_size: 8, token_budget: 600}}
    """) + textwrap.dedent(extra))
    return path


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory, tiny_model_dir):
    """A run with windows and a random direction per layer (and one vector for all layers)."""
    folder = tmp_path_factory.mktemp("probed")
    generator = np.random.default_rng(0)
    np.save(folder / "probe.npy", generator.normal(size=(3, 32)).astype(np.float32))
    torch.save(torch.tensor(generator.normal(size=32), dtype=torch.float32), folder / "shared.pt")
    spec = spec_file(folder, tiny_model_dir, "probed", "{probe: {path: probe.npy}, shared: {path: shared.pt}}", """
        criteria:
          early_window_defined: smoothness.window0_3.overall.n > 0
          probe_moves: projection_variance.probe.layer1.d > -100
    """)
    outcome = run_spec(spec, folder / "runs", log=lambda line: None)
    return folder, outcome


def table(run_dir: Path) -> dict[tuple[str, str, str, str], float]:
    with (run_dir / "per_sample.csv").open() as handle:
        return {(r["sample_id"], r["condition"], r["layer"], r["metric"]): float(r["value"]) for r in csv.DictReader(handle)}


def activations(run_dir: Path, condition: str) -> dict[str, np.ndarray]:
    with safe_open(str(run_dir / "activations" / f"{condition}.safetensors"), "np") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_window_smoothness_and_projections_recomputed_from_saved_activations(probed_run):
    folder, outcome = probed_run
    values = table(outcome.run_dir)
    probe = np.load(folder / "probe.npy").astype(np.float64)
    shared = torch.load(folder / "shared.pt").double().numpy()
    checked = 0
    for condition in ("human", "model"):
        for sample, acts in activations(outcome.run_dir, condition).items():
            assert acts.dtype == np.float32
            for layer in range(3):
                tokens = acts[layer].astype(np.float64)  # [response tokens, d]
                start, end = WINDOWS[1]
                window = tokens[start:end]
                if len(window) >= 2:
                    by_hand = np.linalg.norm(np.diff(window, axis=0), axis=1).mean()
                    stored = values[sample, condition, str(layer), "smoothness.window3_8"]
                    assert abs(stored - by_hand) / by_hand < 1e-5
                    checked += 1
                for name, vector in (("probe", probe[layer]), ("shared", shared)):
                    projection = tokens @ (vector / np.linalg.norm(vector))
                    expected = {
                        "projection_variance": projection.var(),
                        "projection_mean": projection.mean(),
                        "projection_smoothness": np.abs(np.diff(projection)).mean(),
                    }
                    for metric, by_hand in expected.items():
                        stored = values[sample, condition, str(layer), f"{metric}.{name}"]
                        assert abs(stored - by_hand) <= 1e-5 * abs(by_hand) + 1e-6, (metric, name, stored, by_hand)
    assert checked > 0


def test_a_text_that_does_not_reach_a_window_has_no_value_there(probed_run):
    _, outcome = probed_run
    values = table(outcome.run_dir)
    texts = [json.loads(line) for line in (outcome.run_dir / "texts.jsonl").read_text().splitlines()]
    for text in texts:
        key = (str(text["sample_id"]), text["condition"], "0", "smoothness.window8_400")
        assert (key in values) == (text["n_response_tokens"] >= 10)  # two tokens at 8 and 9 give one step


def test_window_and_direction_statistics_are_named_and_corrected_across_windows_and_layers(probed_run):
    folder, outcome = probed_run
    stats = json.loads((outcome.run_dir / "stats.json").read_text())
    for name in ("smoothness.window0_3.overall.d", "smoothness.window3_8.layer2.p", "projection_variance.probe.layer1.d",
                 "projection_mean.shared.window0_3.layer0.d", "projection_smoothness.probe.human.mean"):
        assert name in stats, name
    family = [f"smoothness.{window}.layer{layer}.p" for window in ("window0_3", "window3_8", "window8_400") for layer in range(3)]
    family = [name for name in family if stats[name] != "nan"]
    holm = multipletests([stats[name] for name in family], method="holm")[1]
    assert [stats[name.removesuffix(".p") + ".p_holm"] for name in family] == pytest.approx(holm, rel=1e-12)
    results = {result.name: result for result in outcome.results}
    assert results["early_window_defined"].passed and results["probe_moves"].error is None
    # `harness ls stats` of the spec lists every name its run wrote
    assert set(listing.stats(outcome.run_dir)) <= set(listing.stats(folder / "probed.yaml"))


def test_direction_sha256_is_in_the_manifest_and_the_capture_key(probed_run, tiny_model_dir):
    import hashlib

    folder, outcome = probed_run
    manifest = json.loads((outcome.run_dir / "manifest.json").read_text())
    assert manifest["directions"]["probe"]["sha256"] == hashlib.sha256((folder / "probe.npy").read_bytes()).hexdigest()
    assert manifest["directions"]["shared"]["shape"] == [32]
    changed = folder / "changed"
    changed.mkdir()
    np.save(changed / "probe.npy", np.load(folder / "probe.npy") * 2)  # the same unit vectors, another file
    torch.save(torch.load(folder / "shared.pt"), changed / "shared.pt")
    spec = spec_file(changed, tiny_model_dir, "probed", "{probe: {path: probe.npy}, shared: {path: shared.pt}}")
    lines: list[str] = []
    run_spec(spec, folder / "runs", log=lines.append)
    assert any(line.split()[:2] == ["capture[human]", "computed"] for line in lines)


def test_harness_directions_builds_a_difference_of_means_tested_on_held_out_samples(probed_run, tiny_model_dir):
    folder, outcome = probed_run
    output = folder / "model_minus_human.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "harness", "directions", str(outcome.run_dir), "--a", "model", "--b", "human",
         "--split", "first_half", "-o", str(output)], cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    model, human = activations(outcome.run_dir, "model"), activations(outcome.run_dir, "human")
    first_half = sorted(map(int, model))[:4]
    by_hand = np.mean([model[str(s)].mean(axis=1) for s in first_half], axis=0) - np.mean(
        [human[str(s)].mean(axis=1) for s in first_half], axis=0
    )
    with safe_open(str(output), "np") as handle:
        np.testing.assert_allclose(handle.get_tensor("direction"), by_hand, rtol=1e-5, atol=1e-6)
        assert handle.metadata()["samples"] == ",".join(map(str, first_half))

    spec = spec_file(folder, tiny_model_dir, "held_out", f"{{built: {{path: {output.name}, evaluate_on: held_out}}}}",
                     "criteria: {held_out_effect: projection_mean.built.overall.d > 0}\n")
    run = run_spec(spec, folder / "runs", log=lambda line: None)
    samples = {key[0] for key in table(run.run_dir) if key[3] == "projection_mean.built"}
    assert samples == {"4", "5", "6", "7"}  # only the samples that did not build it
    stats = json.loads((run.run_dir / "stats.json").read_text())
    assert stats["projection_mean.built.overall.n"] == 4 and stats["smoothness.overall.n"] == 8
    manifest = json.loads((run.run_dir / "manifest.json").read_text())
    assert manifest["directions"]["built"]["metadata"]["split"] == "first_half"
    report = (run.run_dir / "RESULTS.md").read_text()
    assert "split `first_half`, samples 0–3." in report and "(`evaluate_on: held_out`)" in report


def test_harness_directions_never_overwrites_a_run_or_an_existing_file(probed_run):
    folder, outcome = probed_run
    saved = outcome.run_dir / "activations" / "model.safetensors"
    before = saved.read_bytes()
    existing = folder / "mine.safetensors"
    existing.write_bytes(b"keep me")
    for output, expected in ((saved, "inside the run folder"), (existing, "exists; pass --force"),
                             (folder / "new" / "d.safetensors", "does not exist")):
        done = subprocess.run(
            [sys.executable, "-m", "harness", "directions", str(outcome.run_dir), "--a", "model", "--b", "human",
             "--force" if output == saved else "--split=all", "-o", str(output)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 2 and expected in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert saved.read_bytes() == before and existing.read_bytes() == b"keep me" and not (folder / "new").exists()


def test_the_report_embeds_the_window_heatmap_the_violins_and_the_projection_bands(probed_run):
    _, outcome = probed_run
    report = (outcome.run_dir / "RESULTS.md").read_text()
    for figure in ("effect_by_window_and_layer.png", "per_sample_by_condition.png", "projection_by_layer.png"):
        assert f"]({figure})" in report and (outcome.run_dir / figure).stat().st_size > 10_000, figure
    assert "### Response tokens 3–8 (`window3_8`)" in report and "### `probe`" in report
    stats = json.loads((outcome.run_dir / "stats.json").read_text())
    row = next(line for line in report.splitlines() if line.startswith("| projection_variance.probe |"))
    assert f"{stats['projection_variance.probe.overall.n']:.4g} |" in row
