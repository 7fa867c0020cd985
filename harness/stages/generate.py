"""Generation stage: the model continues each prompt (batched, left-padded, seeded).

Batch size: `runtime.generation_batch_size`, or `auto` (`auto_batch_size`): as many sequences
as fit in half the free memory of the device, counting each sequence's KV cache, its prefill
activations and a decoding step's logits. An out-of-memory error on a batch splits it in two
and retries once (`generate_batch`).

Compiled generation (`runtime.compile`): transformers' `generate` with a static KV cache
compiles the decoding step with `torch.compile`, one graph per (rows, cache length). Prompts
are left-padded to a multiple of PROMPT_BUCKET tokens, so the number of graphs stays bounded
(prompt buckets x distinct batch sizes); `GenerationReport` counts them and keeps their
compilation time apart from the run time.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Sequence

from harness.artifacts import content_hash
from harness.executor import CompiledCalls, Stage
from harness.lazy import inference_mode, lazy_import
from harness.models import block_activation_bytes, memory_budget
from harness.sources import GenerationSpec
from harness.stages import capture, decode_capture
from harness.structure import resolve_layers

if TYPE_CHECKING:
    from harness.intervening import Applied
    from harness.pool import ModelPool

torch = lazy_import("torch")
transformers = lazy_import("transformers")

STAGE_VERSION = 1
"""Part of every cache key of this stage: bump it when a change here alters a continuation."""
PROMPT_BUCKET = 32
"""Compiled generation pads prompts to a multiple of this many tokens (bounds the graphs)."""
COMPILE_MAX_ROWS = 512
"""`runtime.compile: auto` compiles decoding on CUDA for at most this many prompts. Measured on
one H200 (random-weights Gemma-2-2B, bf16, 90 new tokens; benchmarks/README.md): at 100 prompts
eager decoding is launch-bound (~33 ms a step) and the compiled step takes ~9 ms; at 2000 the
static cache's full-length attention makes compiled decoding slower (8.1 s against 5.6 s). A
straight line between the two puts the crossover near 1000 prompts; half that leaves room for
the compilation itself."""

logger = logging.getLogger(__name__)


@dataclass
class GenerationReport(CompiledCalls):
    """What a stage's generate calls spent, apart from their continuations (the runner logs it);
    `graphs` are (rows, padded prompt length) of each compiled decoding graph."""

    halved_batches: int = 0
    """Batches split in two after an out-of-memory error."""

    def summary(self) -> str:
        parts = [f"generation {self.run_seconds:.1f}s"]
        if self.graphs:
            parts.insert(0, f"compiled {len(self.graphs)} graphs in {self.compile_seconds:.1f}s")
        if self.halved_batches:
            parts.append(f"{self.halved_batches} batches halved after out-of-memory")
        return ", ".join(parts)


def plan_batches(prompt_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Length-sorted batches of prompt indices, so little compute goes to padding."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def bytes_per_sequence(model, longest_prompt: int, max_new_tokens: int, compile: bool = False) -> int:
    """Memory one more sequence in a generate batch costs at the peak.

    Its KV cache (layers x kv heads x head dim x 2 x dtype bytes x (prompt + new tokens)), twice
    in eager generation, which grows the cache by concatenation and so holds the old and the new
    copy for a moment (compiled generation's static cache is allocated once, its prompt padded
    to the bucket). Then the prefill's activations of one block over the prompt (residual
    stream, projections, MLP, fp32 attention scores) and one decoding step's logits in fp32
    (twice: the logits processors copy them).
    """
    config = model.config.get_text_config()
    item = model.dtype.itemsize
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if compile:
        longest_prompt = -(-longest_prompt // PROMPT_BUCKET) * PROMPT_BUCKET
    kv_cache = config.num_hidden_layers * kv_heads * head_dim * 2 * item * (longest_prompt + max_new_tokens)
    prefill = longest_prompt * block_activation_bytes(model, longest_prompt)
    logits = 2 * config.vocab_size * 4
    return (1 if compile else 2) * kv_cache + prefill + logits


def auto_batch_size(
    model, device: torch.device, prompt_lengths: Sequence[int], max_new_tokens: int, compile: bool = False,
    recorded_bytes: int = 0,
) -> int:
    """Prompts per generate call: all of them, or as many as fit in `harness.models.MEMORY_FRACTION` of the
    device's free memory. A CPU holds thousands, so a spec's prompts go in one batch there,
    as the former default of 64 put the 50 prompts of every shipped spec.
    """
    return generation_batch_size("auto", model, device, prompt_lengths, max_new_tokens, compile, "", recorded_bytes)


def generation_batch_size(setting: int | str, model, device: torch.device, prompt_lengths: Sequence[int],
                          max_new_tokens: int, compile: bool, what: str, recorded_bytes: int = 0) -> int:
    """`runtime.generation_batch_size`: `auto`'s choice, or the number checked to fit
    (`harness.models.memory_budget`). `recorded_bytes`: what capture from generation keeps per
    sequence (`decode_capture.recorded_bytes_per_sequence`)."""
    per_sequence = recorded_bytes + bytes_per_sequence(model, max(prompt_lengths), max_new_tokens, compile)
    return memory_budget(setting, device, per_sequence, what, most=len(prompt_lengths))


def compiled_decoding(setting: bool | Literal["auto"], device_type: str, rows: int) -> tuple[bool, str]:
    """Whether decoding runs compiled for batches of `rows` prompts on a `device_type` device,
    and why, in words for the run log: the one rule of `runtime.compile: auto`."""
    if setting != "auto":
        return setting, f"runtime.compile: {str(setting).lower()}"
    if device_type != "cuda":
        return False, "eager (runtime.compile auto: eager on a CPU)"
    if rows > COMPILE_MAX_ROWS:
        return False, f"eager (runtime.compile auto: batches of {rows} > {COMPILE_MAX_ROWS} prompts)"
    return True, f"compiled (runtime.compile auto: batches of {rows} <= {COMPILE_MAX_ROWS} prompts on CUDA)"


def planned_device_type(device_map: str) -> str:
    """The device type a model of this `device_map` runs on, before it is loaded."""
    if device_map != "auto":
        return "cuda" if "cuda" in device_map else device_map.split(":")[0]
    # a CPU-only torch build sees no GPU: a cached run need not import torch to know it
    if "torch" not in sys.modules and importlib.metadata.version("torch").endswith("+cpu"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


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


def compile_kwargs(model, device: torch.device, rows: int, max_cache_len: int) -> dict:
    """`generate` arguments for a static KV cache and a compiled decoding step."""
    # CUDA graphs ("reduce-overhead") remove the per-step launch cost; elsewhere there are none.
    config = transformers.generation.CompileConfig(dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    # transformers compiles on its accelerators only, unless this flag says every device.
    config._compile_all_devices = True
    # `past_key_values` is the name every transformers 5.x takes (later ones warn, and call it `cache`).
    return dict(past_key_values=static_cache(model, rows, max_cache_len), compile_config=config)


def static_cache(model, rows: int, max_cache_len: int) -> transformers.StaticCache:
    """A static KV cache of `max_cache_len` positions for `rows` prompts, kept on the model and
    reset for the next batch of that shape (the compiled step's graphs keep its addresses).

    Where a sliding window covers every position (Gemma 2 and 3 at these lengths), its layers
    are plain static ones: transformers' sliding static layer keeps its length as a Python int,
    on which torch.compile recompiles at every step."""
    kept = getattr(model, "harness_static_cache", None)
    if kept is not None and kept[0] == (rows, max_cache_len):
        kept[1].reset()
        return kept[1]
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    if window is not None and max_cache_len <= window and getattr(config, "layer_types", None):
        config = copy.copy(config)
        config.layer_types = ["full_attention"] * len(config.layer_types)
    cache = transformers.StaticCache(config=config, max_cache_len=max_cache_len)
    model.harness_static_cache = ((rows, max_cache_len), cache)
    return cache


def decoded_tokens(count: Callable[[int], None]):
    """A stopping criterion that calls `count(rows)` after each decoding step (a token for every
    row of the batch), for progress; it never stops a sequence."""

    class DecodedTokens(transformers.StoppingCriteria):  # defined here: transformers loads when generation runs
        def __call__(self, input_ids, scores, **kwargs):
            count(input_ids.shape[0])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return DecodedTokens()


def generate_batch(
    model,
    tokenizer,
    device,
    prompts: list[str],
    spec: GenerationSpec,
    seed: int,
    compile: bool = False,
    report: GenerationReport | None = None,
    on_tokens: Callable[[int], None] | None = None,
    steering: Applied | None = None,
    special_tokens: bool = True,
    measurement: capture.Measurement | None = None,
) -> list[dict]:
    """Continue each prompt; returns {response, n_new_tokens, stopped_early} per prompt.

    The response is the new tokens only, decoded without special tokens and stripped (decodes
    start with " " or "\\n\\n"). `seed` seeds sampling for this batch, so a batch's output does
    not depend on what ran before it. `compile`: static KV cache and a compiled decoding step.
    `on_tokens(n)`: called as tokens are decoded, `n` of them (a step of the whole batch).
    `steering`: an intervention whose hooks are on during each `generate` call. `special_tokens`:
    tokenize the prompts with the tokenizer's BOS (False: they hold it). `measurement`: also
    measure each response while decoding it (`harness.stages.decode_capture`): its record is the
    continuation's `capture` (None where the forward must measure it). Out of memory, the batch
    runs again as two halves (seeded `seed` and `seed` + the first half's size); an out-of-memory
    error in a half is raised.
    """
    report = report if report is not None else GenerationReport()
    count = on_tokens or (lambda tokens: None)
    try:
        return _generate(model, tokenizer, device, prompts, spec, seed, compile, report, count, steering, special_tokens, measurement)
    except torch.OutOfMemoryError:
        if len(prompts) == 1:
            raise
    # Retried outside the except block: the failed attempt's tensors, held by its traceback, are freed.
    half = (len(prompts) + 1) // 2
    logger.warning(
        "generation ran out of memory on a batch of %d prompts: retrying it as batches of %d and %d",
        len(prompts), half, len(prompts) - half,
    )
    report.halved_batches += 1
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return _generate(model, tokenizer, device, prompts[:half], spec, seed, compile, report, count, steering, special_tokens, measurement) + _generate(
        model, tokenizer, device, prompts[half:], spec, seed + half, compile, report, count, steering, special_tokens, measurement
    )


@inference_mode
def _generate(
    model, tokenizer, device, prompts: list[str], spec: GenerationSpec, seed: int, compile: bool,
    report: GenerationReport, on_tokens: Callable[[int], None], steering: Applied | None = None,
    special_tokens: bool = True, measurement: capture.Measurement | None = None,
) -> list[dict]:
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, pad_to_multiple_of=PROMPT_BUCKET if compile else None,
                      add_special_tokens=special_tokens)
    batch = batch.to(device)
    shape = tuple(batch["input_ids"].shape)
    kwargs = generation_kwargs(spec, tokenizer)
    if compile:
        kwargs |= compile_kwargs(model, torch.device(device), shape[0], shape[1] + spec.max_new_tokens)
    recorder = None
    if measurement is not None:
        recorder = decode_capture.DecodingRecorder(model, measurement, batch["input_ids"], batch["attention_mask"])
        kwargs["max_new_tokens"] += 1  # one more step reads the last response token
    start = time.perf_counter()
    torch.manual_seed(seed)
    with (warnings.catch_warnings(), steering.generating(model) if steering is not None else nullcontext(),
          recorder.hooks() if recorder is not None else nullcontext()):
        warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
        output = model.generate(**batch, **kwargs, stopping_criteria=transformers.StoppingCriteriaList([decoded_tokens(on_tokens)]))
    # to the host: the clock stops once the device is done
    new_tokens = output[:, shape[1] : shape[1] + spec.max_new_tokens].tolist()
    report.record(shape, time.perf_counter() - start, compile)
    continuations = [_decoded(tokenizer, ids) for ids in new_tokens]
    if recorder is not None:
        records = recorder.records(
            tokenizer, prompts, [continuation["response"] for continuation in continuations],
            [ids[: continuation["n_new_tokens"]] for ids, continuation in zip(new_tokens, continuations)],
            chat_formatted=not special_tokens,
        )
        for continuation, record in zip(continuations, records):
            continuation["capture"] = record
    return continuations


def _decoded(tokenizer, ids: list[int]) -> dict:
    stopped = tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids
    if stopped:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    response = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return {"response": response, "n_new_tokens": len(ids), "stopped_early": stopped}


@dataclass
class GenerateStage(Stage):
    """One generated condition's continuations, in batches of prompts (the work units)."""

    name: str
    prompts: list[str]
    alias: str
    """The generator model."""
    settings: GenerationSpec
    batch_size: int | str
    """Prompts per batch, or `auto` (from free memory, resolved when the stage computes)."""
    compile: bool
    pool: ModelPool
    steering: Applied | None = None
    """An `intervene` condition's intervention, on while generating (`harness.intervening`)."""
    special_tokens: bool = True
    """Tokenize the prompts with the tokenizer's special tokens (BOS); False for chat-formatted
    prompts, which hold theirs already (`harness.chat`)."""
    capture: capture.CaptureSettings | None = None
    """Measure each continuation while decoding it with these settings (`decode_capture`)."""
    decoding: str = ""
    """Why decoding runs compiled or eager (`compiled_decoding`), for the run log."""
    measurement: capture.Measurement | None = None
    """Set by `units`, once the model's layers are known."""
    report: GenerationReport = field(default_factory=GenerationReport)
    kind = "generate"
    version = STAGE_VERSION
    progress_unit = "tokens"

    def inputs(self) -> dict:
        return {
            "prompts": content_hash(self.prompts),
            "model": self.pool.key(self.alias),
            "generation": self.settings.model_dump(mode="json"),
            "batch_size": self.batch_size,
            # compiled decoding may pick other tokens in bf16 (an eager run's key is unchanged)
            **({"compile": True} if self.compile else {}),
            **({"steering": self.steering.record()} if self.steering is not None else {}),
            **({} if self.special_tokens else {"special_tokens": False}),
            # measured while decoding: the continuations are the same, each also carries its capture record
            **({"capture": decode_capture.key(self.capture, self.pool)} if self.capture else {}),
        }

    def units(self) -> list[list[int]]:
        loaded = self.pool.model(self.alias)
        lengths = [len(loaded.tokenizer(prompt, add_special_tokens=self.special_tokens)["input_ids"]) for prompt in self.prompts]
        recorded = 0
        if self.capture is not None:
            self.measurement = self.capture.measurement(resolve_layers(loaded.model, self.capture.capture.layers))
            recorded = decode_capture.recorded_bytes_per_sequence(loaded.model, self.measurement, self.settings.max_new_tokens)
        self.batch_size = generation_batch_size(
            self.batch_size, loaded.model, loaded.input_device, lengths, self.settings.max_new_tokens, self.compile,
            f"{self.pool.spec_path}: runtime.generation_batch_size: batches of {self.batch_size} prompts", recorded,
        )
        return plan_batches(lengths, self.batch_size)

    def work(self, unit: list[int]) -> int:
        """Its tokens at most (a batch whose sequences all end early decodes fewer)."""
        return len(unit) * self.settings.max_new_tokens

    def compute(self, unit: list[int], folder: Path) -> list[dict]:
        loaded = self.pool.model(self.alias)
        continuations = generate_batch(
            loaded.model, loaded.tokenizer, loaded.input_device, [self.prompts[i] for i in unit],
            self.settings, seed=self.settings.seed * 1_000_003 + unit[0], compile=self.compile, report=self.report,
            on_tokens=self.progress.advance, steering=self.steering, special_tokens=self.special_tokens,
            measurement=self.measurement,
        )
        for continuation in continuations:
            if continuation.get("capture") is not None:
                record = continuation["capture"]
                record["tokens"] = [loaded.tokenizer.decode([token]) for token in record.pop("response_ids")]
        return continuations

    def check(self, output: list[dict]) -> str | None:
        return None if len(output) == len(self.prompts) else f"{len(output)} continuations for {len(self.prompts)} prompts"

    def placeholder(self, key: str) -> list[dict]:
        record = (capture.CaptureStage.placeholder_record(key) | {"layers": []}) if self.capture else None
        return [{"response": f"{key}:{i}", "n_new_tokens": 0, "stopped_early": False}
                | ({"capture": record} if record else {}) for i in range(len(self.prompts))]

    def describe(self, output: list[dict]) -> str:
        computed = f", batches of {self.batch_size}, {self.report.summary()}" if self.report.run_seconds or self.report.graphs else ""
        measured = ", measured while decoding" if self.capture else ""
        decoding = f", {self.decoding}" if self.decoding else ""
        return f"{self.alias}, {len(output)} continuations{measured}{decoding}{computed}"
