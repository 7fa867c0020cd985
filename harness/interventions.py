"""Interventions: what an `intervene` condition does to the model's activations, and where.

An intervention *kind* is one registered function plus its pydantic spec model (the name a
spec's `do:` uses is the registration's):

    class ClampSpec(InterventionSpec):
        direction: str
        value: float

        def direction_sets(self) -> list[str]:
            return [self.direction]

    @intervention("clamp", ClampSpec)
    def clamp(hidden, mask, do, layer):
        change = (do.value - hidden @ layer.vector)[..., None] * layer.vector
        return hidden.where(~mask[..., None], hidden + change)

`fn(hidden, mask, do, layer) -> hidden`: `hidden` is one site's output at one intervened
layer ([B, T, d], the model's dtype), `mask` [B, T] is True where the intervention acts
(`at.positions`), `layer` is the `LayerContext` (the layer, its unit direction, a patch's
source activations). Positions outside the mask must come back unchanged (bit for bit), so a
kind that does nothing at some setting (`add` at scale 0) leaves the forward as it was.

Where (`At`): a capture site of `harness.sites`, a layer list or range, and positions:
`prompt`, `response`, `all` or a window `[start, end]` of response tokens. When
(`during`): the generated text, the measured forward, or both. Each tensor function uses
tensor methods only: validating a spec imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field, create_model, field_validator, model_serializer, model_validator

from harness.base import StrictModel
from harness.registry import Registry
from harness.sites import DEFAULT_SITE

if TYPE_CHECKING:
    from torch import Tensor

PositionWord = Literal["prompt", "response", "all"]
During = Literal["generate", "capture", "both"]
_LAYER_RANGE = re.compile(r"(\d+)-(\d+)")


class At(StrictModel):
    """Where an intervention acts."""

    site: str = DEFAULT_SITE
    """A capture site (`harness ls sites`): the module whose output is changed, in each listed block."""
    layers: Literal["all"] | list[int] | str
    """Decoder blocks: a list (`[10, 11, 12]`), an inclusive range (`"10-12"`) or `all`."""
    positions: PositionWord | tuple[int, int] = "response"
    """`prompt`, `response`, `all` tokens, or a window `[start, end]` of response tokens (start <= i < end)."""

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "all":
            match = _LAYER_RANGE.fullmatch(value.strip())
            if not match or int(match[1]) > int(match[2]):
                raise ValueError(f"{value!r} is not a layer range (`first-last`, e.g. \"10-12\")")
        if isinstance(value, list):
            if not value:
                raise ValueError("lists no layer")
            if any(layer < 0 for layer in value) or len(set(value)) != len(value):
                raise ValueError("layers are distinct numbers >= 0")
        return value

    @field_validator("positions")
    @classmethod
    def _window(cls, value: Any) -> Any:
        if isinstance(value, tuple) and not 0 <= value[0] < value[1]:
            raise ValueError(f"window {list(value)} needs 0 <= start < end")
        return value

    def layer_list(self, n_layers: int) -> list[int]:
        """The intervened layers of a model with `n_layers` blocks (ValueError naming any that do not exist)."""
        if self.layers == "all":
            return list(range(n_layers))
        if isinstance(self.layers, str):
            first, last = map(int, _LAYER_RANGE.fullmatch(self.layers.strip()).groups())
            layers = list(range(first, last + 1))
        else:
            layers = sorted(self.layers)
        too_deep = [layer for layer in layers if layer >= n_layers]
        if too_deep:
            raise ValueError(f"layers {too_deep} do not exist (the model has {n_layers}: 0 to {n_layers - 1})")
        return layers


class InterventionSpec(StrictModel):
    """Base of every intervention kind's spec model."""

    def direction_sets(self) -> list[str]:
        """The spec's direction sets (`directions:`) this intervention reads."""
        return []

    def patched_from(self) -> str | None:
        """The condition whose activations are copied in (a patch), or None."""
        return None

    def positions(self, at: At) -> PositionWord | tuple[int, int]:
        """The positions it acts on (`at.positions` unless the kind says otherwise)."""
        return at.positions

    def needs_whole_text(self) -> bool:
        """Whether it needs every position of the text at once (so it cannot shape generation)."""
        return False


@dataclass(frozen=True)
class LayerContext:
    """What a kind's function may read at one intervened layer."""

    layer: int
    vector: Tensor | None = None
    """The direction set's unit vector at this layer ([d], on the hidden state's device, float32)."""
    source: Tensor | None = None
    """A patch's source activations at this site and layer ([B, T, d]), aligned with `hidden`."""


@dataclass(frozen=True)
class Intervention:
    spec_model: type[InterventionSpec]
    apply: Callable[..., Tensor]
    """`fn(hidden, mask, do, layer: LayerContext) -> hidden`."""


INTERVENTIONS: Registry[Intervention] = Registry("intervention")
"""Registered intervention kinds by the name a spec's `do:` uses."""


def intervention(name: str, spec_model: type[InterventionSpec]):
    """Register `fn(hidden, mask, do, layer) -> hidden` as the kind `name` with its spec model."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        INTERVENTIONS.add(name, Intervention(spec_model, fn), fn.__module__)
        return fn

    return register


# --- the built-in kinds -----------------------------------------------------------------


class AddSpec(InterventionSpec):
    """Steering: add `scale` times the direction's unit vector."""

    direction: str
    """A direction set of the spec (`directions:`): one vector, or one per layer."""
    scale: float = Field(allow_inf_nan=False)
    """In units of the residual stream (the vector has norm 1); 0 leaves the forward unchanged."""

    def direction_sets(self) -> list[str]:
        return [self.direction]


class AblateSpec(InterventionSpec):
    """Ablation: remove the direction's component, fix it at its mean, or zero the activation.

    `project_out` removes the component along the direction, `mean` fixes it at its mean over
    the text's intervened positions (so the text keeps where it sits along the direction, not
    how it moves), `zero` zeroes the whole activation."""

    direction: str | None = None
    """A direction set of the spec; needed by `project_out` and `mean`, not by `zero`."""
    kind: Literal["project_out", "mean", "zero"] = "project_out"

    @model_validator(mode="after")
    def _direction_needed(self) -> "AblateSpec":
        if self.kind != "zero" and self.direction is None:
            raise ValueError(f"kind {self.kind!r} needs a `direction`")
        if self.kind == "zero" and self.direction is not None:
            raise ValueError("kind 'zero' zeroes the whole activation: drop `direction`")
        return self

    def direction_sets(self) -> list[str]:
        return [self.direction] if self.direction else []

    def needs_whole_text(self) -> bool:
        return self.kind == "mean"


class PatchSpec(InterventionSpec):
    """Activation patching: the site's output copied in from another condition's forward.

    At these positions, from the (un-intervened) forward of the same sample's text in condition `from`."""

    from_: str = Field(alias="from")
    """The condition whose activations are copied in."""
    positions_: PositionWord | tuple[int, int] | None = Field(None, alias="positions")
    """Which positions are copied; default `at.positions`."""

    model_config = {**InterventionSpec.model_config, "validate_by_name": True, "serialize_by_alias": True}

    def patched_from(self) -> str:
        return self.from_

    def positions(self, at: At) -> PositionWord | tuple[int, int]:
        return self.positions_ if self.positions_ is not None else at.positions


def _unchanged_outside(hidden: Tensor, mask: Tensor, changed: Tensor) -> Tensor:
    return hidden.where(~mask[..., None], changed.to(hidden.dtype))


def _component(hidden: Tensor, vector: Tensor) -> Tensor:
    """<h, v> per position ([B, T], float32)."""
    return hidden.float() @ vector


@intervention("add", AddSpec)
def add(hidden: Tensor, mask: Tensor, do: AddSpec, layer: LayerContext) -> Tensor:
    return _unchanged_outside(hidden, mask, hidden.float() + do.scale * layer.vector)


@intervention("ablate", AblateSpec)
def ablate(hidden: Tensor, mask: Tensor, do: AblateSpec, layer: LayerContext) -> Tensor:
    if do.kind == "zero":
        return hidden.masked_fill(mask[..., None], 0)
    component = _component(hidden, layer.vector)
    if do.kind == "mean":
        weights = mask.to(component.dtype)
        mean = (component * weights).sum(-1, keepdim=True) / weights.sum(-1, keepdim=True).clamp(min=1)
        target = mean.expand_as(component)
    else:
        target = component.new_zeros(())
    return _unchanged_outside(hidden, mask, hidden.float() + (target - component)[..., None] * layer.vector)


@intervention("patch", PatchSpec)
def patch(hidden: Tensor, mask: Tensor, do: PatchSpec, layer: LayerContext) -> Tensor:
    return _unchanged_outside(hidden, mask, layer.source)


# --- `do:` ---------------------------------------------------------------------------------


class _DoBase(StrictModel):
    @model_validator(mode="after")
    def _exactly_one(self) -> "_DoBase":
        chosen = [name for name in INTERVENTIONS if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"needs exactly one of {', '.join(INTERVENTIONS)} (got {', '.join(chosen) or 'none'})")
        return self

    @model_serializer(mode="wrap")
    def _set_kind_only(self, handler) -> dict:
        return {name: value for name, value in handler(self).items() if value is not None}

    @property
    def kind(self) -> str:
        """The registered kind this `do:` names."""
        return next(name for name in INTERVENTIONS if getattr(self, name) is not None)

    @property
    def spec(self) -> InterventionSpec:
        """The kind's settings."""
        return getattr(self, self.kind)

    def record(self) -> dict:
        """`{kind: settings}` as a spec writes it (cache keys, the manifest)."""
        return {self.kind: self.spec.model_dump(mode="json", by_alias=True)}


Do = create_model(
    "Do", __base__=_DoBase, __doc__="One intervention: `{<kind>: {...}}`, a registered kind (`harness ls interventions`).",
    **{name: (kind.spec_model | None, None) for name, kind in INTERVENTIONS.items()},
)
"""`do:` of an `intervene` condition: one field per registered kind, exactly one set."""


def describe(at: At, do: _DoBase, during: During, direction: Any | None) -> dict:
    """An intervention as the cache keys, the manifest and the report say it (`direction`: its
    loaded direction set, a `harness.directions.DirectionSet`, or None)."""
    positions = do.spec.positions(at)
    return {
        "site": at.site, "layers": at.layers, "positions": list(positions) if isinstance(positions, tuple) else positions,
        "do": do.record(), "during": during,
        **({"direction": {"path": direction.path, "key": direction.key, "sha256": direction.sha256}} if direction else {}),
    }
