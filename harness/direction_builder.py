"""`harness directions`: a direction file built from a finished run's saved activations (the
difference of two conditions' mean residual streams), apart from the loader
(`harness.directions`), which only reads and checks direction files. The file's metadata
records which samples built it, so a spec can test it on the others (`evaluate_on: held_out`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.artifacts import write_bytes
from harness.directions import SAMPLES_KEY, TENSOR_NAME
from harness.errors import InputError
from harness.rundir import load_run
from harness.schema import DirectionSplit


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
