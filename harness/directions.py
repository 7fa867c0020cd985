"""Direction sets: per layer a unit vector that the projection metrics project the residual stream onto.

A spec's `directions:` names files (safetensors, `.pt` or `.npy`) holding a `[layers, d_model]`
tensor or a `[d_model]` vector; `load_direction_sets` reads them, checks them against the
capture model (width, layer count, finite, non-zero) and normalises each row, before any stage
runs. `difference_of_means` builds one from a finished run's saved activations (`harness
directions`), and records in the file's metadata which samples built it, so a spec can test it
on the others (`evaluate_on: held_out`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.artifacts import write_bytes
from harness.errors import InputError
from harness.schema import DirectionSplit, Spec
from harness.structure import decoder_blocks

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
    width; any problem is an InputError naming the spec field and the file."""
    n_layers, width = len(decoder_blocks(model)), model.config.get_text_config().hidden_size
    sets = {}
    for name, entry in spec.directions.items():
        where = f"{spec_path}: directions.{name}.path: {entry.path}"
        tensor, metadata = read_direction_file(Path(entry.path), entry.key, where)
        vectors = _checked_vectors(tensor, n_layers, width, where)
        direction = DirectionSet(entry.path, entry.key, _file_sha256(Path(entry.path)), tuple(tensor.shape), vectors, metadata)
        if entry.evaluate_on == "held_out" and direction.built_from is None:
            raise InputError(
                f"{spec_path}: directions.{name}.evaluate_on: held_out needs a file written by `harness directions` "
                f"(its metadata names the samples that built it); {entry.path} names none"
            )
        sets[name] = direction
    return sets


def read_direction_file(path: Path, key: str | None, where: str) -> tuple[torch.Tensor, dict[str, str]]:
    """The tensor (and the file's metadata) in a safetensors, `.pt` or `.npy` file."""
    if not path.is_file():
        raise InputError(f"{where}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pt", ".pth", ".npy"):
        raise InputError(f"{where}: not a .safetensors, .pt or .npy file")
    try:
        if suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
                metadata = dict(handle.metadata() or {})
        elif suffix == ".npy":
            tensors, metadata = {None: torch.from_numpy(np.load(path, allow_pickle=False))}, {}
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            tensors, metadata = (loaded if isinstance(loaded, dict) else {None: loaded}), {}
    except Exception as exc:  # a damaged or foreign file fails in its reader's own way: one line, whatever it is
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{where}: cannot be read ({message})") from None
    return _pick(tensors, key, where), metadata


def _pick(tensors: dict, key: str | None, where: str) -> torch.Tensor:
    if key is not None and None in tensors:
        raise InputError(f"{where}: holds a single unnamed tensor; drop `key`")
    if key is None and len(tensors) != 1:
        names = ", ".join(sorted(map(str, tensors))) or "none"
        raise InputError(f"{where}: holds {len(tensors)} tensors ({names}); name one with `key`")
    if key is not None and key not in tensors:
        raise InputError(f"{where}: has no tensor {key!r} (it has {', '.join(sorted(map(str, tensors)))})")
    tensor = tensors[key] if key is not None else next(iter(tensors.values()))
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"{where}: holds a {type(tensor).__name__}, not a tensor")
    return tensor


def _checked_vectors(tensor: torch.Tensor, n_layers: int, width: int, where: str) -> torch.Tensor:
    """[n_layers, width] float32 unit rows, or an InputError saying what does not fit."""
    shape = tuple(tensor.shape)
    if not tensor.is_floating_point():
        raise InputError(f"{where}: holds {tensor.dtype} values, not floating point")
    if tensor.dim() not in (1, 2):
        raise InputError(f"{where}: has shape {list(shape)}; expected [layers, d_model] or [d_model]")
    if shape[-1] != width:
        raise InputError(f"{where}: has width {shape[-1]}, the capture model's residual stream has {width}")
    if tensor.dim() == 2 and shape[0] != n_layers:
        raise InputError(f"{where}: has {shape[0]} rows, the capture model has {n_layers} layers (one row per layer)")
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


# --- building one: `harness directions` --------------------------------------------------------


def split_samples(sample_ids: list[int], split: DirectionSplit) -> list[int]:
    """The samples of `split`, by position in sample-id order."""
    ordered = sorted(sample_ids)
    half = len(ordered) // 2
    return {
        "all": ordered,
        "first_half": ordered[:half],
        "second_half": ordered[half:],
        "even": ordered[0::2],
        "odd": ordered[1::2],
    }[split]


def difference_of_means(run_dir: Path, a: str, b: str, split: DirectionSplit) -> tuple[torch.Tensor, dict[str, str]]:
    """Per layer, the mean residual stream of condition `a`'s responses minus `b`'s ([layers, d]),
    over the samples of `split` that have response tokens in both; and the file metadata saying
    how it was built. Each text weighs the same: its tokens are averaged first."""
    from safetensors import safe_open

    from harness.rundir import load_run

    run = load_run(run_dir)
    for condition in (a, b):
        if condition not in run.spec.conditions:
            raise InputError(f"{run_dir}: no condition {condition!r} (it has {', '.join(run.spec.conditions)})")
    if a == b:
        raise InputError(f"{run_dir}: --a and --b name the same condition {a!r}")
    files = {condition: run_dir / "activations" / f"{condition}.safetensors" for condition in (a, b)}
    if not all(file.is_file() for file in files.values()):
        raise InputError(f"{run_dir}: no saved activations (run the spec with capture.save_activations: true)")
    if run.spec.capture.layers != "all":
        raise InputError(f"{run_dir}: a direction needs every layer; this run captured {run.spec.capture.layers}")
    with safe_open(str(files[a]), "pt") as first, safe_open(str(files[b]), "pt") as second:
        shared = sorted(int(key) for key in set(first.keys()) & set(second.keys()))
        samples = [
            sample for sample in split_samples(shared, split)
            if first.get_slice(str(sample)).get_shape()[1] and second.get_slice(str(sample)).get_shape()[1]
        ]
        if len(samples) < 1:
            raise InputError(f"{run_dir}: split {split!r} leaves no sample with response tokens in both {a} and {b}")
        means = [
            torch.stack([handle.get_tensor(str(sample)).float().mean(dim=1) for sample in samples]).mean(dim=0)
            for handle in (first, second)
        ]
    metadata = {
        "built_by": "harness directions (difference of means)",
        "run": str(run_dir),
        "spec": run.spec.name,
        "a": a,
        "b": b,
        "split": split,
        SAMPLES_KEY: ",".join(map(str, samples)),
    }
    return means[0] - means[1], metadata


def write_direction_file(path: Path, direction: torch.Tensor, metadata: dict[str, str]) -> None:
    """A safetensors file holding `direction` under TENSOR_NAME, written atomically."""
    from safetensors.torch import save

    write_bytes(path, save({TENSOR_NAME: direction.contiguous()}, metadata=metadata))
