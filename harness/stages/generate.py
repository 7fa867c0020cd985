"""Generation stage: the model continues each prompt (batched, left-padded, seeded)."""

from __future__ import annotations

from typing import Sequence

import torch

from harness.stages.conditions import GenerationSpec

STAGE_VERSION = 1
"""Part of every cache key of this stage: bump it when a change here alters a continuation."""


def plan_batches(prompt_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Length-sorted batches of prompt indices, so little compute goes to padding."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generation_kwargs(spec: GenerationSpec, tokenizer) -> dict:
    kwargs = dict(
        max_new_tokens=spec.max_new_tokens,
        min_new_tokens=spec.min_new_tokens or None,  # None: unset, as the reference left it
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=spec.repetition_penalty,
        no_repeat_ngram_size=spec.no_repeat_ngram_size,
    )
    if spec.temperature > 0:
        kwargs.update(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
def generate_batch(model, tokenizer, device, prompts: list[str], spec: GenerationSpec, seed: int) -> list[dict]:
    """Continue each prompt; returns {response, n_new_tokens, stopped_early} per prompt.

    The response is the new tokens only, decoded without special tokens and stripped (decodes
    start with " " or "\\n\\n"). `seed` seeds sampling for this batch, so a batch's output does
    not depend on what ran before it.
    """
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    torch.manual_seed(seed)
    output = model.generate(**batch, **generation_kwargs(spec, tokenizer))
    new_tokens = output[:, batch["input_ids"].shape[1] :]
    results = []
    for row in new_tokens:
        ids = row.tolist()
        stopped = tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids
        if stopped:
            ids = ids[: ids.index(tokenizer.eos_token_id)]
        response = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append({"response": response, "n_new_tokens": len(ids), "stopped_early": stopped})
    return results
