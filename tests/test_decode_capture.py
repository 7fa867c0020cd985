"""Capture from generation: what the hooks measure while the model decodes equals the capture
forward over the same text (teacher forcing), through every decoding path it must survive."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, speaking_words, wikitext_rows
from test_run import Log, tiny_spec

from harness.grid import Grid, Window
from harness.session import run_spec
from harness.stages import capture, decode_capture
from harness.sources import GenerationSpec
from harness.stages.generate import generate_batch
from harness.structure import resolve_layers
from metrics import LAYER_METRICS, PROJECTION_METRICS

RTOL = 1e-5
"""fp32 on the CPU. A value that cancels (a mean of cosines near 0) is compared relative to the
largest magnitude of its column over the texts and layers."""


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Eight WikiText sentence starts of different lengths: left padding differs per row."""
    rows = [row.strip() for row in wikitext_rows(200) if len(row.split()) > 20 and not row.startswith(" =")]
    return [" ".join(row.split()[:words]) for row, words in zip(rows, (5, 9, 14, 7, 11, 6, 8, 12))]


def full_measurement(model) -> capture.Measurement:
    """Every trajectory and projection metric at every site the tiny models have, over whole
    responses and two windows, deltas of every layer kept."""
    layers = resolve_layers(model, "all")
    grid = Grid(tuple(sorted(LAYER_METRICS)) + tuple(sorted(PROJECTION_METRICS)), ("resid_post", "attn_out", "mlp_out"),
                ("probe",), (Window(0, 3), Window(2, 8)))
    torch.manual_seed(1)
    probe = torch.nn.functional.normalize(torch.randn(len(layers), model.config.hidden_size), dim=-1)
    return capture.Measurement(grid, layers, layers, directions={"probe": probe})


def generate_both_ways(model, tokenizer, prompts, spec: GenerationSpec):
    """The continuations with the hooks running, after checking they are those of a plain generate."""
    measurement = full_measurement(model)
    measured = generate_batch(model, tokenizer, "cpu", prompts, spec, seed=3, measurement=measurement)
    plain = generate_batch(model, tokenizer, "cpu", prompts, spec, seed=3)
    assert [{k: v for k, v in out.items() if k != "capture"} for out in measured] == plain
    return measured, measurement


def assert_equals_teacher_forcing(model, tokenizer, prompts, continuations, measurement) -> None:
    decoded = [i for i, out in enumerate(continuations) if out["capture"] is not None]
    assert decoded, "no continuation was measured while decoding"
    tokenized = [capture.tokenize_for_capture(tokenizer, capture.TextToMeasure(prompts[i], continuations[i]["response"])) for i in decoded]
    forward = capture.measure_batch(model, torch.device("cpu"), tokenizer.pad_token_id, tokenized, measurement)
    during = [continuations[i]["capture"] for i in decoded]
    for record, expected in zip(during, forward):
        assert record["response_ids"] == expected["response_ids"]
        assert record["n_response_tokens"] == expected["n_response_tokens"]
        assert record["layers"] == measurement.layers
    names = forward[0]["layer_metrics"]
    assert set(names) == {column.name for column in measurement.grid.columns()}
    for name in names:
        got = np.array([record["layer_metrics"][name] for record in during])
        want = np.array([record["layer_metrics"][name] for record in forward])
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        scale = np.nanmax(np.abs(want)) if np.isfinite(want).any() else 0.0
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale, equal_nan=True, err_msg=name)
    for name in forward[0]["text_metrics"]:
        got = [record["text_metrics"][name] for record in during]
        np.testing.assert_allclose(got, [record["text_metrics"][name] for record in forward], rtol=RTOL, err_msg=name)
    for record, expected in zip(during, forward):
        assert record["deltas"].keys() == expected["deltas"].keys()
        for layer, norms in expected["deltas"].items():
            np.testing.assert_allclose(record["deltas"][layer], norms, rtol=RTOL, atol=RTOL * max(norms, default=0))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_greedy_decoding_measures_what_the_forward_measures(arch, tiny_tokenizer, prompts):
    # Gemma 2 and 3 at sliding window 8 attend over fewer tokens than these texts hold
    model = speaking_words(build_tiny_model(arch, len(tiny_tokenizer)), tiny_tokenizer)
    spec = GenerationSpec(max_new_tokens=10, no_repeat_ngram_size=1)  # repeated tokens make deltas cancel
    continuations, measurement = generate_both_ways(model, tiny_tokenizer, prompts, spec)
    assert all(out["capture"] is not None for out in continuations)
    assert_equals_teacher_forcing(model, tiny_tokenizer, prompts, continuations, measurement)


@pytest.fixture(scope="module")
def llama_words(tiny_tokenizer):
    return speaking_words(build_tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer)


def test_sampled_decoding(llama_words, tiny_tokenizer, prompts):
    spec = GenerationSpec(max_new_tokens=10, temperature=0.8, top_k=5, seed=7)
    continuations, measurement = generate_both_ways(llama_words, tiny_tokenizer, prompts, spec)
    assert_equals_teacher_forcing(llama_words, tiny_tokenizer, prompts, continuations, measurement)


@pytest.mark.parametrize("min_new_tokens", [0, 4])
def test_eos_before_max_new_tokens_and_min_new_tokens(llama_words, tiny_tokenizer, prompts, min_new_tokens):
    model = copy.deepcopy(llama_words)
    head = model.get_output_embeddings().weight
    with torch.no_grad():  # EOS outbids the word the model picks most, wherever it would pick it
        chosen = generate_batch(model, tiny_tokenizer, "cpu", prompts, GenerationSpec(max_new_tokens=10), seed=0)
        counts = np.bincount(np.concatenate([tiny_tokenizer(out["response"], add_special_tokens=False)["input_ids"] for out in chosen]))
        head[tiny_tokenizer.eos_token_id] = 1.05 * head[int(counts.argmax())]
    spec = GenerationSpec(max_new_tokens=10, min_new_tokens=min_new_tokens)
    continuations, measurement = generate_both_ways(model, tiny_tokenizer, prompts, spec)
    stopped = [out for out in continuations if out["stopped_early"]]
    assert stopped and any(out["capture"] is not None for out in stopped)
    assert all(out["n_new_tokens"] >= min_new_tokens for out in continuations)
    assert_equals_teacher_forcing(model, tiny_tokenizer, prompts, continuations, measurement)


def test_a_text_that_does_not_round_trip_is_left_to_the_forward(tiny_tokenizer, prompts):
    """A random model's bytes decode to replacement characters: none re-tokenizes to its ids."""
    model = build_tiny_model("llama", len(tiny_tokenizer))
    continuations = generate_batch(model, tiny_tokenizer, "cpu", prompts, GenerationSpec(max_new_tokens=6), seed=0,
                                   measurement=full_measurement(model))
    assert [out["capture"] for out in continuations] == [None] * len(prompts)


def test_blockers_keep_the_forward(tmp_path, tiny_model_dir):
    from harness.spec import load_spec

    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir))
    assert decode_capture.blocker(spec, "base", compiled=False) is None
    assert "not the capture model" in decode_capture.blocker(spec, "other", compiled=False)
    assert "compiled" in decode_capture.blocker(spec, "base", compiled=True)
    for setting, word in (({"from_generation": False}, "from_generation"), ({"length_matching": True}, "length_matching"),
                          ({"response_tokenization": "separate"}, "separate"), ({"save_activations": True}, "save_activations")):
        changed = spec.model_copy(update={"capture": spec.capture.model_copy(update=setting)})
        assert word in decode_capture.blocker(changed, "base", compiled=False)


def run_table(folder, spec, log) -> tuple[list[dict], dict[tuple[str, ...], float]]:
    """texts.jsonl's rows and per_sample.csv's values by (sample, condition, layer, metric)."""
    outcome = run_spec(spec, folder / "runs", log=log)
    texts = [json.loads(line) for line in (outcome.run_dir / "texts.jsonl").read_text().splitlines()]
    with open(outcome.run_dir / "per_sample.csv", newline="") as table:
        values = {tuple(row[:4]): float(row[4]) for row in list(csv.reader(table))[1:]}
    return texts, values


def test_a_run_measures_its_generated_condition_while_decoding(tmp_path, words_model_dir, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    during_log, forward_log, rerun_log = Log(), Log(), Log()
    during_spec = tiny_spec(tmp_path, words_model_dir, "during")
    texts, during = run_table(tmp_path, during_spec, during_log)
    forward_spec = tiny_spec(tmp_path, words_model_dir, "forward", extra="capture: {from_generation: false}\n")
    forward_texts, forward = run_table(tmp_path, forward_spec, forward_log)
    assert {row["measured_by"] for row in texts if row["condition"] == "model"} == {"generation"}
    assert {row["measured_by"] for row in texts if row["condition"] == "human"} == {"forward"}
    assert {row["measured_by"] for row in forward_texts} == {"forward"}
    assert [row["response"] for row in texts] == [row["response"] for row in forward_texts]
    assert "capture[model]" not in during_log.stages("computed") and "capture[model]" in forward_log.stages("computed")
    assert any("capture[model] measured while decoding: 6 texts" in line for line in during_log)
    assert any("generate[model]" in line and "eager (runtime.compile auto: eager on a CPU)" in line for line in during_log)
    # the generation stage's key says its texts were measured in it: the forward's run generated anew
    assert "generate[model]" in forward_log.stages("computed")
    assert during.keys() == forward.keys()
    for key, value in forward.items():
        assert during[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
    run_table(tmp_path, during_spec, rerun_log)
    assert not any(stage.startswith(("generate", "capture", "load")) for stage in rerun_log.stages("computed"))
