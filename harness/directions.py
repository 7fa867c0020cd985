"""Direction sets: per layer a unit vector that the projection metrics project the residual stream onto.

A spec's `directions:` names files (safetensors, `.pt` or `.npy`) holding a `[layers, d_model]`
tensor or a `[d_model]` vector; `load_direction_sets` reads them, checks them against the
capture model (width, layer count, finite, non-zero) and normalises each row, before any stage
runs. `harness.direction_builder` builds one from a finished run's saved activations (`harness
directions`), and records in the file's metadata which samples built it, so a spec can test it
on the others (`evaluate_on: held_out`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from harness.errors import InputError
from harness.inputs import TensorFile, tensor_file
from harness.lazy import lazy_import
from harness.schema import Spec
from harness.structure import decoder_blocks

torch = lazy_import("torch")

SAMPLES_KEY = "samples"
"""Metadata key of a file written by `harness directions`: the sample ids that built it, comma-separated."""
TENSOR_NAME = "direction"
"""The tensor's name in a file written by `harness directions`."""


@dataclass(frozen=True)
class DirectionSet:
    """One direction set, loaded and checked against the capture model."""

    path: str
    key: str | None
    """The tensor's name in the file (None: its only tensor)."""
    sha256: str
    """Of the file's bytes: part of the capture cache key and the manifest."""
    shape: tuple[int, ...]
    """As stored (before a `[d_model]` vector is repeated for every layer)."""
    vectors: torch.Tensor
    """[model layers, d_model] float32, unit rows."""
    metadata: dict[str, str]
    """The file's own metadata (safetensors), e.g. what `harness directions` recorded."""

    @property
    def built_from(self) -> list[int] | None:
        """The sample ids that built the direction, when the file says (`harness directions`)."""
        samples = self.metadata.get(SAMPLES_KEY)
        return None if samples is None else [int(sample) for sample in samples.split(",") if sample]

    def record(self) -> dict:
        """What the manifest says about it."""
        return {"path": self.path, "key": self.key, "sha256": self.sha256, "shape": list(self.shape),
                "metadata": self.metadata}


def load_direction_sets(spec: Spec, spec_path: Path, model: torch.nn.Module) -> dict[str, DirectionSet]:
    """Every direction set of the spec, checked against the capture model's layer count and
    width; any problem is an InputError naming the spec field and the file. The shape and
    dtype are checked on the file's header, before its tensor is read."""
    n_layers, width = len(decoder_blocks(model)), model.config.get_text_config().hidden_size
    sets = {}
    for name, entry in spec.directions.items():
        where = f"{spec_path}: directions.{name}.path: {entry.path}"
        tensor, metadata = read_direction_file(Path(entry.path), entry.key, where, n_layers, width)
        vectors = _checked_vectors(tensor, n_layers, width, where)
        direction = DirectionSet(entry.path, entry.key, _file_sha256(Path(entry.path)), tuple(tensor.shape), vectors, metadata)
        if entry.evaluate_on == "held_out" and direction.built_from is None:
            raise InputError(
                f"{spec_path}: directions.{name}.evaluate_on: held_out needs a file written by `harness directions` "
                f"(its metadata names the samples that built it); {entry.path} names none"
            )
        sets[name] = direction
    return sets


def read_direction_file(path: Path, key: str | None, where: str, n_layers: int, width: int) -> tuple[torch.Tensor, dict[str, str]]:
    """The tensor (and the file's metadata) in a safetensors, `.pt` or `.npy` file, read only
    after its header shows a floating-point `[n_layers, width]` or `[width]` tensor."""
    contents = tensor_file(path, where)
    name = _pick(contents, key, where)
    _check_shape(contents.shapes[name], contents.floating[name], contents.dtypes[name], n_layers, width, where)
    return contents.load(name), contents.metadata


def _pick(contents: TensorFile, key: str | None, where: str) -> str | None:
    names = contents.shapes
    if key is not None and None in names:
        raise InputError(f"{where}: holds a single unnamed tensor; drop `key`")
    if key is None and len(names) != 1:
        listed = ", ".join(sorted(map(str, names))) or "none"
        raise InputError(f"{where}: holds {len(names)} tensors ({listed}); name one with `key`")
    if key is not None and key not in names:
        raise InputError(f"{where}: has no tensor {key!r} (it has {', '.join(sorted(map(str, names)))})")
    return key if key is not None else next(iter(names))


def _check_shape(shape: tuple[int, ...], floating: bool, dtype: str, n_layers: int, width: int, where: str) -> None:
    if not floating:
        raise InputError(f"{where}: holds {dtype} values, not floating point")
    if len(shape) not in (1, 2):
        raise InputError(f"{where}: has shape {list(shape)}; expected [layers, d_model] or [d_model]")
    if shape[-1] != width:
        raise InputError(f"{where}: has width {shape[-1]}, the capture model's residual stream has {width}")
    if len(shape) == 2 and shape[0] != n_layers:
        raise InputError(f"{where}: has {shape[0]} rows, the capture model has {n_layers} layers (one row per layer)")


def _checked_vectors(tensor: torch.Tensor, n_layers: int, width: int, where: str) -> torch.Tensor:
    """[n_layers, width] float32 unit rows, or an InputError saying what does not fit."""
    vectors = tensor.float().expand(n_layers, width)
    if not torch.isfinite(vectors).all():
        raise InputError(f"{where}: contains NaN or infinite values")
    norms = vectors.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise InputError(f"{where}: row {int((norms[:, 0] == 0).nonzero()[0])} is a zero vector (no direction)")
    return (vectors / norms).contiguous()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
