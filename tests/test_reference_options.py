"""The options that reproduce the reference implementation's procedure (README: "Differences
from the reference implementation"): each one does what it says, and the reference specs set
every one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from harness import structure
from harness.errors import InputError
from harness.grid import Grid
from harness.schema import Spec
from harness.spec import load_spec
from harness.stages import capture, generate
from harness.sources import GenerationSpec
from harness.metrics import LAYER_METRICS

REPO = Path(__file__).resolve().parent.parent
TEXTS = [
    capture.TextToMeasure("The game began development in 2010.", "It carried over a large portion of the work."),
    capture.TextToMeasure("Robert Boulter is an English actor.", "He had a guest role in 2000, then a starring role."),
]
REFERENCE_OPTIONS = {
    "dataset": {"first_sentence": "skip"},
    "capture": {"response_tokenization": "separate"},
    "generation": {"top_k": 50, "min_new_tokens": 0},
    "metric_options": {"variance": {"ddof": 1}},
    "stats": {"ddof": 0},
}


def test_separate_tokenization_concatenates_prompt_and_response_tokenized_apart(tiny_tokenizer):
    for text in TEXTS:
        joint = capture.tokenize_for_capture(tiny_tokenizer, text, "joint")
        separate = capture.tokenize_for_capture(tiny_tokenizer, text, "separate")
        prompt_ids = tiny_tokenizer(text.prompt)["input_ids"]
        assert prompt_ids[0] == tiny_tokenizer.bos_token_id
        assert separate.input_ids[: separate.response_start] == prompt_ids == joint.input_ids[: joint.response_start]
        # the response without its leading space (the reference's), versus " " + response as read in context
        assert tiny_tokenizer.decode(separate.input_ids[separate.response_start :]) == text.response
        assert tiny_tokenizer.decode(joint.input_ids[joint.response_start :]) == " " + text.response
        assert separate.input_ids[separate.response_start :] != joint.input_ids[joint.response_start :]


def test_separate_tokenization_honours_the_length_cap(tiny_tokenizer):
    capped = capture.TextToMeasure(TEXTS[0].prompt, TEXTS[0].response, max_response_tokens=3)
    tokenized = capture.tokenize_for_capture(tiny_tokenizer, capped, "separate")
    assert len(tokenized.input_ids) - tokenized.response_start == 3


@pytest.mark.parametrize("ddof", [0, 1])
def test_variance_ddof_matches_torch_var(ddof):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 16, generator=generator) * 5
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for row, (start, stop) in enumerate([(0, 9), (2, 7), (4, 6)]):  # contiguous responses of 9, 5, 2 tokens
        mask[row, start:stop] = True
    values = LAYER_METRICS["variance"](hidden, mask, ddof=ddof)
    for row in range(3):
        norms = hidden[row][mask[row]].norm(dim=-1)
        torch.testing.assert_close(values[row], torch.var(norms, correction=ddof), rtol=1e-5, atol=1e-6)


def test_measure_batch_passes_metric_options(tiny_model, tiny_tokenizer):
    tokenized = [capture.tokenize_for_capture(tiny_tokenizer, text) for text in TEXTS]
    layers = structure.resolve_layers(tiny_model, "all")

    def variances(options):
        measurement = capture.Measurement(Grid(("variance",)), layers, metric_options=options or {})
        records = capture.measure_batch(tiny_model, torch.device("cpu"), tiny_tokenizer.pad_token_id, tokenized, measurement)
        return [(torch.tensor(r["layer_metrics"]["variance"]), r["n_response_tokens"]) for r in records]

    for (population, n), (unbiased, _) in zip(variances(None), variances({"variance": {"ddof": 1}})):
        torch.testing.assert_close(unbiased, population * n / (n - 1), rtol=1e-5, atol=1e-7)


def test_top_k_defaults_to_the_library_default_and_zero_means_no_cut(tiny_tokenizer):
    library_default = GenerationConfig._get_default_generation_params()["top_k"]
    sampled = generate.generation_kwargs(GenerationSpec(temperature=0.7), tiny_tokenizer)
    assert sampled["top_k"] == library_default
    assert generate.generation_kwargs(GenerationSpec(temperature=0.7, top_k=0), tiny_tokenizer)["top_k"] == 0
    assert generate.generation_kwargs(GenerationSpec(), tiny_tokenizer)["top_k"] is None  # greedy: no sampling settings


def test_min_new_tokens_zero_leaves_it_unset(tiny_tokenizer):
    assert generate.generation_kwargs(GenerationSpec(), tiny_tokenizer)["min_new_tokens"] == 1
    assert generate.generation_kwargs(GenerationSpec(min_new_tokens=0), tiny_tokenizer)["min_new_tokens"] is None


def reference_options(spec: Spec) -> dict:
    return {
        "dataset": {"first_sentence": spec.dataset.first_sentence},
        "capture": {"response_tokenization": spec.capture.response_tokenization},
        "generation": {
            "top_k": spec.conditions["model"].generation.top_k,
            "min_new_tokens": spec.conditions["model"].generation.min_new_tokens,
        },
        "metric_options": spec.metric_options,
        "stats": {"ddof": spec.stats.ddof},
    }


@pytest.mark.parametrize("name, plain", [("baseline-reference", "baseline"), ("quickstart-reference", "quickstart")])
def test_reference_specs_set_every_option_and_nothing_else(name, plain):
    reference, original = load_spec(REPO / "specs" / f"{name}.yaml"), load_spec(REPO / "specs" / f"{plain}.yaml")
    assert reference_options(reference) == REFERENCE_OPTIONS
    assert reference_options(original) != REFERENCE_OPTIONS
    generation = original.conditions["model"].generation.model_copy(update=REFERENCE_OPTIONS["generation"])
    model_condition = original.conditions["model"].model_copy(update={"generation": generation})
    rebuilt = original.model_copy(
        update={
            "name": reference.name,
            "description": reference.description,
            "dataset": original.dataset.model_copy(update=REFERENCE_OPTIONS["dataset"]),
            "capture": original.capture.model_copy(update=REFERENCE_OPTIONS["capture"]),
            "conditions": {**original.conditions, "model": model_condition},
            "metric_options": REFERENCE_OPTIONS["metric_options"],
            "stats": original.stats.model_copy(update=REFERENCE_OPTIONS["stats"]),
        }
    )
    assert rebuilt.model_dump() == reference.model_dump()


@pytest.mark.parametrize(
    "options, message",
    [
        ("{smoothness: {ddof: 1}}", "metric_options.smoothness: takes no options"),
        ("{variance: {ddof: 2}}", "metric_options.variance.ddof: "),
        ("{variance: {dof: 1}}", "metric_options.variance.dof: unknown key"),
        ("{magnitude: {}}", "metric_options.magnitude: takes no options"),
    ],
)
def test_bad_metric_options_name_the_field(tmp_path, options, message):
    path = tmp_path / "spec.yaml"
    path.write_text(f"extends: {REPO / 'specs' / 'quickstart.yaml'}\nmetric_options: {options}\n", encoding="utf-8")
    with pytest.raises(InputError, match=f"^{path}: {message}"):
        load_spec(path)


def test_options_of_a_metric_not_measured_are_an_error(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"extends: {REPO / 'specs' / 'quickstart.yaml'}\nmetrics: [smoothness]\n"
        "metric_options: {variance: {ddof: 1}}\n",
        encoding="utf-8",
    )
    with pytest.raises(InputError, match=f"^{path}: metric_options.variance: 'variance' is not in metrics"):
        load_spec(path)
