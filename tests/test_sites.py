"""Capture sites: attn_out / mlp_out are what each sublayer adds to the residual stream, found
per architecture; spec names and statistic names for non-default sites."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from harness.errors import InputError
from harness.grid import Grid
from harness.spec import load_spec
from harness.stages import capture
from harness.stages.sites import UnknownArchitecture
from harness.metrics import LAYER_METRICS
from conftest import REPO
from test_capture import TEXTS

SUBLAYER_MODULES = {  # read off each architecture's decoder-layer forward in transformers
    "LlamaForCausalLM": {"attn_out": "self_attn", "mlp_out": "mlp"},
    "Gemma2ForCausalLM": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "Gemma3ForCausalLM": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
}


def hooked_outputs(model, modules, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each module's output ([T, d], the first element of a tuple) for one text."""
    outputs: list[torch.Tensor] = [None] * len(modules)

    def keep(index: int):
        def hook(module, args, output):
            outputs[index] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()

        return hook

    handles = [module.register_forward_hook(keep(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def numpy_metrics(states: np.ndarray) -> dict[str, float]:
    """Smoothness and magnitude of one layer's response tokens [T, d], in float64."""
    states = states.astype(np.float64)
    return {
        "smoothness": np.linalg.norm(np.diff(states, axis=0), axis=1).mean(),
        "magnitude": np.linalg.norm(states, axis=1).mean(),
    }


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_sublayer_sites_equal_hooks_on_the_modules(tiny_model, tiny_tokenizer, site):
    blocks = tiny_model.model.layers
    modules = [getattr(block, SUBLAYER_MODULES[type(tiny_model).__name__][site]) for block in blocks]
    for text in TEXTS[:2]:
        tokenized = capture.tokenize_for_capture(tiny_tokenizer, text)
        measurement = capture.Measurement(Grid(("smoothness", "magnitude"), sites=(site,)), list(range(len(blocks))))
        record = capture.measure_batch(tiny_model, torch.device("cpu"), tiny_tokenizer.pad_token_id, [tokenized], measurement)[0]
        direct = hooked_outputs(tiny_model, modules, torch.tensor([tokenized.input_ids]))
        for layer, states in enumerate(direct):
            expected = numpy_metrics(states[tokenized.response_start :].numpy())
            for metric, value in expected.items():
                captured = record["layer_metrics"][f"{metric}_{site}"][layer]
                assert captured == pytest.approx(value, rel=1e-5), (site, layer, metric)


def test_residual_stream_is_the_sum_of_the_sublayer_outputs(tiny_model, tiny_tokenizer):
    ids = torch.tensor([capture.tokenize_for_capture(tiny_tokenizer, TEXTS[0]).input_ids])
    resid, attn, mlp = (hooked_outputs(tiny_model, capture.site_modules(tiny_model, site), ids)
                        for site in ("resid_post", "attn_out", "mlp_out"))
    for layer in range(1, len(resid)):
        torch.testing.assert_close(resid[layer], resid[layer - 1] + attn[layer] + mlp[layer], rtol=1e-5, atol=1e-6)


def test_sites_add_columns_and_leave_the_default_unchanged(tiny_model, tiny_tokenizer):
    tokenized = [capture.tokenize_for_capture(tiny_tokenizer, text) for text in TEXTS]
    layers, metrics = capture.resolve_layers(tiny_model, "all"), sorted(LAYER_METRICS)

    def measure(sites=("resid_post",)):
        measurement = capture.Measurement(Grid(tuple(metrics), sites=sites), layers, layers[:1])
        return capture.measure_batch(tiny_model, torch.device("cpu"), tiny_tokenizer.pad_token_id, tokenized, measurement)

    default, three = measure(), measure(sites=("resid_post", "attn_out", "mlp_out"))
    for alone, together in zip(default, three):
        assert set(together["layer_metrics"]) == {f"{m}{suffix}" for m in metrics for suffix in ("", "_attn_out", "_mlp_out")}
        for metric, values in alone["layer_metrics"].items():
            assert together["layer_metrics"][metric] == values
        assert together["deltas"] == alone["deltas"]
        assert together["text_metrics"] == alone["text_metrics"]


def test_an_unknown_architecture_names_the_site(tiny_tokenizer):
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    capture.resolve_sites(model, ["resid_post"])  # the block output needs no per-architecture path
    with pytest.raises(UnknownArchitecture, match="capture site 'attn_out' .* architecture 'qwen2'"):
        capture.resolve_sites(model, ["resid_post", "attn_out"])


def test_a_model_without_known_blocks_names_the_site(tiny_tokenizer):
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(UnknownArchitecture, match="capture site 'resid_post': cannot find the decoder blocks of GPT2LMHeadModel"):
        capture.resolve_sites(model, ["resid_post"])


SPEC = """
name: sites
models:
  base: {id: some/model}
conditions:
  human: {source: human}
  model: {source: generate, generation: {max_new_tokens: 20}}
"""


def spec_with(tmp_path, extra: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(SPEC) + textwrap.dedent(extra))
    return load_spec(path)


def test_statistic_names_carry_non_default_sites(tmp_path):
    spec = spec_with(tmp_path, """
        metrics: [smoothness, magnitude]
        capture: {sites: [resid_post, attn_out]}
        stats: {correlate: [ce_loss, smoothness_attn_out]}
        criteria: {attn: smoothness_attn_out.overall.d > 0 and smoothness.layer2.p < 0.05}
    """)
    names = [column.name for column in spec.grid.whole_columns()]
    assert names == ["smoothness", "magnitude", "smoothness_attn_out", "magnitude_attn_out"]
    assert set(names) <= spec.grid.statistic_vocabulary()


def test_default_site_keeps_bare_metric_names(tmp_path):
    spec = spec_with(tmp_path, "metrics: [smoothness, variance]\n")
    assert spec.capture.sites == ["resid_post"]
    assert [column.name for column in spec.grid.whole_columns()] == ["smoothness", "variance"]


@pytest.mark.parametrize(
    "sites, message",
    [("[resid_post, attn_output]", "unknown capture site 'attn_output'"), ("[mlp_out, mlp_out]", "lists a site twice"),
     ("[]", "at least one site")],
)
def test_bad_sites_name_the_field(tmp_path, sites, message):
    with pytest.raises(InputError, match=f"capture.sites: .*{message}"):
        spec_with(tmp_path, f"capture: {{sites: {sites}}}\n")


def test_a_criterion_on_an_unmeasured_site_is_rejected(tmp_path):
    with pytest.raises(InputError, match="criteria.attn"):
        spec_with(tmp_path, "criteria: {attn: smoothness_mlp_out.overall.d > 0}\n")


def test_the_site_registry_imports_no_torch():
    code = "import sys, harness.stages.sites, harness.schema; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
