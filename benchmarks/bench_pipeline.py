"""Benchmark: the harness's generation and capture stages vs a seed-style pipeline and the floor.

Ways to do the same work, on the same model, texts and device, in one process:

- harness: ``generate.generate_batch`` over ``generate.plan_batches`` batches, then
  ``capture.measure_batch`` over ``capture.plan_batches`` batches (one fused forward per batch:
  hooks reduce every layer to metrics on the device, CE through the chunked LM head);
- harness compiled: the same with ``runtime.compile`` (static KV cache, compiled decoding step;
  decoder blocks compiled for the capture forward, run last so the other parts stay eager);
- harness measured while decoding (``capture.from_generation: auto``): generation with the
  capture hooks running (``harness.stages.decode_capture``), then the capture forward over the
  human texts only (and any generated text whose ids do not round-trip);
- seed-style: generation in batches of 8; capture one text at a time with
  ``output_hidden_states=True``, every layer's response states copied to CPU and saved; metrics
  computed from the saved files; then a second batch-1 forward for CE from full logits;
- floor: generation in one batch plus a bare batched forward of the decoder (no hooks, no
  metrics, no LM head) over the harness's capture batches: what any pipeline must at least spend;
- compiled floor: the floor with a static KV cache and compiled decoding, and a compiled forward.

Compiled parts run once in full to compile (reported apart), then are timed on a second run.
With several ``--n-samples`` every size runs in the same process on the same model, so graphs
compiled for one size serve the next where shapes agree.

Run by hand (not in CI; Linux: memory is read from /proc), from the repository root:

    python benchmarks/bench_pipeline.py --model gemma3-270m --n-samples 50     # CPU, offline
    python benchmarks/bench_pipeline.py --random-weights --n-samples 100 2000   # GPU: Gemma-2-2B shape, bf16
    python benchmarks/bench_pipeline.py --random-weights --config tiny --device cpu --n-samples 4
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import Gemma2Config, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import make_random_gemma2  # noqa: E402
import roofline  # noqa: E402

from harness import structure  # noqa: E402
from harness.grid import Grid  # noqa: E402
from harness.stages import capture, data, decode_capture, generate  # noqa: E402
from harness.schema import Spec  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.sources import GenerationSpec  # noqa: E402
from harness.metrics import LAYER_METRICS  # noqa: E402

SPEC_FILES = {"gemma3-270m": "gemma3-270m.yaml", "smollm2": "quickstart.yaml", "random": "baseline.yaml"}
"""Which spec each --model takes its model, metrics, generation and runtime settings from."""
SEED_GENERATION_BATCH = 8
SEED_MAX_SAMPLES = 100
"""The seed-style pipeline runs only at sizes up to this (at 2,000 it would take ~20 GPU minutes)."""
SYNTHETIC_PROMPT_TOKENS = 20
"""Random-weights mode: the seed's workload of 20-token prompts (responses: max_new_tokens)."""
RANDOM_MODE_SAMPLES = 100
WARMUP_ITEMS = 2
"""Each eager part runs once on this many items before it is timed."""
MIB = 2**20


CONFIGS: dict[str, Callable[[], Gemma2Config]] = {
    "gemma-2-2b": make_random_gemma2.gemma_2_2b_config,
    "tiny": make_random_gemma2.tiny_config,
}


# -- workload ----------------------------------------------------------------------------------
@dataclass
class Workload:
    """The model and texts every part runs on, with the harness settings taken from a spec."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    prompts: list[str]
    human_responses: list[str]
    generation: GenerationSpec
    metrics: list[str]
    generation_batch_size: int | Literal["auto"]
    token_budget: int | Literal["auto"]
    label: str
    compiled_decoder: Callable | None = None
    """The decoder through torch.compile, made on first use (compiled floor)."""
    capture_token_budget: int | None = None
    """The token budget the last harness capture ran with ("auto" is read from free memory then)."""

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def first(self, n_samples: int) -> Workload:
        """The same model and settings on the first `n_samples` samples."""
        return dataclasses.replace(self, prompts=self.prompts[:n_samples], human_responses=self.human_responses[:n_samples])


def id_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word "i", so synthetic texts are exact id sequences.

    It lets random-weights mode drive the harness's text-in, text-out stage functions unchanged.
    Ids 0-2 are Gemma's pad, eos and bos.
    """
    specials = ["<pad>", "<eos>", "<bos>"]
    vocab = {token: i for i, token in enumerate(specials)} | {str(i): i for i in range(len(specials), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def random_model(config: Gemma2Config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A causal LM with random weights, initialized directly on the device, that never stops early.

    Its weights do not require grad, as harness.models.load_model leaves them; that decides which
    kernels run (without grad-requiring weights, torch.matmul stops folding a non-contiguous 3-D
    input into one GEMM).
    """
    model = make_random_gemma2.random_model(config, dtype, device)
    # Random weights rarely pick EOS, but never stopping keeps every response at max_new_tokens.
    model.generation_config.eos_token_id = None
    return model


def synthetic_texts(vocab_size: int, n_samples: int, response_tokens: int) -> tuple[list[str], list[str]]:
    """Prompts and "human" responses of random ids (never the special ids 0-2)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (n_samples, SYNTHETIC_PROMPT_TOKENS + response_tokens), generator=generator)
    prompts, responses = ids.split([SYNTHETIC_PROMPT_TOKENS, response_tokens], dim=1)
    return [ids_as_text(row) for row in prompts], [ids_as_text(row) for row in responses]


def ids_as_text(ids: torch.Tensor) -> str:
    """What id_tokenizer encodes back to exactly these ids."""
    return " ".join(str(int(token)) for token in ids)


def wikitext_texts(spec: Spec, tokenizer, n_samples: int, where: str) -> tuple[list[str], list[str]]:
    """The spec's WikiText-2 prompts and human continuations."""
    dataset = spec.dataset.model_copy(update={"n_samples": n_samples})
    samples = data.select_samples(data.read_rows(dataset, where), tokenizer, dataset, where)
    return [sample.prompt for sample in samples], [sample.human_response for sample in samples]


def load_workload(args: argparse.Namespace) -> Workload:
    spec_path = REPO / "specs" / SPEC_FILES[args.model]
    spec = load_spec(spec_path)
    generation = spec.conditions["model"].generation
    device = torch.device(args.device)
    if args.model == "random":
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        config = CONFIGS[args.config]()
        model, tokenizer, input_device = random_model(config, dtype, device), id_tokenizer(config.vocab_size), device
        prompts, human = synthetic_texts(config.vocab_size, max(args.n_samples or [RANDOM_MODE_SAMPLES]), generation.max_new_tokens)
        label = f"random weights, {args.config} config"
    else:
        from harness.models import load_model
        from harness.pool import model_cache_dir

        model_spec = spec.models[spec.capture_model]
        model_spec = model_spec.model_copy(update={"device_map": args.device, "dtype": args.dtype or model_spec.dtype})
        loaded = load_model(model_spec, model_cache_dir(), f"{spec_path}: models.{spec.capture_model}")
        model, tokenizer, input_device = loaded.model, loaded.tokenizer, loaded.input_device
        prompts, human = wikitext_texts(spec, tokenizer, max(args.n_samples or [spec.dataset.n_samples]), str(spec_path))
        label = model_spec.id or args.model
    return Workload(
        model, tokenizer, input_device, prompts, human, generation, spec.metrics,
        args.generation_batch_size or spec.runtime.generation_batch_size,
        args.token_budget or spec.runtime.token_budget, label,
    )


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Part:
    name: str
    seconds: float
    peak_rss_mib: float
    """Peak resident memory of the process during the part (peak reset before it)."""
    peak_device_mib: float | None
    """torch.cuda.max_memory_allocated during the part, on CUDA."""
    compile_seconds: float | None = None
    """Compiled parts: the first, compiling run's time less the timed run's."""


def reset_peak_rss() -> None:
    """Make getrusage's ru_maxrss restart from the current RSS (Linux: /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()


def peak_device_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None


def timed(
    name: str, run: Callable[[Sequence], Any], items: Sequence, device: torch.device, compiled: bool = False,
    warm_all: bool = False,
) -> tuple[Part, Any]:
    """Warm up, then time `run(items)` and record its peak memory.

    An eager part warms up on a few items, or with `warm_all` on every item (on a GPU a batch
    shape's first run also selects kernels); a compiled one runs once on every item, which
    compiles each shape it meets, and that run's extra time is its compile time.
    """
    start = time.perf_counter()
    run(items if compiled or warm_all else items[:WARMUP_ITEMS])
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    reset_peaks(device)
    start = time.perf_counter()
    result = run(items)
    synchronize(device)
    seconds = time.perf_counter() - start
    compile_seconds = max(0.0, warmup_seconds - seconds) if compiled else None
    return Part(name, seconds, peak_rss_mib(), peak_device_mib(device), compile_seconds), result


# -- the harness's stages ------------------------------------------------------------------------
def generation_batch_size(work: Workload, lengths: Sequence[int], compile: bool, recorded_bytes: int = 0) -> int:
    if work.generation_batch_size == "auto":
        return generate.auto_batch_size(work.model, work.device, lengths, work.generation.max_new_tokens, compile, recorded_bytes)
    return work.generation_batch_size


def token_budget(work: Workload, tokenized: Sequence[capture.Tokenized]) -> int:
    if work.token_budget == "auto":
        return capture.auto_token_budget(work.model, work.device, max(len(item.input_ids) for item in tokenized))
    return work.token_budget


def capture_batches(work: Workload, tokenized: Sequence[capture.Tokenized]) -> list[list[int]]:
    work.capture_token_budget = token_budget(work, tokenized)
    return capture.plan_batches([len(item.input_ids) for item in tokenized], work.capture_token_budget)


def harness_generate(work: Workload, prompts: Sequence[str], compile: bool = False) -> list[str]:
    """The generation stage as the runner drives it: length-sorted batches, one seed per batch."""
    return [output["response"] for output in harness_generations(work, prompts, compile)]


def harness_generations(
    work: Workload, prompts: Sequence[str], compile: bool = False, measurement: capture.Measurement | None = None
) -> list[dict]:
    """Every continuation (with its capture record when `measurement` is given: measured while decoding)."""
    lengths = [len(work.tokenizer(prompt)["input_ids"]) for prompt in prompts]
    recorded = 0 if measurement is None else decode_capture.recorded_bytes_per_sequence(
        work.model, measurement, work.generation.max_new_tokens)
    size = generation_batch_size(work, lengths, compile, recorded)
    outputs: dict[int, dict] = {}
    for unit in generate.plan_batches(lengths, size):
        batch = generate.generate_batch(
            work.model, work.tokenizer, work.device, [prompts[i] for i in unit], work.generation,
            seed=work.generation.seed * 1_000_003 + unit[0], compile=compile, measurement=measurement,
        )
        outputs.update(zip(unit, batch))
    return [outputs[i] for i in range(len(prompts))]


def harness_measured_while_decoding(work: Workload, prompts: Sequence[str]) -> list[capture.TextToMeasure]:
    """`capture.from_generation: auto`'s generation; returns the texts left to the forward (their ids do not round-trip)."""
    layers = structure.resolve_layers(work.model, "all")
    measurement = capture.Measurement(Grid(tuple(work.metrics)), layers, capture.report_layers(layers))
    outputs = harness_generations(work, prompts, measurement=measurement)
    return [capture.TextToMeasure(prompt, output["response"]) for prompt, output in zip(prompts, outputs) if output["capture"] is None]


def harness_capture(work: Workload, tokenized: Sequence[capture.Tokenized], compile: bool = False) -> list[dict]:
    """The capture stage: one fused forward (metrics + CE) per token-budget batch."""
    layers = structure.resolve_layers(work.model, "all")
    records: dict[int, dict] = {}
    for unit in capture_batches(work, tokenized):
        measurement = capture.Measurement(Grid(tuple(work.metrics)), layers, capture.report_layers(layers), compile=compile)
        batch = capture.measure_batch(work.model, work.device, work.tokenizer.pad_token_id, [tokenized[i] for i in unit], measurement)
        records.update(zip(unit, batch))
    return [records[i] for i in range(len(tokenized))]


# -- the seed-style pipeline ---------------------------------------------------------------------
def seed_generate(work: Workload, prompts: Sequence[str]) -> list[str]:
    """Generation in fixed batches of 8, in dataset order."""
    responses = []
    for start in range(0, len(prompts), SEED_GENERATION_BATCH):
        batch = list(prompts[start : start + SEED_GENERATION_BATCH])
        outputs = generate.generate_batch(work.model, work.tokenizer, work.device, batch, work.generation, work.generation.seed)
        responses.extend(output["response"] for output in outputs)
    return responses


@torch.inference_mode()
def seed_capture(work: Workload, tokenized: Sequence[capture.Tokenized], folder: Path) -> list[Path]:
    """One text at a time: every hidden state's response tokens copied to CPU and saved."""
    paths = []
    for index, item in enumerate(tokenized):
        ids = torch.tensor([item.input_ids], device=work.device)
        hidden_states = work.model(input_ids=ids, output_hidden_states=True).hidden_states
        layers = {str(layer): state[0, item.response_start :].cpu() for layer, state in enumerate(hidden_states)}
        path = folder / f"text-{index:05d}.safetensors"
        save_file(layers, str(path))
        paths.append(path)
    return paths


def seed_metrics(work: Workload, paths: Sequence[Path]) -> list[dict[str, list[float]]]:
    """Per text, each metric per saved hidden state (embeddings, then every block), from the files."""
    records = []
    for path in paths:
        layers = load_file(str(path))
        states = [layers[str(layer)].float().unsqueeze(0) for layer in range(len(layers))]
        mask = torch.ones(1, states[0].shape[1], dtype=torch.bool)
        records.append({name: [float(LAYER_METRICS[name](state, mask)) for state in states] for name in work.metrics})
    return records


@torch.inference_mode()
def seed_cross_entropy(work: Workload, tokenized: Sequence[capture.Tokenized]) -> list[dict[str, float]]:
    """A second batch-1 forward per text, CE from the full fp32 logits."""
    records = []
    for item in tokenized:
        ids = torch.tensor([item.input_ids], device=work.device)
        logits = work.model(input_ids=ids).logits[0, :-1].float()
        nll = nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        records.append(
            {"ce_loss": float(nll.mean()), "ce_loss_response": float(nll[item.response_start - 1 :].mean())}
        )
    return records


# -- the floor -----------------------------------------------------------------------------------
def floor_generate(work: Workload, prompts: Sequence[str], compile: bool = False) -> list[str]:
    """Generation of every prompt in one batch."""
    outputs = generate.generate_batch(
        work.model, work.tokenizer, work.device, list(prompts), work.generation, work.generation.seed, compile=compile
    )
    return [output["response"] for output in outputs]


def right_padded(tokenized: Sequence[capture.Tokenized], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(item.input_ids) for item in tokenized)
    input_ids = torch.full((len(tokenized), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(tokenized), longest, dtype=torch.long)
    for row, item in enumerate(tokenized):
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
        attention[row, : len(item.input_ids)] = 1
    return input_ids, attention


@torch.inference_mode()
def final_hidden(
    work: Workload, input_ids: torch.Tensor, attention: torch.Tensor, decoder: Callable | None = None
) -> torch.Tensor:
    """The decoder alone (no LM head, no hooks): the final hidden states."""
    decoder = work.model.get_decoder() if decoder is None else decoder  # a compiled module has no truth value
    return decoder(input_ids=input_ids.to(work.device), attention_mask=attention.to(work.device), use_cache=False).last_hidden_state


def compiled_decoder(work: Workload) -> Callable:
    """The decoder through torch.compile, made once per workload model.

    Dynamic shapes: one graph serves every capture batch (rows and lengths vary), where static
    shapes would compile each batch anew.
    """
    if work.compiled_decoder is None:
        work.compiled_decoder = torch.compile(work.model.get_decoder(), dynamic=True)
    return work.compiled_decoder


def floor_forward(work: Workload, tokenized: Sequence[capture.Tokenized], compile: bool = False) -> None:
    """A bare forward of every text, over the capture stage's batches (the same padding)."""
    decoder = compiled_decoder(work) if compile else None
    for unit in capture_batches(work, tokenized):
        final_hidden(work, *right_padded([tokenized[i] for i in unit], work.tokenizer.pad_token_id), decoder)


# -- CE memory -----------------------------------------------------------------------------------
CE_PREFIX_POSITIONS = 32


@dataclass
class CrossEntropyMemory:
    batch_shape: tuple[int, int]
    """The largest capture batch: texts x padded length."""
    measured_positions: int
    """Positions token_nll ran over: all of them, or a prefix when the full logits are too large."""
    chunked_peak_mib: float
    """Peak memory added by capture.token_nll."""
    full_logits_mib: float
    """Size of the fp32 logits of the whole batch."""
    full_logits_peak_mib: float | None
    """Peak memory added by the full-logits CE, when it fit in memory to measure."""


def memory_in_use_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def peak_added_mib(run: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    reset_peaks(device)
    before = memory_in_use_mib(device)
    run()
    synchronize(device)
    peak = peak_device_mib(device) if device.type == "cuda" else peak_rss_mib()
    return max(0.0, peak - before)  # the peak is never below the start; a negative is rounding


def memory_free_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / MIB
    meminfo = Path("/proc/meminfo").read_text()
    return int(next(line for line in meminfo.splitlines() if line.startswith("MemAvailable:")).split()[1]) / 1024


@torch.inference_mode()
def full_logits_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """CE the usual way: fp32 logits of the whole batch at once (softcapped as the model does)."""
    logits = model.get_output_embeddings()(hidden).float()[:, :-1]
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = logits.div_(softcap).tanh_().mul_(softcap)  # in place: one fp32 copy of the logits
    return nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


def cross_entropy_memory(work: Workload, tokenized: Sequence[capture.Tokenized]) -> CrossEntropyMemory:
    """Peak memory of chunked CE vs full fp32 logits, on the harness's largest capture batch.

    When the full logits are too large to allocate, token_nll runs on the batch's first
    CE_PREFIX_POSITIONS positions only: its peak is one chunk of positions whatever the length,
    and a CPU run is spared a second pass of the LM head over the whole batch.
    """
    units = capture_batches(work, tokenized)
    largest = max(units, key=lambda unit: len(unit) * max(len(tokenized[i].input_ids) for i in unit))
    input_ids, attention = right_padded([tokenized[i] for i in largest], work.tokenizer.pad_token_id)
    batch_shape = tuple(input_ids.shape)
    vocab = work.model.get_output_embeddings().weight.shape[0]
    full_mib = batch_shape[0] * (batch_shape[1] - 1) * vocab * 4 / MIB
    # The full logits exist in the model's dtype and in fp32 at once; allocate them only when that fits easily.
    fits = 3 * full_mib < memory_free_mib(work.device)
    positions = batch_shape[1] if fits else min(batch_shape[1], CE_PREFIX_POSITIONS)
    input_ids, attention = input_ids[:, :positions], attention[:, :positions]
    hidden = final_hidden(work, input_ids, attention)  # causal: a prefix's states need only the prefix
    input_ids = input_ids.to(hidden.device)
    with torch.inference_mode():
        scored = capture.scored_tokens(attention.cpu())
        chunked = peak_added_mib(lambda: capture.token_nll(work.model, hidden, input_ids, scored), work.device)
    full = peak_added_mib(lambda: full_logits_nll(work.model, hidden, input_ids), work.device) if fits else None
    return CrossEntropyMemory(batch_shape, positions, chunked, full_mib, full)


# -- the benchmark ---------------------------------------------------------------------------------
HARNESS_PARTS = ("harness generate", "harness capture+CE")
HARNESS_DECODING_PARTS = ("harness generate, measured", "harness capture+CE, human only")
"""`capture.from_generation: auto` (eager decoding): the generated texts measured while decoding."""
HARNESS_COMPILED_PARTS = ("harness compiled generate", "harness compiled capture+CE")
SEED_PARTS = ("seed generate", "seed capture", "seed metrics", "seed CE")
FLOOR_PARTS = ("floor generate", "floor forward")
COMPILED_FLOOR_PARTS = ("compiled floor generate", "compiled floor forward")
PART_ORDER = HARNESS_PARTS + HARNESS_DECODING_PARTS + HARNESS_COMPILED_PARTS + FLOOR_PARTS + COMPILED_FLOOR_PARTS + SEED_PARTS


@dataclass
class BenchmarkResult:
    label: str
    tokenized: list[capture.Tokenized]
    """The capture texts: every human response, then every harness-generated one."""
    parts: dict[str, Part] = field(default_factory=dict)
    seed_bytes_written: int | None = None
    ce_memory: CrossEntropyMemory | None = None
    harness_records: list[dict] = field(default_factory=list)
    seed_metric_records: list[dict] = field(default_factory=list)
    seed_ce_records: list[dict] = field(default_factory=list)
    compiled_differences: int | None = None
    """How many harness continuations compiled generation changed (bf16 may; fp32 should not)."""
    work: dict[str, roofline.Work] = field(default_factory=dict)
    """Per part, the tokens it ran through the model and its decoding steps."""
    decoding_fallbacks: int = 0
    """Generated texts the measured generation left to the forward (their ids did not round-trip)."""

    @property
    def n_samples(self) -> int:
        return len(self.tokenized) // 2

    @property
    def n_tokens(self) -> int:
        return sum(len(item.input_ids) for item in self.tokenized)

    def total(self, names: Sequence[str]) -> float | None:
        if not all(name in self.parts for name in names):
            return None
        return sum(self.parts[name].seconds for name in names)


def run_benchmark(work: Workload, skip_seed: bool = False, compiled: bool = False) -> BenchmarkResult:
    """Time every part on the same model and texts; the capture texts are human + harness-generated."""
    parts: dict[str, Part] = {}

    def time_part(name: str, run: Callable[[Sequence], Any], items: Sequence, compiled: bool = False) -> Any:
        # The batched parts meet their shapes only on the full set; the seed style's batch-1 and
        # batch-8 shapes are warm after a few items.
        warm_all = work.device.type == "cuda" and name not in SEED_PARTS
        parts[name], result = timed(name, run, items, work.device, compiled, warm_all)
        compile_note = f" (compile {parts[name].compile_seconds:.2f} s)" if compiled else ""
        print(f"  {name}: {parts[name].seconds:.2f} s{compile_note}", file=sys.stderr, flush=True)  # a long run's progress
        return result

    generated = time_part("harness generate", lambda prompts: harness_generate(work, prompts), work.prompts)
    texts = [
        capture.TextToMeasure(prompt, response)
        for responses in (work.human_responses, generated)
        for prompt, response in zip(work.prompts, responses)
    ]
    tokenized = [capture.tokenize_for_capture(work.tokenizer, text) for text in texts]
    harness_records = time_part("harness capture+CE", lambda items: harness_capture(work, items), tokenized)
    fallbacks = time_part("harness generate, measured", lambda prompts: harness_measured_while_decoding(work, prompts), work.prompts)
    human_and_fallbacks = tokenized[: len(work.prompts)] + [capture.tokenize_for_capture(work.tokenizer, text) for text in fallbacks]
    time_part("harness capture+CE, human only", lambda items: harness_capture(work, items), human_and_fallbacks)
    time_part("floor generate", lambda prompts: floor_generate(work, prompts), work.prompts)
    time_part("floor forward", lambda items: floor_forward(work, items), tokenized)
    result = BenchmarkResult(work.label, tokenized, parts)
    result.harness_records = harness_records
    result.decoding_fallbacks = len(fallbacks)
    result.work = part_work(work, tokenized, human_and_fallbacks, compiled)
    if compiled:
        # The compiled floor first: harness batches of the same shapes then reuse its graphs.
        time_part("compiled floor generate", lambda prompts: floor_generate(work, prompts, compile=True), work.prompts, True)
        time_part("compiled floor forward", lambda items: floor_forward(work, items, compile=True), tokenized, True)
        compiled_generated = time_part(
            "harness compiled generate", lambda prompts: harness_generate(work, prompts, compile=True), work.prompts, True
        )
        result.compiled_differences = sum(a != b for a, b in zip(generated, compiled_generated))
    result.ce_memory = cross_entropy_memory(work, tokenized)
    if not skip_seed:
        time_part("seed generate", lambda prompts: seed_generate(work, prompts), work.prompts)
        with tempfile.TemporaryDirectory(prefix="bench-seed-") as folder:
            paths = time_part("seed capture", lambda items: seed_capture(work, items, Path(folder)), tokenized)
            result.seed_bytes_written = sum(path.stat().st_size for path in paths)
            result.seed_metric_records = time_part("seed metrics", lambda items: seed_metrics(work, items), paths)
        result.seed_ce_records = time_part("seed CE", lambda items: seed_cross_entropy(work, items), tokenized)
    if compiled:
        # Last, and undone after: compiling the capture patches the model's blocks in place.
        time_part("harness compiled capture+CE", lambda items: harness_capture(work, items, compile=True), tokenized, True)
        eager_blocks(work.model)
    return result


def part_work(work: Workload, tokenized: Sequence[capture.Tokenized], human: Sequence[capture.Tokenized],
              compiled: bool) -> dict[str, roofline.Work]:
    """Per part, what it ran through the model (for the roofline): generation, its prompts and new
    tokens and a step per new token of each generate call; a forward, its texts' tokens."""
    lengths = [len(work.tokenizer(prompt)["input_ids"]) for prompt in work.prompts]
    new = work.generation.max_new_tokens
    tokens = sum(lengths) + new * len(lengths)
    context = sum(lengths) // len(lengths) + new // 2

    def generation(calls: int) -> roofline.Work:
        return roofline.Work(tokens, calls * new, context)

    def forward(texts: Sequence[capture.Tokenized]) -> roofline.Work:
        total = sum(len(item.input_ids) for item in texts)
        return roofline.Work(total, 0, total // max(1, 2 * len(texts)))

    calls = len(generate.plan_batches(lengths, generation_batch_size(work, lengths, False)))
    parts = {
        "harness generate": generation(calls), "harness capture+CE": forward(tokenized),
        "harness generate, measured": generation(calls), "harness capture+CE, human only": forward(human),
        "floor generate": generation(1), "floor forward": forward(tokenized),
    }
    if compiled:
        compiled_calls = len(generate.plan_batches(lengths, generation_batch_size(work, lengths, True)))
        parts |= {"harness compiled generate": generation(compiled_calls), "harness compiled capture+CE": forward(tokenized),
                  "compiled floor generate": generation(1), "compiled floor forward": forward(tokenized)}
    return parts


def roofline_lines(result: BenchmarkResult, work: Workload, card: roofline.Card) -> list[str]:
    """Per part, tokens/s against the card's roofline."""
    config = work.model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in work.model.parameters())
    lines = [
        "",
        f"Roofline of {card.name} ({card.bf16_tflops:.0f} bf16 TFLOP/s, {card.memory_gbs:.0f} GB/s): "
        f"{roofline.flops_per_token(config) / 1e9:.2f} GFLOP per token (matmuls), {weight_bytes / 1e9:.2f} GB of weights "
        "read per decoding step",
        "",
        "| part | tokens | tokens/s | roofline tokens/s | bound by | of the roofline |",
        "|---|---:|---:|---:|---|---:|",
    ]
    return lines + [
        roofline.roofline_line(card, config, weight_bytes, name, result.parts[name].seconds, result.work[name])
        for name in PART_ORDER if name in result.parts and name in result.work
    ]


def eager_blocks(model: nn.Module) -> None:
    """Undo `capture.compile_blocks`, so the next size's eager parts run eager."""
    for block in structure.decoder_blocks(model):
        if getattr(block, "harness_compiled", False):
            del block.forward, block.harness_compiled


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def format_report(result: BenchmarkResult, work: Workload, card: roofline.Card | None = None) -> str:
    """A markdown table of the parts, then the ratios the issue's acceptance is stated in, and
    with a `card` (default: the CUDA device's, if the table knows it) the roofline of each part."""
    card = card or (roofline.find_card(device_name(work.device)) if work.device.type == "cuda" else None)
    device_column = work.device.type == "cuda"
    header = "| part | seconds | compile s | peak RSS MiB |" + (" peak GPU MiB |" if device_column else "")
    lines = [
        f"{device_name(work.device)} · {result.label} · {work.dtype} · {work.model.config._attn_implementation} attention · "
        f"N = {result.n_samples}: {len(result.tokenized)} texts, {result.n_tokens} tokens · "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1-min load average {os.getloadavg()[0]:.1f}",
        "",
        header,
        "|---|---:|---:|---:|" + ("---:|" if device_column else ""),
    ]
    for name in PART_ORDER:
        if name in result.parts:
            part = result.parts[name]
            compile_s = f"{part.compile_seconds:.2f}" if part.compile_seconds is not None else ""
            row = f"| {name} | {part.seconds:.2f} | {compile_s} | {part.peak_rss_mib:.0f} |"
            lines.append(row + (f" {part.peak_device_mib:.0f} |" if device_column else ""))
    harness, floor, seed = (result.total(names) for names in (HARNESS_PARTS, FLOOR_PARTS, SEED_PARTS))
    stage_ratios = (
        result.parts["harness generate"].seconds / result.parts["floor generate"].seconds,
        result.parts["harness capture+CE"].seconds / result.parts["floor forward"].seconds,
    )
    lines += [
        "",
        f"- harness generate + capture: {harness:.2f} s; floor: {floor:.2f} s; harness/floor = {harness / floor:.2f} "
        f"(generation {stage_ratios[0]:.2f}, capture+CE vs bare forward {stage_ratios[1]:.2f})",
    ]
    measured = result.total(HARNESS_DECODING_PARTS)
    lines.append(
        f"- measured while decoding (capture.from_generation: auto): {measured:.2f} s, {measured / floor:.2f}x the floor, "
        f"{measured / harness:.2f}x the harness with a second forward; {result.decoding_fallbacks} of "
        f"{result.n_samples} generated texts left to the forward"
    )
    auto_compiled, rule = generate.compiled_decoding("auto", work.device.type, result.n_samples)
    harness_compiled, compiled_floor = result.total(HARNESS_COMPILED_PARTS), result.total(COMPILED_FLOOR_PARTS)
    # auto: compiled decoding (no capture while decoding) and an eager forward, or eager decoding measured
    auto_total = (result.parts["harness compiled generate"].seconds + result.parts["harness capture+CE"].seconds
                  if auto_compiled and harness_compiled is not None else None if auto_compiled else measured)
    if auto_total is not None:
        lines.append(f"- harness auto, decoding {rule}: {auto_total:.2f} s")
    if harness_compiled is not None:
        compile_s = sum(result.parts[name].compile_seconds for name in COMPILED_FLOOR_PARTS + HARNESS_COMPILED_PARTS)
        lines.append(
            f"- compiled: harness {harness_compiled:.2f} s, floor {compiled_floor:.2f} s: harness throughput "
            f"{compiled_floor / harness_compiled:.0%} of the compiled floor's (one-time compilation {compile_s:.1f} s); "
            f"{result.compiled_differences} of {result.n_samples} continuations differ from eager"
        )
    if seed is not None:
        seed_capture_s = result.total(SEED_PARTS[1:])
        capture_s = result.parts["harness capture+CE"].seconds
        lines += [
            f"- seed-style: {seed:.2f} s; seed/harness = {seed / harness:.1f}x overall",
            f"- capture+CE: seed-style {seed_capture_s:.2f} s vs harness {capture_s:.2f} s: "
            f"harness {seed_capture_s / capture_s:.1f}x faster",
            f"- generation: seed-style (batches of {SEED_GENERATION_BATCH}) "
            f"{result.parts['seed generate'].seconds:.2f} s vs harness (batches of {work.generation_batch_size}) "
            f"{result.parts['harness generate'].seconds:.2f} s",
            f"- seed-style wrote {result.seed_bytes_written / 1e9:.3f} GB",
        ]
    if device_column:
        lines.append(capture_memory_line(work, result))
    if card is not None:
        lines += roofline_lines(result, work, card)
    memory = result.ce_memory
    full_peak = f", measured peak +{memory.full_logits_peak_mib:.0f} MiB" if memory.full_logits_peak_mib is not None else " (not allocated)"
    lines.append(
        f"- CE on the largest capture batch {memory.batch_shape}: capture.token_nll peak +{memory.chunked_peak_mib:.0f} MiB"
        f" (over {memory.measured_positions} positions); "
        f"full fp32 logits {memory.full_logits_mib:.0f} MiB{full_peak}"
    )
    return "\n".join(lines)


def capture_memory_line(work: Workload, result: BenchmarkResult) -> str:
    """The capture part's peak device memory above the weights vs what the token budget allowed for."""
    longest = max(len(item.input_ids) for item in result.tokenized)
    budget = work.capture_token_budget
    estimate_mib = (budget * capture.bytes_per_token(work.model, longest) + capture.LOGITS_CHUNK_BYTES) / MIB
    weights_mib = sum(p.numel() * p.element_size() for p in work.model.parameters()) / MIB
    peaks = ", ".join(
        f"{name} +{result.parts[name].peak_device_mib - weights_mib:.0f} MiB"
        for name in ("harness capture+CE", "harness compiled capture+CE") if name in result.parts
    )
    return (
        f"- capture memory above the weights ({weights_mib:.0f} MiB): {peaks}; the token budget "
        f"({budget} tokens, longest text {longest}) allows {estimate_mib:.0f} MiB"
    )


def batch_setting(value: str) -> int | str:
    """An argparse type: a positive integer or "auto"."""
    return value if value == "auto" else int(value)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SPEC_FILES), default="gemma3-270m")
    parser.add_argument("--random-weights", dest="model", action="store_const", const="random",
                        help="same as --model random: a config's shape with random weights, no files needed")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="gemma-2-2b", help="random-weights shape")
    parser.add_argument("--n-samples", type=int, nargs="+",
                        help=f"one or more sizes, each timed in turn; default: the spec's (random: {RANDOM_MODE_SAMPLES})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: the spec's (random: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--generation-batch-size", type=batch_setting,
                        help="harness generation batch, or auto; default: the spec's")
    parser.add_argument("--token-budget", type=batch_setting, help="harness capture batch budget, or auto; default: the spec's")
    parser.add_argument("--compiled", type=int, nargs="*", metavar="N",
                        help="also time harness compiled and the compiled floor (static KV cache, torch.compile), "
                        "at these sizes (none named: every size)")
    parser.add_argument("--skip-seed", action="store_true", help="time only the harness and the floor")
    parser.add_argument("--seed-max-samples", type=int, default=SEED_MAX_SAMPLES,
                        help="the seed-style pipeline runs only at sizes up to this")
    parser.add_argument("--card", choices=[card.name for card in roofline.CARDS],
                        help="the roofline's card; default: the CUDA device's, if the table knows it (none on a CPU)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads (torch.set_num_threads); 1 resists other processes' load best")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = load_workload(args)
    for n_samples in args.n_samples or [len(work.prompts)]:
        sized = work.first(n_samples)
        skip_seed = args.skip_seed or n_samples > args.seed_max_samples
        compiled = args.compiled is not None and (not args.compiled or n_samples in args.compiled)
        card = next((card for card in roofline.CARDS if card.name == args.card), None)
        print(format_report(run_benchmark(sized, skip_seed, compiled), sized, card) + "\n", flush=True)
        work.compiled_decoder = sized.compiled_decoder  # the next size reuses its graphs
    return 0


if __name__ == "__main__":
    sys.exit(main())
