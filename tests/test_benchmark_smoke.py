"""Smoke test of benchmarks/bench_pipeline.py on a tiny random Gemma 2: every code path runs,
and the seed-style pipeline and the harness measure the same numbers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from harness import structure
from harness.session import run_spec

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARK = BENCHMARKS / "bench_pipeline.py"
RANDOM_GEMMA2_SPEC = BENCHMARKS / "random-gemma2-2b.yaml"
N_SAMPLES = 3
NEW_TOKENS = 6
"""Short generations keep the test to seconds; the benchmark itself uses the spec's 90."""


def import_benchmark():
    """benchmarks/ is scripts, not a package: load the file as a module."""
    module_spec = importlib.util.spec_from_file_location("bench_pipeline", BENCHMARK)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["bench_pipeline"] = module  # dataclasses look their module up here
    module_spec.loader.exec_module(module)
    return module


bench = import_benchmark()
make_random_gemma2 = sys.modules["make_random_gemma2"]  # imported by the benchmark


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model is thousands of tiny ops: one thread never waits on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workload():
    args = bench.parse_args(["--random-weights", "--config", "tiny", "--device", "cpu", "--n-samples", str(N_SAMPLES)])
    work = bench.load_workload(args)
    return dataclasses.replace(work, generation=work.generation.model_copy(update={"max_new_tokens": NEW_TOKENS}))


@pytest.fixture(scope="module")
def result(workload):
    return bench.run_benchmark(workload)


def test_random_weights_flag_builds_gemma_2_2b_by_default():
    args = bench.parse_args(["--random-weights"])
    assert (args.model, args.config) == ("random", "gemma-2-2b")
    config = bench.CONFIGS[args.config]()
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (256000, 2304, 9216)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (26, 8, 4, 256)
    assert (config.attn_logit_softcapping, config.final_logit_softcapping, config.sliding_window) == (50.0, 30.0, 4096)


def test_id_tokenizer_round_trips_token_ids(workload):
    prompt = workload.prompts[0]
    ids = workload.tokenizer(prompt)["input_ids"]
    assert ids == [int(word) for word in prompt.split()]
    assert len(ids) == bench.SYNTHETIC_PROMPT_TOKENS
    assert workload.tokenizer.decode(ids) == prompt


def test_every_part_is_timed_and_reported(result, workload):
    expected = bench.HARNESS_PARTS + bench.HARNESS_DECODING_PARTS + bench.FLOOR_PARTS + bench.SEED_PARTS
    assert set(result.parts) == set(expected)
    assert all(part.seconds > 0 and part.peak_rss_mib > 0 for part in result.parts.values())
    assert len(result.tokenized) == 2 * N_SAMPLES
    report = bench.format_report(result, workload)
    for name in expected:
        assert f"| {name} |" in report
    assert "harness/floor" in report and "GB" in report and "token_nll" in report


def test_the_report_states_each_parts_roofline(result, workload):
    """On a CPU no card is found; naming one prints the roofline table, a row per timed part."""
    assert "Roofline" not in bench.format_report(result, workload)
    card = bench.roofline.find_card("NVIDIA H200")
    report = bench.format_report(result, workload, card)
    assert "Roofline of H200 (989 bf16 TFLOP/s, 4800 GB/s)" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.endswith("% |")]
    assert [row.split(" | ")[0][2:] for row in rows] == [name for name in bench.PART_ORDER if name in result.work]
    assert {row.split(" | ")[4] for row in rows if "generate" in row} == {"weight reads"}  # a tiny model decodes memory-bound
    assert "measured while decoding (capture.from_generation: auto)" in report
    assert "harness auto, decoding eager (runtime.compile auto: eager on a CPU)" in report


def test_gemma_2_2b_costs_about_5_2_gflop_per_token():
    config = bench.CONFIGS["gemma-2-2b"]()
    assert bench.roofline.flops_per_token(config) == pytest.approx(5.2e9, rel=0.01)
    assert bench.roofline.find_card("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert bench.roofline.find_card("NVIDIA H100 80GB HBM3").name == "H100"


def test_generated_responses_have_max_new_tokens(result):
    generated = result.tokenized[N_SAMPLES:]
    assert [len(item.input_ids) - item.response_start for item in generated] == [NEW_TOKENS] * N_SAMPLES


def test_seed_style_saves_every_hidden_state_of_every_response(result, workload, tmp_path):
    paths = bench.seed_capture(workload, result.tokenized, tmp_path)
    n_states = workload.model.config.num_hidden_layers + 1  # embeddings + every block
    hidden = workload.model.config.hidden_size
    for path, item in zip(paths, result.tokenized):
        tensors = load_file(str(path))
        assert len(tensors) == n_states
        assert all(t.shape == (len(item.input_ids) - item.response_start, hidden) for t in tensors.values())
    payload = sum(n_states * (len(item.input_ids) - item.response_start) * hidden * 4 for item in result.tokenized)
    assert payload <= result.seed_bytes_written <= payload + 4096 * len(paths)  # plus the safetensors headers


def test_seed_style_and_harness_measure_the_same_numbers(result, workload):
    """Full-logits CE equals the chunked CE; metrics of hidden_states[l + 1] equal block l's."""
    n_layers = workload.model.config.num_hidden_layers
    records = zip(result.harness_records, result.seed_metric_records, result.seed_ce_records, strict=True)
    for harness, seed_metrics, seed_ce in records:
        for name, value in seed_ce.items():
            assert harness["text_metrics"][name] == pytest.approx(value, rel=1e-4)
        for name in workload.metrics:
            # The last hidden state is taken after the final norm; the harness measures the block output.
            np.testing.assert_allclose(
                harness["layer_metrics"][name][: n_layers - 1], seed_metrics[name][1:n_layers], rtol=1e-4, err_msg=name
            )


def test_full_logits_cross_entropy_is_the_models_own(result, workload):
    item = result.tokenized[0]
    ids = torch.tensor([item.input_ids])
    hidden = bench.final_hidden(workload, ids, torch.ones_like(ids))
    with torch.no_grad():
        logits = workload.model(ids).logits[0, :-1]  # softcapped by the model's forward
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(bench.full_logits_nll(workload.model, hidden, ids)[0], expected, rtol=1e-4, atol=1e-5)


def test_cross_entropy_memory_covers_the_largest_capture_batch(result, workload):
    memory = result.ce_memory
    longest = max(len(item.input_ids) for item in result.tokenized)
    assert memory.batch_shape == (len(result.tokenized), longest)  # one token-budget batch holds them all
    vocab = workload.model.config.vocab_size
    assert memory.full_logits_mib == pytest.approx(len(result.tokenized) * (longest - 1) * vocab * 4 / 2**20)
    assert memory.measured_positions == longest and memory.full_logits_peak_mib is not None  # small: measured


def test_cross_entropy_memory_measures_a_prefix_when_full_logits_do_not_fit(result, workload, monkeypatch):
    monkeypatch.setattr(bench, "memory_free_mib", lambda device: 0.0)
    memory = bench.cross_entropy_memory(workload, result.tokenized)
    assert memory.batch_shape == result.ce_memory.batch_shape
    assert memory.measured_positions == bench.CE_PREFIX_POSITIONS and memory.full_logits_peak_mib is None


def test_compiled_parts_match_eager(workload):
    """Harness compiled and the compiled floor run (inductor on the CPU), change no greedy fp32 token,
    and leave the model's blocks eager for the parts after them."""
    result = bench.run_benchmark(workload, skip_seed=True, compiled=True)
    compiled = bench.HARNESS_COMPILED_PARTS + bench.COMPILED_FLOOR_PARTS
    assert set(result.parts) == set(bench.HARNESS_PARTS + bench.HARNESS_DECODING_PARTS + bench.FLOOR_PARTS + compiled)
    assert all(result.parts[name].compile_seconds is not None for name in compiled)
    assert result.compiled_differences == 0
    assert not any("forward" in vars(block) for block in structure.decoder_blocks(workload.model))
    report = bench.format_report(result, workload)
    assert "| harness compiled generate |" in report and "- compiled: harness " in report


def test_several_sizes_run_in_one_process_with_the_seed_style_only_up_to_its_limit(capsys):
    argv = ["--random-weights", "--config", "tiny", "--device", "cpu", "--n-samples", "2", "3", "--seed-max-samples", "2"]
    assert bench.main(argv) == 0
    first, second = capsys.readouterr().out.split("N = 3: 6 texts")
    assert "N = 2: 4 texts" in first
    assert first.count("| harness capture+CE |") == second.count("| harness capture+CE |") == 1
    assert "| seed CE |" in first and "| seed CE |" not in second


def test_random_gemma2_kit_runs_through_the_harness(tmp_path):
    """make_random_gemma2 --tiny writes a folder that the benchmark spec, pointed at it, runs end to end."""
    folder = tmp_path / "random-gemma2"
    argv = ["--tiny", str(folder), "--dtype", "float32", "--device", "cpu"]
    assert make_random_gemma2.main(argv) == 0
    spec = tmp_path / "tiny-random.yaml"
    spec.write_text(textwrap.dedent(f"""
        extends: "{RANDOM_GEMMA2_SPEC}"
        name: tiny-random
        models:
          base: {{id: "{folder}", dtype: float32}}
        dataset: {{n_samples: 6}}
        conditions:
          model: {{generation: {{max_new_tokens: 12}}}}
        stats: {{bootstrap_resamples: 50}}
        report: {{plots: false}}
    """))
    log = []
    outcome = run_spec(spec, tmp_path / "runs", log=log.append)
    assert outcome.exit_code in (0, 1)
    generate_line = next(line for line in log if "generate[model]" in line)
    assert "6 continuations," in generate_line and "batches of 6," in generate_line  # auto: every prompt in one batch on a CPU
    manifest = json.loads((outcome.run_dir / "manifest.json").read_text())
    assert manifest["models"]["base"]["source"]["kind"] == "local"


def test_word_tokenizer_has_the_vocabulary_size_and_round_trips_generated_ids():
    tokenizer = make_random_gemma2.word_tokenizer(600)
    assert len(tokenizer) == 600
    ids = list(range(4, 600, 7))
    assert tokenizer(tokenizer.decode(ids))["input_ids"] == [tokenizer.bos_token_id] + ids
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id] == [0, 1, 2]  # Gemma's
