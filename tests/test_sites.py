"""Capture sites: resid_pre / attn_out / mlp_out on every decoder family harness.structure knows
(each block adds its sublayer sites to the residual stream), the sites through capture, an
unknown family as one line, and spec and statistic names for non-default sites."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Gemma2Config, Gemma3Config, Gemma3TextConfig, GemmaConfig, GPT2Config, GPTNeoXConfig,
    GraniteConfig, LlamaConfig, MistralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config, SiglipVisionConfig,
)

from harness import structure
from harness.errors import InputError
from harness.grid import Grid
from harness.spec import load_spec
from harness.stages import capture
from harness.structure import UnknownArchitecture
from harness.metrics import LAYER_METRICS
from conftest import REPO
from test_capture import TEXTS

VOCAB = 64
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILY_CONFIGS = {  # a tiny random config per family: the classes ship with transformers
    "llama": LlamaConfig(**SHAPE),
    "mistral": MistralConfig(**SHAPE),
    "qwen2": Qwen2Config(**SHAPE),
    "qwen3": Qwen3Config(**SHAPE, head_dim=8),
    "gemma": GemmaConfig(**SHAPE, head_dim=8),
    "gemma2": Gemma2Config(**SHAPE, head_dim=8, sliding_window=4),
    "gemma3_text": Gemma3TextConfig(**SHAPE, head_dim=8, sliding_window=4),
    "gemma3": Gemma3Config(  # the multimodal wrapper: its language model's blocks are the ones read
        text_config=Gemma3TextConfig(**SHAPE, head_dim=8, sliding_window=4).to_dict(),
        vision_config=SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=8).to_dict(),
        mm_tokens_per_image=4,
    ),
    "phi3": Phi3Config(**SHAPE),
    "olmo2": Olmo2Config(**SHAPE),
    "gpt_neox parallel": GPTNeoXConfig(**SHAPE, use_parallel_residual=True),
    "gpt_neox sequential": GPTNeoXConfig(**SHAPE, use_parallel_residual=False),
}
ALL_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


def tiny(config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def read_sites(model, sites, input_ids: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], tuple[torch.Tensor, ...]]:
    """Per site, each block's states there ([T, d], one text), and transformers' own hidden
    states (embeddings, then each block's output) from the same forward."""
    read: dict[str, list[torch.Tensor]] = {site: [None] * len(structure.decoder_blocks(model)) for site in sites}

    def keep(site: str, layer: int):
        def hook(states: torch.Tensor) -> None:
            read[site][layer] = states[0].detach().clone()

        return hook

    handles = [tap.register(keep(site, layer)) for site in sites for layer, tap in enumerate(structure.site_taps(model, site))]
    try:
        with torch.no_grad():
            hidden = model(input_ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    return read, tuple(states[0] for states in hidden)


@pytest.mark.parametrize("family", FAMILY_CONFIGS)
def test_each_family_adds_its_sublayer_sites_to_the_residual_stream(family):
    """resid_post[l] = resid_pre[l] + attn_out[l] + mlp_out[l] in every pre-norm residual family
    (GPT-NeoX's parallel residual too), and resid_pre is what transformers calls block l's input."""
    model = tiny(FAMILY_CONFIGS[family])
    assert structure.architecture(model) in structure.FAMILIES
    sites, hidden = read_sites(model, ALL_SITES, torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1)))
    for layer in range(len(sites["resid_pre"])):
        torch.testing.assert_close(sites["resid_pre"][layer], hidden[layer])
        torch.testing.assert_close(
            sites["resid_post"][layer], sites["resid_pre"][layer] + sites["attn_out"][layer] + sites["mlp_out"][layer]
        )
        if layer + 1 < len(sites["resid_pre"]):
            torch.testing.assert_close(sites["resid_post"][layer], sites["resid_pre"][layer + 1])


def numpy_metrics(states: np.ndarray) -> dict[str, float]:
    """Smoothness and magnitude of one layer's response tokens [T, d], in float64."""
    states = states.astype(np.float64)
    return {
        "smoothness": np.linalg.norm(np.diff(states, axis=0), axis=1).mean(),
        "magnitude": np.linalg.norm(states, axis=1).mean(),
    }


@pytest.mark.parametrize("site", ALL_SITES)
def test_capture_measures_each_site_where_the_block_is_read(tiny_model, tiny_tokenizer, site):
    layers = list(range(len(structure.decoder_blocks(tiny_model))))
    for text in TEXTS[:2]:
        tokenized = capture.tokenize_for_capture(tiny_tokenizer, text)
        measurement = capture.Measurement(Grid(("smoothness", "magnitude"), sites=(site,)), layers)
        record = capture.measure_batch(tiny_model, torch.device("cpu"), tiny_tokenizer.pad_token_id, [tokenized], measurement)[0]
        direct = read_sites(tiny_model, (site,), torch.tensor([tokenized.input_ids]))[0][site]
        for layer, states in enumerate(direct):
            expected = numpy_metrics(states[tokenized.response_start :].numpy())
            for metric, value in expected.items():
                captured = record["layer_metrics"][metric if site == "resid_post" else f"{metric}_{site}"][layer]
                assert captured == pytest.approx(value, rel=1e-5), (site, layer, metric)


def test_sites_add_columns_and_leave_the_default_unchanged(tiny_model, tiny_tokenizer):
    tokenized = [capture.tokenize_for_capture(tiny_tokenizer, text) for text in TEXTS]
    layers, metrics = structure.resolve_layers(tiny_model, "all"), sorted(LAYER_METRICS)

    def measure(sites=("resid_post",)):
        measurement = capture.Measurement(Grid(tuple(metrics), sites=sites), layers, layers[:1])
        return capture.measure_batch(tiny_model, torch.device("cpu"), tiny_tokenizer.pad_token_id, tokenized, measurement)

    default, four = measure(), measure(sites=ALL_SITES[1:] + ALL_SITES[:1])
    for alone, together in zip(default, four):
        suffixes = ("", "_resid_pre", "_attn_out", "_mlp_out")
        assert set(together["layer_metrics"]) == {f"{m}{suffix}" for m in metrics for suffix in suffixes}
        for metric, values in alone["layer_metrics"].items():
            assert together["layer_metrics"][metric] == values
        assert together["deltas"] == alone["deltas"]
        assert together["text_metrics"] == alone["text_metrics"]


def granite():
    """A family transformers ships but structure.py does not know: Granite scales each sublayer's
    output by `residual_multiplier` before adding it, so the sublayer's own output is not what it adds."""
    return tiny(GraniteConfig(**SHAPE, residual_multiplier=0.5))


def test_an_unknown_family_takes_block_sites_and_names_the_sublayer_site():
    model = granite()
    structure.resolve_sites(model, ["resid_post", "resid_pre"])  # the block's input and output need no layout
    with pytest.raises(UnknownArchitecture) as raised:
        structure.resolve_sites(model, ["resid_post", "attn_out"])
    message = str(raised.value)
    assert message.startswith("capture site 'attn_out': no known attention sublayer layout for architecture 'granite'")
    assert "\n" not in message and "gpt_neox" in message  # one line, naming the known families


def test_a_model_without_known_blocks_names_the_site():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(UnknownArchitecture, match="capture site 'resid_post': cannot find the decoder blocks of GPT2LMHeadModel"):
        structure.resolve_sites(model, ["resid_post"])


def test_a_spec_on_an_unknown_family_stops_before_anything_runs(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "granite"
    model = granite()
    model.resize_token_embeddings(len(tiny_tokenizer))
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC).replace("some/model", str(model_dir)) + "capture: {sites: [resid_post, mlp_out]}\n")
    probe, runs = tmp_path / "probe.txt", tmp_path / "runs"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cli_probe.py"), "run", str(spec), "--runs-dir", str(runs)],
                          cwd=REPO, env={**os.environ, "HARNESS_PROBE_FILE": str(probe), "HARNESS_CACHE_DIR": str(runs / ".cache")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"error: {spec}: capture.sites: capture site 'mlp_out': no known mlp sublayer layout for architecture 'granite' "
        f"(known: {', '.join(sorted(structure.FAMILIES))})"
    ]
    assert not runs.exists() or list(runs.rglob("*")) == []
    assert "stage" not in (probe.read_text() if probe.exists() else "")


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
    code = "import sys, harness.sites, harness.schema; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_ls_sites_lists_every_site_and_family():
    from harness import listing
    from harness.sites import SITES

    rows = listing.sites()
    assert [row.split()[0] for row in rows[:-1]] == list(SITES)
    assert all(family in rows[-1] for family in structure.FAMILIES)
