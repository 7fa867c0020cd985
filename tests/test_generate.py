"""Generation stage: batch size from memory, out-of-memory retry, compiled generation."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_model, tiny_config, wikitext_rows
from transformers import AutoModelForCausalLM

from harness import models
from harness.models import MEMORY_FRACTION
from harness.stages import generate
from harness.sources import GenerationSpec

NEW_TOKENS = 6
GREEDY = GenerationSpec(max_new_tokens=NEW_TOKENS, temperature=0)

@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Four WikiText sentence starts of different lengths (left padding differs per row)."""
    rows = [row.strip() for row in wikitext_rows(200) if len(row.split()) > 20 and not row.startswith(" =")]
    return [" ".join(row.split()[:words]) for row, words in zip(rows, (5, 9, 14, 7))]


def test_kv_cache_term_is_the_size_of_the_models_own_cache(llama, tiny_tokenizer):
    """bytes_per_sequence counts the key and value tensors a forward caches per sequence (twice if eager)."""
    ids = torch.randint(3, len(tiny_tokenizer), (2, 11))
    with torch.no_grad():
        cache = llama(input_ids=ids, use_cache=True).past_key_values
    cached_bytes = sum(
        tensor.numel() * tensor.element_size() for layer in cache.layers for tensor in (layer.keys, layer.values)
    )
    # With no prompt there is no prefill term: what grows with the new tokens is the cache alone.
    cache_per_token = generate.bytes_per_sequence(llama, 0, 12) - generate.bytes_per_sequence(llama, 0, 11)
    assert 11 * cache_per_token == 2 * cached_bytes / len(ids)  # two copies while the cache grows
    static_per_token = generate.bytes_per_sequence(llama, 0, 12, compile=True) - generate.bytes_per_sequence(
        llama, 0, 11, compile=True
    )
    assert 11 * static_per_token == cached_bytes / len(ids)  # a static cache is allocated once
    prefill = generate.bytes_per_sequence(llama, 11, 0) - generate.bytes_per_sequence(llama, 0, 11)
    assert prefill > 0  # a prompt's activations come on top of its cache


def test_auto_batch_size_fills_the_memory_fraction(llama, monkeypatch):
    lengths = [30, 12] * 1000
    per_sequence = generate.bytes_per_sequence(llama, 30, 90)
    monkeypatch.setattr(models, "free_memory_bytes", lambda device: 1000 * per_sequence)
    assert generate.auto_batch_size(llama, torch.device("cpu"), lengths, 90) == int(1000 * MEMORY_FRACTION)
    monkeypatch.setattr(models, "free_memory_bytes", lambda device: 0)
    assert generate.auto_batch_size(llama, torch.device("cpu"), lengths, 90) == 1  # never zero


def test_auto_batch_size_on_a_cpu_takes_every_prompt(llama):
    """On a CPU, `auto` puts a spec's prompts in one batch, as the former default of 64 did."""
    lengths = [60] * 500
    assert generate.auto_batch_size(llama, torch.device("cpu"), lengths, 90) == len(lengths)
    assert generate.auto_batch_size(llama, torch.device("cpu"), lengths[:3], 90) == 3


def test_out_of_memory_halves_the_batch_once(llama, tiny_tokenizer, prompts, monkeypatch, caplog):
    expected = generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0)
    real_generate = llama.generate
    rows_tried = []

    def generate_within(limit):
        def fake(**kwargs):
            rows_tried.append(len(kwargs["input_ids"]))
            if len(kwargs["input_ids"]) > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_generate(**kwargs)

        return fake

    monkeypatch.setattr(llama, "generate", generate_within(2))
    report = generate.GenerationReport()
    with caplog.at_level(logging.WARNING, logger=generate.__name__):
        outputs = generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0, report=report)
    assert outputs == expected
    assert rows_tried == [4, 2, 2] and report.halved_batches == 1
    assert [record.getMessage() for record in caplog.records] == [
        "generation ran out of memory on a batch of 4 prompts: retrying it as batches of 2 and 2"
    ]

    monkeypatch.setattr(llama, "generate", generate_within(1))
    with pytest.raises(torch.OutOfMemoryError):  # a half that does not fit either is not split again
        generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0)


def test_compiled_generation_equals_eager(llama, tiny_tokenizer, prompts):
    """Static cache + inductor-compiled decoding: the same greedy tokens in fp32, one graph per shape."""
    eager = generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0)
    report = generate.GenerationReport()
    first = generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0, compile=True, report=report)
    again = generate.generate_batch(llama, tiny_tokenizer, "cpu", prompts[::-1], GREEDY, seed=0, compile=True, report=report)
    assert first == eager and again == eager[::-1]
    longest = max(len(tiny_tokenizer(prompt)["input_ids"]) for prompt in prompts)
    bucket = -(-longest // generate.PROMPT_BUCKET) * generate.PROMPT_BUCKET
    assert report.graphs == {(len(prompts), bucket)}  # one shape: the prompts padded to a bucket
    assert report.compile_seconds > 0 and report.run_seconds > 0
    assert report.summary().startswith("compiled 1 graphs in ")


def test_compiled_gemma2_within_its_window_compiles_one_decoding_graph(tiny_tokenizer, prompts):
    """Gemma 2's sliding-window layers get plain static ones when the window covers every position:
    transformers' sliding static layer would recompile the decoding step at every token."""
    config = tiny_config("gemma2", len(tiny_tokenizer))
    config.sliding_window = 4096
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    eager = generate.generate_batch(model, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = generate.generate_batch(model, tiny_tokenizer, "cpu", prompts, GREEDY, seed=0, compile=True)
    assert compiled == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    assert not any(layer.is_sliding for layer in model.harness_static_cache[1].layers)


def test_compiled_generation_has_its_own_cache_key(prompts):
    """Compiled decoding may pick other tokens in bf16, so its continuations are cached apart from eager ones."""
    pool = SimpleNamespace(key=lambda alias: f"model:{alias}")
    eager, compiled = (
        generate.GenerateStage("generate[model]", prompts, "base", GREEDY, "auto", compile, pool).inputs()
        for compile in (False, True)
    )
    assert "compile" not in eager and compiled == eager | {"compile": True}


def test_compile_auto_compiles_small_batches_on_cuda_only():
    rule = generate.compiled_decoding
    assert rule("auto", "cpu", 1) == (False, "eager (runtime.compile auto: eager on a CPU)")
    assert rule("auto", "cuda", generate.COMPILE_MAX_ROWS)[0] is True
    assert rule("auto", "cuda", generate.COMPILE_MAX_ROWS + 1)[0] is False
    assert rule(True, "cpu", 10_000) == (True, "runtime.compile: true")
    assert rule(False, "cuda", 1) == (False, "runtime.compile: false")


def test_the_planned_device_type_needs_no_model():
    assert generate.planned_device_type("cuda:1") == "cuda" and generate.planned_device_type("cpu") == "cpu"
    assert generate.planned_device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
