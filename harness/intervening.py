"""An `intervene` condition's hooks on the model: on a capture forward, or while generating.

`Applied` is one condition's intervention with its direction set loaded; `installed` puts its
hooks on the site's taps (`harness.structure`) of the intervened layers (the kind's registered function
changes each one's output, `harness.interventions`) and takes them off again. Where it acts:

- capture (`CaptureIntervention`, one per intervened capture stage): positions come from the
  padded batch (prompt, response, all, or a window of response tokens). A patch's source
  activations come from an un-intervened forward of the source condition's texts in the same
  batch, and the clean forward that `kl_from_clean` compares with runs in the same batch too.
- generation (`Applied.generating`): the first forward of a `generate` call is the prompt's
  prefill (prompt positions), each later one feeds the next response token (response
  positions: call k feeds response token k - 1).

Hooks are registered before the capture stage's own, so what capture measures at an
intervened layer is the changed activation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

from harness.artifacts import content_hash
from harness.errors import RunFailure
from harness.interventions import INTERVENTIONS, LayerContext, PositionWord, describe
from harness.lazy import lazy_import
from harness.stages.capture import PaddedBatch, TextToMeasure, Tokenized
from harness.structure import decoder_blocks, site_taps

torch = lazy_import("torch")  # a cached run that names an intervention computes nothing with it
nn = lazy_import("torch.nn")

if TYPE_CHECKING:
    from harness.directions import DirectionSet
    from harness.schema import Spec
    from harness.sources import InterventionCondition

MaskFor = Callable[[int, "torch.Tensor"], "torch.Tensor"]
"""(the hook's call number, the site's output [B, T, d]) -> where to act, [B, T] bool."""


@dataclass(frozen=True)
class Applied:
    """One `intervene` condition's intervention, with its direction set loaded."""

    name: str
    """The condition."""
    condition: InterventionCondition
    direction: DirectionSet | None
    """The direction set it reads (None: a patch or a zero ablation)."""

    @classmethod
    def of(cls, name: str, spec: Spec, directions: dict[str, DirectionSet]) -> Applied:
        condition = spec.conditions[name]
        (direction, *_) = condition.do.spec.direction_sets() or [None]
        return cls(name, condition, directions[direction] if direction else None)

    @property
    def positions(self) -> PositionWord | tuple[int, int]:
        return self.condition.do.spec.positions(self.condition.at)

    def record(self) -> dict:
        """What the cache keys and the manifest say of it."""
        condition = self.condition
        return describe(condition.at, condition.do, condition.during, self.direction)

    @contextmanager
    def installed(self, model: nn.Module, mask_for: MaskFor, sources: dict[int, torch.Tensor] | None = None) -> Iterator[None]:
        """The intervention's hooks on `model` while the block runs (`sources`: a patch's activations per layer)."""
        kind = INTERVENTIONS[self.condition.do.kind]
        settings = self.condition.do.spec
        taps = site_taps(model, self.condition.at.site)
        vectors = self.direction.vectors if self.direction is not None else None

        def change_for(layer: int):
            calls = [0]

            def change(hidden: torch.Tensor) -> torch.Tensor:
                mask = mask_for(calls[0], hidden).to(hidden.device)
                calls[0] += 1
                vector = vectors[layer].to(hidden.device) if vectors is not None else None
                source = sources[layer].to(hidden.device) if sources is not None else None
                return kind.apply(hidden, mask, settings, LayerContext(layer, vector, source))

            return change

        layers = self.condition.at.layer_list(len(decoder_blocks(model)))
        handles = [taps[layer].change(change_for(layer)) for layer in layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def generating(self, model: nn.Module) -> Iterator[None]:
        """Installed for one `generate` call: its first forward is the prompt's prefill, each
        later one feeds one response token."""
        positions = self.positions

        def mask_for(call: int, hidden: torch.Tensor) -> torch.Tensor:
            if call == 0:
                acts = positions in ("prompt", "all")
            else:
                index = call - 1
                acts = positions in ("response", "all") or (
                    isinstance(positions, tuple) and positions[0] <= index < positions[1])
            return torch.full(hidden.shape[:2], acts, dtype=torch.bool)

        with self.installed(model, mask_for):
            yield


def positions_mask(padded: PaddedBatch, positions: PositionWord | tuple[int, int]) -> torch.Tensor:
    """[B, T] True at a padded batch's `positions` (response window: response tokens start <= i < end)."""
    if positions == "prompt":
        return padded.attention & ~padded.response
    if positions == "response":
        return padded.response
    if positions == "all":
        return padded.attention
    start, end = positions
    index = torch.arange(padded.input_ids.shape[1])[None, :] - padded.starts[:, None]
    return padded.response & (index >= start) & (index < end)


@dataclass(frozen=True)
class CaptureIntervention:
    """What an intervened capture stage applies: the intervention, and a patch's source texts."""

    applied: Applied
    sources: list[TextToMeasure] | None = None
    """A patch's source condition's texts, sample by sample (None: not a patch)."""

    @classmethod
    def of(cls, name: str, spec: Spec, directions: dict[str, DirectionSet],
           texts: dict[str, list[TextToMeasure]]) -> CaptureIntervention | None:
        """The intervention of condition `name`'s capture, or None (not an `intervene` condition,
        or one acting during generation only)."""
        condition = spec.conditions[name]
        if condition.source != "intervene" or condition.during == "generate":
            return None
        source = condition.do.spec.patched_from()
        return cls(Applied.of(name, spec, directions), texts[source] if source else None)

    def around(self, model: nn.Module, sources: list[Tokenized] | None, pad_token_id: int):
        """`measure_batch`'s `intervened` for one batch (`sources`: its rows' patch sources)."""
        return partial(intervened_forward, self.applied, model, sources=sources, pad_token_id=pad_token_id)

    def record(self) -> dict:
        sources = ({"patch_sources": content_hash([[t.prompt, t.response, t.max_response_tokens] for t in self.sources])}
                   if self.sources is not None else {})
        return {**self.applied.record(), **sources}


@contextmanager
def intervened_forward(
    applied: Applied, model: nn.Module, padded: PaddedBatch, forward: Callable[[PaddedBatch], torch.Tensor],
    sources: list[Tokenized] | None, pad_token_id: int,
) -> Iterator[torch.Tensor]:
    """While the intervention's hooks are on `model` for `padded` (so the next forward is the
    intervened one), the clean forward's final hidden states of the same batch.

    A patch first runs its source texts (`sources`, row for row) un-intervened, recording the
    site's output at the intervened layers; a row whose positions do not match its source's
    (their token counts differ there) is a RunFailure."""
    mask = positions_mask(padded, applied.positions)
    recorded = None
    if sources is not None:
        source_batch = PaddedBatch.of(sources, pad_token_id)
        recorded = _recorded(applied, model, source_batch, forward, padded.input_ids.shape[1])
        source_mask = positions_mask(source_batch, applied.positions)
        width = min(source_mask.shape[1], mask.shape[1])
        rows = (source_mask[:, :width] != mask[:, :width]).any(1) | source_mask[:, width:].any(1) | mask[:, width:].any(1)
        if rows.any():
            raise RunFailure(
                f"conditions.{applied.name}: patch from {applied.condition.do.spec.patched_from()!r}: a text's "
                f"{applied.positions} positions do not match its source's (their token counts differ)"
            )
    clean = forward(padded)
    with applied.installed(model, lambda call, hidden: mask, recorded):
        yield clean


def _recorded(applied: Applied, model: nn.Module, batch: PaddedBatch, forward: Callable[[PaddedBatch], torch.Tensor],
              length: int) -> dict[int, torch.Tensor]:
    """Per intervened layer, the site's output over `batch`, cut or zero-padded to `length` positions."""
    taps = site_taps(model, applied.condition.at.site)
    layers = applied.condition.at.layer_list(len(taps))
    recorded: dict[int, torch.Tensor] = {}

    def record_for(layer: int):
        def record(hidden: torch.Tensor) -> None:
            hidden = hidden[:, :length]
            pad = length - hidden.shape[1]
            recorded[layer] = nn.functional.pad(hidden, (0, 0, 0, pad)) if pad else hidden
        return record

    handles = [taps[layer].register(record_for(layer)) for layer in layers]
    try:
        forward(batch)
    finally:
        for handle in handles:
            handle.remove()
    return recorded
