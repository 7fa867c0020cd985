"""Capture stage: one fused, batched forward per batch of texts computes every metric.

Hooks where each capture site reads a decoder block (`harness.sites`, found in the block by
`harness.structure`; by default the block's output, the residual stream after block l) reduce
what they see to per-text trajectory metrics on the device right away, into one preallocated
buffer of the grid's columns (`harness.grid`) that reaches the host in one transfer per
batch: no activation leaves the device unless the spec asks for it. (``hidden_states[-1]`` of a
transformers model is taken after the final norm; block outputs keep every layer on the
same footing.) Cross-entropy comes from the final hidden states through the LM head in
chunks of positions, so fp32 logits for a whole batch never exist at once.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Sequence

from harness.artifacts import content_hash, staged
from harness.executor import CompiledCalls, Stage
from harness.grid import Column, Grid, Window
from harness.lazy import inference_mode, lazy_import
from harness.metrics import LAYER_METRICS, PROJECTION_METRICS, TEXT_METRIC_SCORES, TEXT_METRICS
from harness.models import block_activation_bytes, memory_budget
from harness.schema import CaptureSpec, ResponseTokenization, Spec
from harness.structure import decoder_blocks, resolve_layers, site_taps

if TYPE_CHECKING:
    from harness.directions import DirectionSet
    from harness.intervening import CaptureIntervention
    from harness.pool import ModelPool

torch = lazy_import("torch")
nn = lazy_import("torch.nn")

STAGE_VERSION = 4
"""Part of every capture cache key. 2: CE over contiguous rows (the last bits of ce_loss changed).
3: a metric undefined for a short response is NaN (was 0.0).
4: `token_budget: auto` on a CPU is CPU_TOKEN_BUDGET (other batches: the last bits of every value changed)."""
LOGITS_CHUNK_BYTES = 256 * 2**20
"""Upper bound on the fp32 logits materialized at once when computing CE."""
COMPILE_BUCKET = 64
"""With `runtime.compile`, capture forwards are padded to a multiple of this many tokens, so a
run compiles for a few lengths only."""
CPU_TOKEN_BUDGET = 2048
"""`token_budget: auto` on a CPU: a text of ~100 tokens already fills the GEMMs there, so larger
batches buy nothing and only add padding (benchmarks/README.md)."""


@dataclass(frozen=True)
class TextToMeasure:
    """One text as the capture model sees it."""

    prompt: str
    response: str
    max_response_tokens: int | None = None
    """Truncate the response to this many tokens (length matching)."""
    model_prompt: str | None = None
    """The prompt as a chat model reads it (`harness.chat`): then the ids are exactly its
    tokens and the response's, neither with added special tokens."""

    @property
    def full_text(self) -> str:
        return f"{self.prompt} {self.response}"


Intervened = Callable[["PaddedBatch", Callable[["PaddedBatch"], "torch.Tensor"]], AbstractContextManager["torch.Tensor"]]
"""See `measure_batch`."""


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
    A chat-formatted prompt (`model_prompt`) is always read the separate way, its BOS its own.
    """
    if text.model_prompt is not None:
        prompt_ids = tokenizer(text.model_prompt, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + tokenizer(text.response, add_special_tokens=False)["input_ids"]
        response_start = len(prompt_ids)
    elif response_tokenization == "separate":
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


def bytes_per_token(model: nn.Module, longest: int) -> int:
    """A rough per-token cost of one inference forward: the residual stream, attention
    projections and MLP activations in the model's dtype, the hook's float32 copies, and the
    attention scores of a row of `longest` tokens. The logits are bounded separately
    (LOGITS_CHUNK_BYTES)."""
    return block_activation_bytes(model, longest) + 8 * model.config.get_text_config().hidden_size * 4


def auto_token_budget(model: nn.Module, device: torch.device, longest: int) -> int:
    """Padded tokens per forward: what fits in half the free memory of `device`, and on a CPU
    at most CPU_TOKEN_BUDGET (never less than one row of `longest`)."""
    return token_budget("auto", model, device, longest, "")


def token_budget(setting: int | str, model: nn.Module, device: torch.device, longest: int, what: str) -> int:
    """`runtime.token_budget`: `auto`'s choice, or the number checked to fit (`harness.models.memory_budget`);
    a forward holds at least one row of `longest` tokens and its logits chunk."""
    cpu_cap = CPU_TOKEN_BUDGET if setting == "auto" and torch.device(device).type != "cuda" else None  # a CPU gains nothing from more
    return memory_budget(setting, device, bytes_per_token(model, longest), what, least=longest, most=cpu_cap,
                         reserved=LOGITS_CHUNK_BYTES)


def report_layers(layers: list[int]) -> list[int]:
    """A few layers spread over the depth whose per-token deltas are kept for the report."""
    picks = {layers[round(q * (len(layers) - 1))] for q in (0, 1 / 3, 2 / 3, 1)}
    return sorted(picks)


def token_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy [B, T] of the tokens `scored` marks ([B, T] on the host; 0 elsewhere):
    position t scores token t given < t, from the hidden state at t - 1 (`scored` is False at t = 0).

    Logits come from the LM head in chunks of positions, with the model's final-logit
    softcapping (Gemma 2) applied as its own forward does (`head_logits`).
    """
    at, targets = _scored(hidden, input_ids, scored)
    rows = _predicting_rows(hidden, at)
    flat = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    for chunk, logits in _chunked_logits(model, rows):
        flat[chunk] = nn.functional.cross_entropy(logits, targets[chunk], reduction="none")
    return _per_token(flat, at, input_ids.shape)


def token_kl(model: nn.Module, hidden: torch.Tensor, clean: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """KL(intervened || clean) of the next-token distributions [B, T], placed as `token_nll`'s
    values are: `hidden` and `clean` are the final hidden states of the same batch with and
    without an intervention."""
    at, _ = _scored(hidden, input_ids, scored)
    rows, clean_rows = _predicting_rows(hidden, at), _predicting_rows(clean, at)
    flat = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    # two chunks of logits at a time: half as many rows each
    for (chunk, logits), (_, clean_logits) in zip(_chunked_logits(model, rows, 2), _chunked_logits(model, clean_rows, 2)):
        flat[chunk] = nn.functional.kl_div(
            clean_logits.log_softmax(-1), logits.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
    return _per_token(flat, at, input_ids.shape)


def _scored(hidden: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat index of every scored token (found on the host, so that gathering never waits on
    the device) and its token id."""
    at = scored.flatten().nonzero().squeeze(1).to(hidden.device)
    return at, input_ids.to(hidden.device).flatten().index_select(0, at)


def _predicting_rows(hidden: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The hidden state before each scored token: gathered rows are contiguous (a strided 3-D
    slice makes matmul re-read the head's weight per text)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, at - 1)


def _chunked_logits(model: nn.Module, rows: torch.Tensor, at_once: int = 1) -> Iterator[tuple[slice, torch.Tensor]]:
    """fp32 logits of `rows`, chunk by chunk, so that `at_once` chunks stay within LOGITS_CHUNK_BYTES."""
    size = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size(model) * at_once))
    for start in range(0, rows.shape[0], size):
        yield slice(start, start + size), head_logits(model, rows[start : start + size])


def _per_token(flat: torch.Tensor, at: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    values = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=flat.device)
    values[at] = flat
    return values.view(*shape)


def vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def softcapped(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The LM head's output as the model's forward returns it: fp32, with final-logit softcapping (Gemma 2)."""
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    logits = logits.float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The raw next-token logits (before any sampling processor) of final hidden states [..., d]."""
    return softcapped(model, model.get_output_embeddings()(hidden))


def scored_tokens(attention: torch.Tensor) -> torch.Tensor:
    """[B, T] the tokens CE scores: every real token after a row's first."""
    scored = torch.zeros_like(attention, dtype=torch.bool)
    scored[:, 1:] = attention[:, 1:].bool() & attention[:, :-1].bool()
    return scored


@dataclass
class PaddedBatch:
    """A batch of texts right-padded to its longest, with the masks every metric needs (on the host)."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    """[B, T] True on real tokens."""
    response: torch.Tensor
    """[B, T] True on response tokens."""
    first: int
    """First position holding a response token in any row: the span the trajectory metrics see."""
    starts: torch.Tensor
    """[B] each row's first response position."""

    @classmethod
    def of(cls, tokenized: Sequence[Tokenized], pad_token_id: int, multiple: int = 1) -> "PaddedBatch":
        """`multiple`: the padded length is rounded up to it (compiled forwards see few shapes)."""
        batch, longest = len(tokenized), padded_length(tokenized, multiple)
        input_ids = torch.full((batch, longest), pad_token_id, dtype=torch.long)
        attention = torch.zeros(batch, longest, dtype=torch.bool)
        response = torch.zeros(batch, longest, dtype=torch.bool)
        for row, item in enumerate(tokenized):
            input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
            attention[row, : len(item.input_ids)] = True
            response[row, item.response_start : len(item.input_ids)] = True
        starts = torch.tensor([item.response_start for item in tokenized])
        return cls(input_ids, attention, response, int(starts.min()), starts)

    @property
    def span_mask(self) -> torch.Tensor:
        return self.response[:, self.first :]

    def window(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where in the span each row's response tokens `start <= i < end` lie, aligned ([B, W]
        indices: a row's window starts at column 0), and the mask of those that exist (W is 0
        when no row reaches the window)."""
        lengths = self.span_mask.sum(dim=1)  # response tokens per row
        steps = torch.arange(max(0, min(end, int(lengths.max())) - start))
        index = (self.starts - self.first)[:, None] + start + steps
        return index.clamp(max=self.span_mask.shape[1] - 1), start + steps < lengths[:, None]


def compile_blocks(model: nn.Module) -> None:
    """Compile each decoder block's `forward` (once per model). The capture hooks sit on the
    blocks themselves, so they run outside the compiled code and never force a recompile."""
    for block in decoder_blocks(model):
        if not getattr(block, "harness_compiled", False):
            block.forward = torch.compile(block.forward)
            block.harness_compiled = True


def padded_length(tokenized: Sequence[Tokenized], multiple: int = 1) -> int:
    """The longest text's length, rounded up to a multiple of `multiple`."""
    return -(-max(len(item.input_ids) for item in tokenized) // multiple) * multiple


def split_views(buffer: torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """`buffer` cut into consecutive views of `shapes`."""
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(buffer.split(sizes), shapes)]


@dataclass(frozen=True)
class Measurement:
    """What one fused forward measures and keeps (`CaptureSettings.measurement`, or built by hand)."""

    grid: Grid
    """The columns measured, in buffer order (`Grid.columns`)."""
    layers: list[int]
    """Captured decoder blocks (resolved against the model: `resolve_layers`)."""
    keep_deltas_for: list[int] = field(default_factory=list)
    """Captured layers whose per-token delta norms (of the first site) are kept."""
    metric_options: dict[str, dict] = field(default_factory=dict)
    """Keyword options by trajectory metric, as the spec's `metric_options`."""
    directions: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per direction set of the grid, unit vectors `[model layers, d]` the projection metrics project onto."""
    keep_activations: bool = False
    """Also return the first site's activations."""
    activation_dtype: torch.dtype = field(default_factory=lambda: torch.float16)
    compile: bool = False
    """The decoder blocks run compiled, on lengths padded to a multiple of COMPILE_BUCKET."""


def _column_values(
    tokens: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor | None, columns: Sequence[Column],
    measurement: Measurement,
) -> torch.Tensor:
    """[columns, B]: each column's value per text (projections onto `vectors` [sets, d], the grid's direction sets)."""
    projections = tokens @ vectors.T if vectors is not None else None  # [B, T, sets]
    directions = measurement.grid.directions
    return torch.stack([
        PROJECTION_METRICS[column.metric](projections[..., directions.index(column.direction)], mask)
        if column.direction is not None
        else LAYER_METRICS[column.metric](tokens, mask, **measurement.metric_options.get(column.metric, {}))
        for column in columns
    ])


class ColumnBuffer:
    """One batch's values of every column of `measurement.grid` on the device, filled a capture
    site and layer at a time (`fill`) and the text metrics at once (`fill_text`), in one
    preallocated buffer, row by row of `grid.columns()`, which names the values too (`records`):
    it reaches the host in one transfer (a second one for activations).

    A batch is laid out as `padded` (right-padded texts); what a site's hook sees is its hidden
    states from `padded.first` on, the span where any row has response tokens."""

    def __init__(self, measurement: Measurement, padded: PaddedBatch, device: torch.device, hidden_size: int):
        grid, layers = measurement.grid, measurement.layers
        self.measurement, self.padded, self.columns = measurement, padded, grid.columns()
        batch, span = padded.span_mask.shape
        self.rows: dict[tuple[str, Window | None], list[int]] = {}
        """The buffer rows one hook fills, per site and window: consecutive, in column order."""
        for row, column in enumerate(self.columns):
            self.rows.setdefault((column.site, column.window), []).append(row)
        self.scopes: dict[Window | None, tuple[torch.Tensor | None, torch.Tensor]] = {
            None: (None, padded.span_mask), **{window: padded.window(window.start, window.end) for window in grid.windows}
        }
        keep_deltas_for = measurement.keep_deltas_for
        self.shapes = [grid.buffer_shape(len(layers), batch), (len(keep_deltas_for), batch, max(span - 1, 0)),
                       (len(TEXT_METRICS), batch)]
        self.buffer = torch.empty(sum(math.prod(shape) for shape in self.shapes), dtype=torch.float32, device=device)
        self.layer_values, self.deltas, self.text_values = split_views(self.buffer, self.shapes)
        self.activations = None
        if measurement.keep_activations:
            self.activations = torch.empty(len(layers), batch, span, hidden_size, dtype=measurement.activation_dtype, device=device)
        self.delta_slots = {layer: slot for slot, layer in enumerate(keep_deltas_for)}
        if not self.delta_slots.keys() <= set(layers):
            raise ValueError(f"deltas are kept only for captured layers, not {sorted(self.delta_slots.keys() - set(layers))}")
        if set(measurement.directions) != set(grid.directions):
            raise ValueError(f"direction vectors for {sorted(measurement.directions)}, the grid has {list(grid.directions)}")
        self.text_measured: list[tuple[int, str]] = []
        """The text metrics `fill_text` gave a value (index into TEXT_METRICS, name)."""
        self.on_device: dict[torch.device, tuple[dict, torch.Tensor | None]] = {}
        """Per device the layers live on: each scope's token indices (None: the whole span) and
        mask, and the directions [sets, model layers, d]."""

    def _placed(self, device: torch.device) -> tuple[dict, torch.Tensor | None]:
        if device not in self.on_device:
            grid, directions = self.measurement.grid, self.measurement.directions
            vectors = torch.stack([directions[name] for name in grid.directions]).to(device) if grid.directions else None
            self.on_device[device] = (
                {window: (None if index is None else index.to(device), mask.to(device))
                 for window, (index, mask) in self.scopes.items()},
                vectors,
            )
        return self.on_device[device]

    def fill(self, site: str, layer_index: int, hidden: torch.Tensor) -> None:
        """The columns of `site` at the `layer_index`-th captured layer, from its float32 hidden
        states over the span ([B, span, d])."""
        grid, layer = self.measurement.grid, self.measurement.layers[layer_index]
        device_scopes, vectors = self._placed(hidden.device)
        for window, (index, mask) in device_scopes.items():
            filled = self.rows[(site, window)]
            into = slice(filled[0], filled[-1] + 1)
            if mask.shape[1] == 0:  # no text reaches this window
                self.layer_values[into, layer_index] = float("nan")
                continue
            # a window's tokens gathered row by row: each row's window starts at column 0
            tokens = hidden if index is None else hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
            self.layer_values[into, layer_index] = _column_values(
                tokens, mask, vectors[:, layer] if vectors is not None else None, [self.columns[i] for i in filled],
                self.measurement,
            )
        if site == grid.sites[0] and layer in self.delta_slots:
            self.deltas[self.delta_slots[layer]] = (hidden[:, 1:] - hidden[:, :-1]).norm(dim=-1)
        if site == grid.sites[0] and self.activations is not None:
            self.activations[layer_index] = hidden

    def hook(self, site: str, layer_index: int):
        """What the site's tap at that layer calls with its hidden states, in a forward over `padded`."""

        def read(states: torch.Tensor) -> None:
            self.fill(site, layer_index, states[:, self.padded.first :].float())

        return read

    def fill_text(self, scores: dict[str, torch.Tensor]) -> None:
        """The text metrics from per-token scores [B, T] over `padded` (0 where no token is
        scored): `nll`, the next-token CE, and `kl`, the KL from the clean forward when an
        intervention changed this one. A metric of a score not given has no value."""
        padded, device = self.padded, self.buffer.device
        targets = padded.attention.clone()
        targets[:, 0] = False
        targets, response_targets = targets.to(device), (padded.response & targets).to(device)
        self.text_measured = [(index, name) for index, name in enumerate(TEXT_METRICS)
                              if TEXT_METRIC_SCORES.get(name, "nll") in scores]
        for index, name in self.text_measured:
            self.text_values[index] = TEXT_METRICS[name](scores[TEXT_METRIC_SCORES.get(name, "nll")].to(device), targets,
                                                         response_targets)

    def records(self, tokenized: Sequence[Tokenized]) -> list[dict]:
        """One record per text (`measure_batch` says what it holds)."""
        host_values, host_deltas, host_text = (view.numpy() for view in split_views(self.buffer.cpu(), self.shapes))
        host_activations = self.activations.cpu() if self.activations is not None else None
        first, records = self.padded.first, []
        for row, item in enumerate(tokenized):
            lo, hi = item.response_start - first, len(item.input_ids) - first
            record = {
                "n_response_tokens": len(item.input_ids) - item.response_start,
                "response_ids": item.input_ids[item.response_start :],
                "layer_metrics": {column.name: host_values[index, :, row].tolist() for index, column in enumerate(self.columns)},
                "text_metrics": {name: float(host_text[index, row]) for index, name in self.text_measured},
                "deltas": {str(layer): host_deltas[k, row, lo : max(hi - 1, lo)].tolist()
                           for k, layer in enumerate(self.measurement.keep_deltas_for)},
            }
            if host_activations is not None:
                record["activations"] = host_activations[:, row, lo:hi]
            records.append(record)
        return records


@inference_mode
def measure_batch(
    model: nn.Module, input_device: torch.device, pad_token_id: int, tokenized: list[Tokenized], measurement: Measurement,
    intervened: Intervened | None = None,
) -> list[dict]:
    """Every column of `measurement.grid` for a batch of texts, from one right-padded forward.

    Returns one record per text: ``layer_metrics[column name][i]`` per captured layer i,
    ``text_metrics[name]``, ``n_response_tokens``, ``deltas[layer]`` (per-token delta norms of
    the first site for `keep_deltas_for`), and ``activations`` ([layers, response tokens, d] of
    the first site, in `activation_dtype`) if asked. The hooks reduce on the device into one
    `ColumnBuffer`.

    `intervened(padded, forward)`: a context manager (`harness.intervening`) under which the
    forward of `padded` is intervened on, yielding the clean forward's final hidden states of
    the same batch (`kl_from_clean`).
    """
    if measurement.compile:
        compile_blocks(model)
    padded = PaddedBatch.of(tokenized, pad_token_id, COMPILE_BUCKET if measurement.compile else 1)
    values = ColumnBuffer(measurement, padded, input_device, model.config.get_text_config().hidden_size)

    def forward(batch: PaddedBatch) -> torch.Tensor:
        return model.get_decoder()(
            input_ids=batch.input_ids.to(input_device), attention_mask=batch.attention.long().to(input_device), use_cache=False
        ).last_hidden_state

    with intervened(padded, forward) if intervened is not None else nullcontext() as clean:
        # an intervention's hooks come first: the measuring hooks see what it changed
        handles = []
        for site in measurement.grid.sites:
            taps = site_taps(model, site)
            handles += [taps[layer].register(values.hook(site, index)) for index, layer in enumerate(measurement.layers)]
        try:
            hidden = forward(padded)
        finally:
            for handle in handles:
                handle.remove()
    scored = scored_tokens(padded.attention)
    scores = {"nll": token_nll(model, hidden, padded.input_ids, scored)}
    if clean is not None:
        scores["kl"] = token_kl(model, hidden, clean, padded.input_ids, scored)
    values.fill_text(scores)
    return values.records(tokenized)


def response_limits(
    tokenizer, texts: dict[str, list[dict]], length_matching: bool, tokenization: ResponseTokenization = "joint"
) -> dict[str, list[int | None]]:
    """Per condition and sample, the response token cap: each pair's shorter response (length
    matching), or None."""
    n_samples = len(next(iter(texts.values())))
    if not length_matching:
        return {name: [None] * n_samples for name in texts}

    def length(text: dict) -> int:
        measured = TextToMeasure(text["prompt"], text["response"], model_prompt=text.get("model_prompt"))
        tokenized = tokenize_for_capture(tokenizer, measured, tokenization)
        return len(tokenized.input_ids) - tokenized.response_start

    lengths = {name: [length(text) for text in rows] for name, rows in texts.items()}
    shortest = [min(lengths[name][i] for name in texts) for i in range(n_samples)]
    return {name: shortest for name in texts}


@dataclass(frozen=True)
class CaptureSettings:
    """What the capture stage measures and how: built once per run (`from_spec`), shared by
    every condition's stage; each field is part of the stage's cache key."""

    model: str
    """The capture model's alias."""
    grid: Grid
    """What is measured (the spec's metrics, sites, direction sets and windows)."""
    capture: CaptureSpec
    """Layers, response tokenization, saved activations (the grid has the sites and windows)."""
    metric_options: dict[str, dict]
    token_budget: int | Literal["auto"]
    compile: bool
    directions: dict[str, DirectionSet]
    """The spec's direction sets, loaded and checked against the model."""

    @classmethod
    def from_spec(cls, spec: Spec, directions: dict[str, DirectionSet]) -> CaptureSettings:
        return cls(spec.capture_model, spec.grid, spec.capture, spec.metric_options, spec.runtime.token_budget,
                   spec.runtime.compile is True, directions)

    def key(self, pool: ModelPool) -> dict:
        """What of these settings enters a capture cache key (with the texts measured)."""
        capture, grid = self.capture, self.grid
        return {
            "model": pool.key(self.model),
            "layers": capture.layers,
            "metrics": list(grid.metrics),
            **({"metric_options": self.metric_options} if self.metric_options else {}),
            **({"response_tokenization": "separate"} if capture.response_tokenization == "separate" else {}),
            "token_budget": self.token_budget,
            **({"compile": True} if self.compile else {}),
            "activations": capture.save_activations,
            "sites": list(grid.sites),
            # under the windows' old name (`stats.positions`): cache entries made before the rename stay valid
            **({"positions": [[window.start, window.end] for window in grid.windows]} if grid.windows else {}),
            # only projection columns read the direction sets (an intervention keys its own)
            **({"directions": {name: [d.sha256, d.key] for name, d in self.directions.items()}}
               if self.directions and any(column.direction for column in grid.columns()) else {}),
            **({"activation_dtype": capture.activation_dtype} if capture.activation_dtype != "float16" else {}),
        }

    def measurement(self, layers: list[int]) -> Measurement:
        """What each forward measures, at the captured `layers` of the model."""
        return Measurement(
            self.grid, layers, report_layers(layers), self.metric_options,
            {name: direction.vectors for name, direction in self.directions.items()},
            self.capture.save_activations, getattr(torch, self.capture.activation_dtype), self.compile,
        )


@dataclass
class CaptureStage(Stage):
    """One condition's texts through the capture model: every metric per text, in batches."""

    name: str
    texts: list[TextToMeasure]
    settings: CaptureSettings
    pool: ModelPool
    kind = "capture"
    version = STAGE_VERSION
    progress_unit = "texts"
    intervention: CaptureIntervention | None = None
    """An `intervene` condition's intervention on this forward (`harness.intervening`)."""
    measurement: Measurement | None = None
    """Set by `units`, once the model's layers are known."""
    tokenized: list[Tokenized] = field(default_factory=list)
    source_tokenized: list[Tokenized] = field(default_factory=list)
    """A patch's source texts, tokenized by `units`."""
    forwards: CompiledCalls = field(default_factory=CompiledCalls)
    """Seconds of the forwards; with `compile`, per (rows, padded length)."""

    def inputs(self) -> dict:
        return {
            "texts": content_hash([[t.prompt, t.response, t.max_response_tokens, *([t.model_prompt] if t.model_prompt is not None else [])]
                                   for t in self.texts]),
            **self.settings.key(self.pool),
            **({"intervention": self.intervention.record()} if self.intervention is not None else {}),
        }

    def units(self) -> list[list[int]]:
        loaded = self.pool.model(self.settings.model)
        capture = self.settings.capture
        self.tokenized = [tokenize_for_capture(loaded.tokenizer, text, capture.response_tokenization) for text in self.texts]
        if self.intervention is not None and self.intervention.sources is not None:
            self.source_tokenized = [tokenize_for_capture(loaded.tokenizer, text, capture.response_tokenization)
                                     for text in self.intervention.sources]
        self.measurement = self.settings.measurement(resolve_layers(loaded.model, capture.layers))
        lengths = [len(t.input_ids) for t in self.tokenized]
        budget = token_budget(
            self.settings.token_budget, loaded.model, loaded.input_device, max(lengths),
            f"{self.pool.spec_path}: runtime.token_budget: forwards of {self.settings.token_budget} padded tokens",
        )
        return plan_batches(lengths, budget)

    def compute(self, unit: list[int], folder: Path) -> list[dict]:
        loaded = self.pool.model(self.settings.model)
        batch = [self.tokenized[i] for i in unit]
        start = time.perf_counter()
        intervened = None
        if self.intervention is not None:
            sources = [self.source_tokenized[i] for i in unit] if self.source_tokenized else None
            intervened = self.intervention.around(loaded.model, sources, loaded.tokenizer.pad_token_id)
        records = measure_batch(loaded.model, loaded.input_device, loaded.tokenizer.pad_token_id, batch, self.measurement,
                                intervened)
        compiled = self.settings.compile
        shape = (len(unit), padded_length(batch, COMPILE_BUCKET if compiled else 1))
        self.forwards.record(shape, time.perf_counter() - start, compiled)
        if self.settings.capture.save_activations:
            save_activations(folder / "activations", unit, records)
        for record in records:
            record["tokens"] = [loaded.tokenizer.decode([token]) for token in record.pop("response_ids")]
        return records

    def finish(self, items: list[dict]) -> dict:
        return {"layers": self.measurement.layers, "records": items}

    @staticmethod
    def placeholder_record(key: str) -> dict:
        """A text's record in a placeholder: a text metric whose value names the key, so that the
        stats stage's table, and so its key, follows it."""
        return {"text_metrics": {next(iter(TEXT_METRICS)): float(int(key[:12], 16))}, "n_response_tokens": 0,
                "layer_metrics": {}, "deltas": {}, "tokens": []}

    def placeholder(self, key: str) -> dict:
        return {"layers": [], "records": [self.placeholder_record(key)] * len(self.texts)}

    def check(self, output: dict) -> str | None:
        count = len(output["records"])
        return None if count == len(self.texts) else f"{count} records for {len(self.texts)} texts"

    def describe(self, output: dict) -> str:
        calls = self.forwards
        compiled = (
            f", compiled forward: {len(calls.graphs)} padded shapes, their first calls "
            f"{calls.compile_seconds:.1f}s (compilation included), the rest {calls.run_seconds:.1f}s"
            if calls.graphs else ""
        )
        return f"{len(output['records'])} texts{compiled}"


def save_activations(folder: Path, unit: list[int], records: list[dict]) -> None:
    """One safetensors file per unit: key = sample id, value = [layers, response tokens, d]."""
    from safetensors.torch import save_file

    tensors = {str(i): record.pop("activations").contiguous() for i, record in zip(unit, records)}
    with staged(folder / f"unit-{unit[0]:05d}.safetensors") as path:
        save_file(tensors, str(path))
