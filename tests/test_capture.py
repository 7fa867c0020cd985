"""The fused forward: padding-invariant, pre-final-norm, CE equal to the model's own logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.grid import Grid
from harness import structure
from harness.stages import capture
from harness.metrics import LAYER_METRICS

TEXTS = [
    capture.TextToMeasure("The game began development in 2010.", "It carried over a large portion of the work."),
    capture.TextToMeasure("Robert Boulter is an English actor.", "He had a guest role in 2000, then a starring role."),
    capture.TextToMeasure("A short one here.", "Yes."),
    capture.TextToMeasure("Another prompt that is rather long, longer than most.", "It ends soon after it starts, as texts do."),
]


def measure(model, tokenizer, texts, **kwargs):
    tokenized = [capture.tokenize_for_capture(tokenizer, text) for text in texts]
    layers = structure.resolve_layers(model, "all")
    measurement = capture.Measurement(Grid(tuple(sorted(LAYER_METRICS))), layers, layers, **kwargs)
    return capture.measure_batch(model, torch.device("cpu"), tokenizer.pad_token_id, tokenized, measurement)


def test_batched_equals_batch_of_one(tiny_model, tiny_tokenizer):
    batched = measure(tiny_model, tiny_tokenizer, TEXTS)
    for text, together in zip(TEXTS, batched):
        alone = measure(tiny_model, tiny_tokenizer, [text])[0]
        for name, values in together["layer_metrics"].items():
            np.testing.assert_allclose(values, alone["layer_metrics"][name], rtol=1e-4, atol=1e-6, err_msg=name)
        for name, value in together["text_metrics"].items():
            np.testing.assert_allclose(value, alone["text_metrics"][name], rtol=1e-4, err_msg=name)
        for layer, norms in together["deltas"].items():
            np.testing.assert_allclose(norms, alone["deltas"][layer], rtol=1e-4, atol=1e-6)
        assert together["n_response_tokens"] == alone["n_response_tokens"]


def test_captured_layers_are_block_outputs_before_the_final_norm(tiny_model, tiny_tokenizer):
    text = TEXTS[0]
    record = measure(tiny_model, tiny_tokenizer, [text], keep_activations=True)[0]
    tokenized = capture.tokenize_for_capture(tiny_tokenizer, text)
    with torch.no_grad():
        hidden_states = tiny_model(torch.tensor([tokenized.input_ids]), output_hidden_states=True).hidden_states
    response = slice(tokenized.response_start, None)
    activations = record["activations"].float()  # [layers, response tokens, d]
    n_layers = activations.shape[0]
    for layer in range(n_layers - 1):  # hidden_states[l + 1] is block l's output, except the last
        torch.testing.assert_close(activations[layer], hidden_states[layer + 1][0, response], rtol=2e-3, atol=2e-3)
    last = activations[-1]
    post_norm = hidden_states[-1][0, response]
    assert not torch.allclose(last, post_norm, atol=1e-2), "last layer must be the residual stream, not post-norm"
    final_norm = tiny_model.get_decoder().norm
    torch.testing.assert_close(final_norm(last), post_norm, rtol=2e-3, atol=2e-3)


def test_chunked_cross_entropy_equals_full_logits(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(capture, "LOGITS_CHUNK_BYTES", 4 * len(tiny_tokenizer) * 3)  # a few positions per chunk
    records = measure(tiny_model, tiny_tokenizer, TEXTS)
    for text, record in zip(TEXTS, records):
        tokenized = capture.tokenize_for_capture(tiny_tokenizer, text)
        ids = torch.tensor([tokenized.input_ids])
        with torch.no_grad():
            logits = tiny_model(ids).logits[0, :-1]  # the model's own forward, softcapping included
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        assert record["text_metrics"]["ce_loss"] == pytest.approx(nll.mean().item(), rel=1e-4)
        response_nll = nll[tokenized.response_start - 1 :]
        assert record["text_metrics"]["ce_loss_response"] == pytest.approx(response_nll.mean().item(), rel=1e-4)


def test_response_tokens_are_the_response(tiny_tokenizer):
    for text in TEXTS:
        tokenized = capture.tokenize_for_capture(tiny_tokenizer, text)
        decoded = tiny_tokenizer.decode(tokenized.input_ids[tokenized.response_start :])
        assert decoded.strip() == text.response
        prompt = tiny_tokenizer.decode(tokenized.input_ids[: tokenized.response_start], skip_special_tokens=True)
        assert prompt == text.prompt


def test_length_cap_truncates_the_response(tiny_tokenizer):
    capped = capture.TextToMeasure(TEXTS[0].prompt, TEXTS[0].response, max_response_tokens=3)
    tokenized = capture.tokenize_for_capture(tiny_tokenizer, capped)
    assert len(tokenized.input_ids) - tokenized.response_start == 3


def test_smoothness_matches_a_direct_computation(tiny_model, tiny_tokenizer):
    record = measure(tiny_model, tiny_tokenizer, [TEXTS[1]], keep_activations=True)[0]
    for layer, activations in enumerate(record["activations"].float().numpy()):
        deltas = np.linalg.norm(np.diff(activations, axis=0), axis=1)
        norms = np.linalg.norm(activations, axis=1)
        # activations were kept in float16, the metrics were computed in float32
        assert record["layer_metrics"]["smoothness"][layer] == pytest.approx(deltas.mean(), rel=2e-3)
        assert record["layer_metrics"]["magnitude"][layer] == pytest.approx(norms.mean(), rel=2e-3)
        assert record["layer_metrics"]["variance"][layer] == pytest.approx(norms.var(), rel=2e-2, abs=1e-4)


def test_plan_batches_respects_the_token_budget():
    lengths = [5, 30, 12, 12, 7, 30, 1]
    batches = capture.plan_batches(lengths, token_budget=40)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 40


def test_auto_token_budget_fits_free_memory(tiny_model, monkeypatch):
    import psutil

    longest = 50
    roomy = capture.auto_token_budget(tiny_model, torch.device("cpu"), longest)
    assert roomy == capture.CPU_TOKEN_BUDGET  # a CPU gains nothing from bigger batches
    free = psutil.virtual_memory()._replace(available=capture.LOGITS_CHUNK_BYTES + 2**20)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    tight = capture.auto_token_budget(tiny_model, torch.device("cpu"), longest)
    assert longest <= tight < roomy  # less memory, smaller batches, never below one row


def test_auto_token_budget_on_cuda_grows_with_free_memory(tiny_model, monkeypatch):
    budgets = []
    for free_bytes in (2 * 2**30, 4 * 2**30):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free_bytes: (free, 8 * 2**30))
        budgets.append(capture.auto_token_budget(tiny_model, torch.device("cuda"), 50))
    assert capture.CPU_TOKEN_BUDGET < budgets[0] < budgets[1]
    usable = [free_bytes - capture.LOGITS_CHUNK_BYTES for free_bytes in (2 * 2**30, 4 * 2**30)]
    assert budgets[1] / budgets[0] == pytest.approx(usable[1] / usable[0], rel=1e-3)  # proportional, no cap


def reference_metrics(states: np.ndarray) -> dict[str, float]:
    """Every trajectory metric of one layer's response tokens [T, d], in float64 numpy."""
    states = states.astype(np.float64)
    deltas = np.diff(states, axis=0)
    delta_norms, norms = np.linalg.norm(deltas, axis=1), np.linalg.norm(states, axis=1)
    cosines = (deltas[1:] * deltas[:-1]).sum(1) / (delta_norms[1:] * delta_norms[:-1])
    return {
        "smoothness": delta_norms.mean(),
        "normalized_smoothness": (delta_norms / norms[:-1]).mean(),
        "magnitude": norms.mean(),
        "variance": norms.var(),
        "directional_consistency": cosines.mean(),
    }


def test_device_resident_values_equal_a_per_text_computation(tiny_model, tiny_tokenizer):
    """Batched, hook-reduced values vs each text alone through `output_hidden_states` (the last
    block's output from a hook: hidden_states[-1] is after the final norm)."""
    batched = measure(tiny_model, tiny_tokenizer, TEXTS)
    assert set(batched[0]["layer_metrics"]) == set(LAYER_METRICS)
    last_block = structure.decoder_blocks(tiny_model)[-1]
    for text, record in zip(TEXTS, batched):
        tokenized = capture.tokenize_for_capture(tiny_tokenizer, text)
        ids = torch.tensor([tokenized.input_ids])
        kept = []
        handle = last_block.register_forward_hook(
            lambda module, args, output: kept.append(output[0] if isinstance(output, tuple) else output)
        )
        with torch.no_grad():
            states = tiny_model(ids, output_hidden_states=True).hidden_states[1:-1] + (kept[0],)
        handle.remove()
        for layer, state in enumerate(states):
            response = state[0, tokenized.response_start :].numpy()
            for name, value in reference_metrics(response).items():
                assert record["layer_metrics"][name][layer] == pytest.approx(value, rel=1e-4, abs=1e-6), (layer, name)
            deltas = np.linalg.norm(np.diff(response.astype(np.float64), axis=0), axis=1)
            np.testing.assert_allclose(record["deltas"][str(layer)], deltas, rtol=1e-4)


def test_one_host_transfer_per_batch(tiny_model, tiny_tokenizer, monkeypatch):
    """Hooks keep their values on the device: a batch reads them back with a single `.cpu()`."""
    transfers = []
    for method in ("cpu", "item", "tolist", "__float__"):

        def counted(self, *args, _original=getattr(torch.Tensor, method), _method=method, **kwargs):
            transfers.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    measure(tiny_model, tiny_tokenizer, TEXTS)
    assert transfers == ["cpu"]


def test_compiled_capture_equals_eager(tiny_tokenizer):
    """runtime.compile: the blocks run compiled (inductor) on lengths padded to the bucket; every
    value equals the eager forward's within fp32 tolerance, and two batches of other lengths
    reuse the compiled blocks."""
    from conftest import build_tiny_model

    eager_model, compiled_model = (build_tiny_model("llama", len(tiny_tokenizer)) for _ in range(2))
    for texts in (TEXTS, TEXTS[:2]):
        eager = measure(eager_model, tiny_tokenizer, texts)
        compiled = measure(compiled_model, tiny_tokenizer, texts, compile=True)
        for got, expected in zip(compiled, eager):
            for name, values in expected["layer_metrics"].items():
                np.testing.assert_allclose(got["layer_metrics"][name], values, rtol=1e-5, atol=1e-6, err_msg=name)
            for name, value in expected["text_metrics"].items():
                np.testing.assert_allclose(got["text_metrics"][name], value, rtol=1e-5, err_msg=name)
            for layer, norms in expected["deltas"].items():
                np.testing.assert_allclose(got["deltas"][layer], norms, rtol=1e-5, atol=1e-6)
    assert all(block.harness_compiled for block in structure.decoder_blocks(compiled_model))
    assert not any(getattr(block, "harness_compiled", False) for block in structure.decoder_blocks(eager_model))
