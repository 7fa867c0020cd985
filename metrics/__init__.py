"""Metrics: pure functions over tensors, registered by name.

Three kinds:

- trajectory metrics, ``fn(hidden, mask) -> Tensor[B]``: ``hidden`` is one layer's
  residual stream ``[B, T, D]`` (float32), ``mask`` ``[B, T]`` is True on the response tokens
  being measured (contiguous per row). Computed per layer, on the model's device.
- text metrics, ``fn(nll, target_mask, response_mask) -> Tensor[B]``: ``nll`` ``[B, T]`` is
  the next-token cross-entropy of token t given tokens < t (0 where undefined),
  ``target_mask`` marks every predicted token of the text, ``response_mask`` the predicted
  response tokens. ``@text_metric(scores="kl")`` gets, instead of ``nll``, the per-token KL
  divergence of an intervened forward's next-token distribution from the clean forward's of
  the same text (not computed on a forward nothing intervened on).
- projection metrics, ``fn(projection, mask) -> Tensor[B]``: ``projection`` ``[B, T]`` is
  ``<h_t, v>`` for one layer's residual stream and a unit direction ``v`` of a spec's
  ``directions:`` set, ``mask`` as above. Computed per layer and direction set.

A metric undefined for a text (a response too short for it, e.g. no token-to-token delta)
is NaN, never a number: the statistics then leave that text out of that metric's comparisons.

Adding a metric is one decorated function here (or in another package: a ``harness.plugins``
entry point, see ``harness.registry``) plus its name in a spec's ``metrics:``. Import them as
``harness.metrics`` (this folder installs under the harness package). A
trajectory metric may take keyword options: ``@layer_metric(options=SomeOptions)`` registers
the pydantic model that validates a spec's ``metric_options: {name: {...}}`` for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

from harness.base import StrictModel
from harness.registry import Registry

if TYPE_CHECKING:  # the metrics only call tensor methods: validating a spec imports no torch
    from torch import Tensor

LAYER_METRICS: Registry[Callable[..., Tensor]] = Registry("trajectory metric")
"""Trajectory metrics: ``fn(hidden, mask, **options) -> Tensor[B]``."""
METRIC_OPTIONS: dict[str, type[StrictModel]] = {}
"""The options model of each trajectory metric that takes options, by metric name."""
TEXT_METRICS: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("text metric")
TEXT_METRIC_SCORES: dict[str, Literal["kl"]] = {}
"""The per-token scores a text metric reads when they are not the NLL, by metric name."""
PROJECTION_METRICS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("projection metric")
"""Projection metrics: ``fn(projection, mask) -> Tensor[B]``, listed in a spec's ``metrics:`` beside
the trajectory metrics."""


def _check_free(name: str, module: str) -> None:
    """One name for one metric of any kind: a spec's `metrics:` lists them side by side."""
    for registry in (LAYER_METRICS, TEXT_METRICS, PROJECTION_METRICS):
        if name in registry:
            registry.add(name, None, module)  # raises: the name is taken, naming both packages


def layer_metric(fn: Callable[..., Tensor] | None = None, *, options: type[StrictModel] | None = None):
    """Register a trajectory metric under its function name (``@layer_metric`` or
    ``@layer_metric(options=Model)``, the model's fields being the function's keyword options)."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _check_free(fn.__name__, fn.__module__)
        LAYER_METRICS.add(fn.__name__, fn, fn.__module__)
        if options is not None:
            METRIC_OPTIONS[fn.__name__] = options
        return fn

    return register if fn is None else register(fn)


def text_metric(fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None, *, scores: Literal["nll", "kl"] = "nll"):
    """Register a per-text metric under its function name (``@text_metric``, or
    ``@text_metric(scores="kl")`` for one of the per-token KL from the clean forward)."""

    def register(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        _check_free(fn.__name__, fn.__module__)
        TEXT_METRICS.add(fn.__name__, fn, fn.__module__)
        if scores != "nll":
            TEXT_METRIC_SCORES[fn.__name__] = scores
        return fn

    return register if fn is None else register(fn)


def projection_metric(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Register a projection metric under its function name."""
    _check_free(fn.__name__, fn.__module__)
    PROJECTION_METRICS.add(fn.__name__, fn, fn.__module__)
    return fn


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked positions of each row; NaN (0 / 0) for a row with none: undefined."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1)


def _step_deltas(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-to-token differences and the mask of pairs inside the response."""
    return hidden[:, 1:] - hidden[:, :-1], mask[:, 1:] & mask[:, :-1]


@layer_metric
def smoothness(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean L2 norm of token-to-token deltas (smaller = smoother trajectory)."""
    deltas, pair_mask = _step_deltas(hidden, mask)
    return _masked_mean(deltas.norm(dim=-1), pair_mask)


@layer_metric
def normalized_smoothness(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean delta norm divided by the norm of the token it leaves, so high-norm layers don't dominate."""
    deltas, pair_mask = _step_deltas(hidden, mask)
    ratio = deltas.norm(dim=-1) / hidden[:, :-1].norm(dim=-1).clamp(min=1e-12)
    return _masked_mean(ratio, pair_mask)


@layer_metric
def magnitude(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean L2 norm of the response tokens."""
    return _masked_mean(hidden.norm(dim=-1), mask)


class VarianceOptions(StrictModel):
    """Options of `variance`."""

    ddof: Literal[0, 1] = 0
    """Divide by n - ddof: 0 is the population variance, 1 the unbiased one (torch.var's
    default, which the reference used)."""


@layer_metric(options=VarianceOptions)
def variance(hidden: Tensor, mask: Tensor, ddof: int = 0) -> Tensor:
    """Variance of the response tokens' L2 norms (divided by n - ddof)."""
    norms = hidden.norm(dim=-1)
    centred = norms - _masked_mean(norms, mask).unsqueeze(-1)
    weights = mask.to(norms.dtype)
    return (centred.square() * weights).sum(-1) / (weights.sum(-1) - ddof).clamp(min=1)


@layer_metric
def directional_consistency(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean cosine similarity between successive deltas (1 = straight line); NaN below 3 response tokens."""
    from torch.nn.functional import cosine_similarity

    deltas, pair_mask = _step_deltas(hidden, mask)
    cosines = cosine_similarity(deltas[:, 1:], deltas[:, :-1], dim=-1, eps=1e-12)
    return _masked_mean(cosines, pair_mask[:, 1:] & pair_mask[:, :-1])


@projection_metric
def projection_mean(projection: Tensor, mask: Tensor) -> Tensor:
    """Mean of <h_t, v> over the response tokens: where along the direction the text sits."""
    return _masked_mean(projection, mask)


@projection_metric
def projection_variance(projection: Tensor, mask: Tensor) -> Tensor:
    """Population variance of <h_t, v> over the response tokens: how much the text moves along the direction."""
    centred = projection - _masked_mean(projection, mask).unsqueeze(-1)
    return _masked_mean(centred.square(), mask)


@projection_metric
def projection_smoothness(projection: Tensor, mask: Tensor) -> Tensor:
    """Mean |<h_t+1, v> - <h_t, v>| over successive response tokens; NaN below 2 tokens."""
    return _masked_mean((projection[:, 1:] - projection[:, :-1]).abs(), mask[:, 1:] & mask[:, :-1])


@text_metric
def ce_loss(nll: Tensor, target_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the whole text (prompt and response)."""
    return _masked_mean(nll, target_mask)


@text_metric
def ce_loss_response(nll: Tensor, target_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the response tokens only."""
    return _masked_mean(nll, response_mask)


@text_metric(scores="kl")
def kl_from_clean(kl: Tensor, target_mask: Tensor, response_mask: Tensor) -> Tensor:
    """Mean per-token KL(intervened || clean) of the next-token distribution over the response (intervened conditions only)."""
    return _masked_mean(kl, response_mask)
