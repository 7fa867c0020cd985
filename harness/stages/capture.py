"""Capture stage: one fused, batched forward per batch of texts computes every metric.

Forward hooks on the decoder blocks see each block's output — the residual stream after
block l — and reduce it to per-text trajectory metrics on the device right away, so no
activation leaves the device unless the spec asks for it. (``hidden_states[-1]`` of a
transformers model is taken after the final norm; block outputs keep every layer on the
same footing.) Cross-entropy comes from the final hidden states through the LM head in
chunks of positions, so fp32 logits for a whole batch never exist at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from harness.schema import ResponseTokenization
from metrics import LAYER_METRICS, TEXT_METRICS

STAGE_VERSION = 2
"""Part of every capture cache key. 2: CE over contiguous rows (the last bits of ce_loss changed)."""
LOGITS_CHUNK_BYTES = 256 * 2**20
"""Upper bound on the fp32 logits materialized at once when computing CE."""


@dataclass(frozen=True)
class TextToMeasure:
    """One text as the capture model sees it."""

    prompt: str
    response: str
    max_response_tokens: int | None = None
    """Truncate the response to this many tokens (length matching)."""

    @property
    def full_text(self) -> str:
        return f"{self.prompt} {self.response}"


@dataclass
class Tokenized:
    input_ids: list[int]
    response_start: int
    """Index of the first response token; the response runs to the end of input_ids."""


def tokenize_for_capture(
    tokenizer, text: TextToMeasure, response_tokenization: ResponseTokenization = "joint"
) -> Tokenized:
    """Token ids of prompt and response (with the tokenizer's special tokens, e.g. BOS).

    `joint`: prompt + " " + response tokenized as one text, as the model reads it; a token
    belongs to the response when it starts at or after the space that ends the prompt (a token
    straddling the boundary stays with the prompt). `separate` (the reference's): the prompt
    and the response (no special tokens, no leading space) tokenized apart and concatenated.
    """
    if response_tokenization == "separate":
        prompt_ids = tokenizer(text.prompt)["input_ids"]
        ids = prompt_ids + tokenizer(text.response, add_special_tokens=False)["input_ids"]
        response_start = len(prompt_ids)
    else:
        encoded = tokenizer(text.full_text, return_offsets_mapping=True)
        boundary = len(text.prompt)
        ids = encoded["input_ids"]
        offsets = encoded["offset_mapping"]
        response_start = next(
            (i for i, (start, end) in enumerate(offsets) if start >= boundary and end > start), len(ids)
        )
    if text.max_response_tokens is not None:
        ids = ids[: response_start + text.max_response_tokens]
    return Tokenized(ids, response_start)


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Length-sorted batches whose padded size (rows x longest) stays within the token budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def auto_token_budget(model: nn.Module, device: torch.device, longest: int) -> int:
    """Padded tokens per forward that fit in half the free memory of `device`.

    A rough per-token cost of one inference forward: the residual stream, attention
    projections and MLP activations in the model's dtype, the hook's float32 copies, and the
    attention scores of a row of `longest` tokens. The logits are bounded separately
    (LOGITS_CHUNK_BYTES).
    """
    config = model.config.get_text_config()
    hidden, intermediate = config.hidden_size, config.intermediate_size
    per_token = (6 * hidden + 3 * intermediate) * model.dtype.itemsize + 8 * hidden * 4
    per_token += config.num_attention_heads * longest * 4
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(longest, int(0.5 * (free - LOGITS_CHUNK_BYTES) / per_token))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise TypeError(f"cannot find the decoder blocks of {type(model).__name__}")


def resolve_layers(model: nn.Module, requested: str | list[int]) -> list[int]:
    n_layers = len(decoder_layers(model))
    if requested == "all":
        return list(range(n_layers))
    too_deep = [layer for layer in requested if layer >= n_layers]
    if too_deep:
        raise ValueError(f"layers {too_deep} do not exist (the model has {n_layers})")
    return list(requested)


def report_layers(layers: list[int]) -> list[int]:
    """A few layers spread over the depth whose per-token deltas are kept for the report."""
    picks = {layers[round(q * (len(layers) - 1))] for q in (0, 1 / 3, 2 / 3, 1)}
    return sorted(picks)


def token_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy [B, T] (position t scores token t given < t; 0 at t = 0).

    Logits come from the LM head in chunks of positions, with the model's final-logit
    softcapping (Gemma 2) applied as its own forward does.
    """
    head = model.get_output_embeddings()
    vocab = head.out_features if hasattr(head, "out_features") else head.weight.shape[0]
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    batch, length = input_ids.shape
    # Contiguous 2-D rows: a strided 3-D slice makes matmul re-read the head's weight per text.
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = input_ids[:, 1:].reshape(-1).to(rows.device)
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
    flat = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        logits = head(rows[start : start + chunk]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        flat[start : start + chunk] = nn.functional.cross_entropy(logits, targets[start : start + chunk], reduction="none")
    nll = torch.zeros(batch, length, dtype=torch.float32, device=hidden.device)
    nll[:, 1:] = flat.view(batch, length - 1).to(nll.device)
    return nll


@torch.inference_mode()
def measure_batch(
    model: nn.Module,
    input_device: torch.device,
    pad_token_id: int,
    tokenized: list[Tokenized],
    layers: list[int],
    metric_names: list[str],
    keep_deltas_for: list[int],
    keep_activations: bool = False,
    metric_options: dict[str, dict] | None = None,
) -> list[dict]:
    """Metrics for a batch of texts from one right-padded forward (`metric_options`: keyword
    options by metric name, as the spec's `metric_options`).

    Returns one record per text: ``layer_metrics[name][i]`` per captured layer i,
    ``text_metrics[name]``, ``n_response_tokens``, ``deltas[layer]`` (per-token delta norms
    for `keep_deltas_for`), and ``activations`` ([layers, response tokens, d]) if asked.
    """
    batch, longest = len(tokenized), max(len(item.input_ids) for item in tokenized)
    input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros(batch, longest, dtype=torch.long)
    response = torch.zeros(batch, longest, dtype=torch.bool)
    for row, item in enumerate(tokenized):
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        attention[row, : len(item.input_ids)] = 1
        response[row, item.response_start : len(item.input_ids)] = True
    # Only the span holding responses enters the trajectory metrics.
    first = min(item.response_start for item in tokenized)
    span_mask = response[:, first:].to(input_device)

    captured: dict[int, dict] = {}
    blocks = decoder_layers(model)

    def hook_for(layer: int):
        def hook(module, args, output):
            hidden = (output[0] if isinstance(output, tuple) else output)[:, first:].float()
            mask = span_mask.to(hidden.device)
            result = {
                name: LAYER_METRICS[name](hidden, mask, **(metric_options or {}).get(name, {})).cpu()
                for name in metric_names
            }
            if layer in keep_deltas_for:
                result["deltas"] = (hidden[:, 1:] - hidden[:, :-1]).norm(dim=-1).cpu()
            if keep_activations:
                result["activations"] = hidden.to(torch.float16).cpu()
            captured[layer] = result

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        decoder = model.get_decoder()
        hidden = decoder(
            input_ids=input_ids.to(input_device), attention_mask=attention.to(input_device), use_cache=False
        ).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    nll = token_nll(model, hidden, input_ids.to(hidden.device)).cpu()
    targets = attention.bool().clone()
    targets[:, 0] = False
    text_values = {name: fn(nll, targets, response & targets) for name, fn in TEXT_METRICS.items()}

    records = []
    span = response[:, first:]
    for row, item in enumerate(tokenized):
        positions = span[row].nonzero().flatten()
        lo, hi = (int(positions[0]), int(positions[-1]) + 1) if len(positions) else (0, 0)
        record = {
            "n_response_tokens": len(item.input_ids) - item.response_start,
            "response_ids": item.input_ids[item.response_start :],
            "layer_metrics": {name: [float(captured[l][name][row]) for l in layers] for name in metric_names},
            "text_metrics": {name: float(values[row]) for name, values in text_values.items()},
            "deltas": {str(l): captured[l]["deltas"][row, lo : hi - 1].tolist() for l in keep_deltas_for},
        }
        if keep_activations:
            record["activations"] = torch.stack([captured[l]["activations"][row, lo:hi] for l in layers])
        records.append(record)
    return records
