"""Shared fixtures: tiny random models built from configs (no download) and a tiny tokenizer."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast

from harness.data_sources import packaged_rows

# The malformed specs are data for test_bad_inputs.py: keep the harness pytest plugin (which
# collects every spec YAML it is pointed at) from trying to run them.
collect_ignore_glob = ["bad_inputs/*.yaml"]

REPO = Path(__file__).resolve().parent.parent


def wikitext_rows(limit: int | None = None) -> list[str]:
    """Rows of the WikiText-2 raw test split shipped with the package."""
    rows = packaged_rows("conftest")
    return rows[:limit] if limit else rows


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (like GPT-2 / SmolLM2) trained on WikiText rows, with a BOS like Gemma's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(wikitext_rows(400), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(arch: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "gemma2":  # final-logit softcapping and sliding-window layers, as in Gemma-2-2B
        return Gemma2Config(**common, head_dim=8, final_logit_softcapping=30.0, sliding_window=8)
    if arch == "gemma3":  # a sliding-window layer, then a global one, as in Gemma 3 270M
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise ValueError(arch)


def build_tiny_model(arch: str, vocab_size: int):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session", params=["llama", "gemma2", "gemma3"])
def tiny_model(request, tiny_tokenizer):
    return build_tiny_model(request.param, len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama saved like a hub checkpoint: a spec can name it as a local model path."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def speaking_words(model, tokenizer):
    """`model` (changed in place) choosing only tokens that are a space and a word (`" the"`), so
    that its continuations re-tokenize to the ids it generated, as a trained model's mostly do
    (a random model's bytes mostly do not): the LM head's other rows are zeroed (untied from the
    input embeddings)."""
    head = model.get_output_embeddings()
    weight = head.weight.detach().clone()
    words = torch.tensor([re.fullmatch(r" [A-Za-z]+", tokenizer.decode([token])) is not None for token in range(weight.shape[0])])
    weight[~words] = 0
    head.weight = torch.nn.Parameter(weight)
    return model


@pytest.fixture(scope="session")
def words_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """`tiny_model_dir`'s Llama speaking words (`speaking_words`): its texts are measured while decoding."""
    folder = tmp_path_factory.mktemp("tiny-llama-words")
    speaking_words(build_tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def unavailable(message: str) -> None:
    """Skip (a test, or at import a whole module) where a part it needs is not installed, saying
    what to install; fail instead in CI (CI=true), which must run every test."""
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI must run these tests", pytrace=False)
    pytest.skip(message, allow_module_level=True)
