"""Help that teaches: every argument described, examples and exit codes; `ls specs` one line per
spec; `ls stats` and `compare --stat` filter by pattern; `compare` leaves out equal rows."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from harness import cli
from harness.errors import ExitCode
from harness.rundir import write_criteria, write_stats
from harness.select import pattern_matches

REPO = Path(__file__).resolve().parent.parent


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_argument_of_every_command_is_described():
    missing = [
        f"{name} {action.dest}"
        for name, parser in {"harness": cli.build_parser(), **subcommands()}.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []


def test_run_help_ends_with_examples_and_every_exit_code():
    text = subcommands()["run"].format_help()
    examples, codes = text.split("\nexamples:\n")[1].split("\nexit codes:\n")
    assert "harness run specs/quickstart.yaml" in examples and "--limit" in examples
    assert [line.split()[0] for line in codes.strip().splitlines()] == [str(code.value) for code in ExitCode]
    assert all(code.meaning in codes for code in ExitCode)


def test_ls_specs_is_one_line_per_spec_within_the_terminal(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "72")
    assert cli.main(["ls", "specs", str(REPO / "specs")]) == ExitCode.PASSED
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(list((REPO / "specs").glob("*.yaml")))
    assert all(len(line) <= 72 for line in lines)
    by_name = {line.split()[0].rstrip(","): line.split() for line in lines}
    assert by_name["quickstart"][1] == "offline" and by_name["baseline"][1] == "hub"
    assert by_name["temperature-sweep-offline"][1:4] == ["4", "points", "offline"]
    monkeypatch.setenv("COLUMNS", "1000")
    cli.main(["ls", "specs", str(REPO / "specs")])
    summaries = [line.split(maxsplit=2)[2] for line in capsys.readouterr().out.splitlines() if "points" not in line]
    assert len(set(summaries)) == len(summaries)  # each spec says what it is, not what its parent is


def test_patterns_are_globs_with_wildcards_and_substrings_otherwise():
    assert pattern_matches("smoothness.overall.d", "smoothness.overall.*")
    assert not pattern_matches("human_vs_model.smoothness.overall.d", "smoothness.overall.*")
    assert pattern_matches("smoothness.overall.d_ci_low", "ci_low")
    assert not pattern_matches("smoothness.overall.d", "ci_low")


def test_ls_stats_filters_by_pattern(capsys):
    spec = str(REPO / "specs" / "quickstart.yaml")
    assert cli.main(["ls", "stats", spec]) == ExitCode.PASSED
    every = capsys.readouterr().out.splitlines()
    assert cli.main(["ls", "stats", spec, "smoothness.overall.d*"]) == ExitCode.PASSED
    assert capsys.readouterr().out.splitlines() == [
        "smoothness.overall.d", "smoothness.overall.d_ci_low", "smoothness.overall.d_ci_high",
        "smoothness.overall.d_loo_max_change", "smoothness.overall.d_loo_max_change_sample"]
    assert cli.main(["ls", "stats", spec, "p_holm"]) == ExitCode.PASSED
    holm = capsys.readouterr().out.splitlines()
    assert holm and set(holm) <= set(every) and all("p_holm" in name for name in holm)
    assert cli.main(["ls", "stats", spec, "smoothness.layer12.d"]) == ExitCode.PASSED  # any layer's number
    assert "smoothness.layer<N>.d" in capsys.readouterr().out.splitlines()
    assert cli.main(["ls", "stats", spec, "no_such_statistic"]) == ExitCode.PASSED
    captured = capsys.readouterr()
    assert captured.out == "" and "no statistic name matches 'no_such_statistic'" in captured.err


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    """Two run folders that differ in one key statistic and one other."""
    runs = []
    for name, d, ci in (("a", 0.5, 0.1), ("b", 0.7, 0.2)):
        folder = tmp_path / name
        folder.mkdir()
        write_stats(folder, {"smoothness.overall.d": d, "smoothness.overall.p": 0.01, "ce_loss.human.mean": 3.0,
                             "smoothness.overall.d_ci_low": ci})
        write_criteria(folder, [{"name": "smoother", "expr": "smoothness.overall.d > 0", "passed": True, "values": {}}])
        runs.append(folder)
    return runs


def test_compare_leaves_out_equal_rows_and_says_so(two_runs, capsys):
    assert cli.main(["compare", *map(str, two_runs)]) == ExitCode.PASSED
    out = capsys.readouterr().out
    rows = [line.split(" | ")[0].strip("| ") for line in out.splitlines() if line.startswith("| ") and "." in line]
    assert rows == ["smoothness.overall.d"]
    assert "| smoothness.overall.d | 0.5 | 0.7 | 0.2 |" in out
    assert "2 of 3 key statistics are equal in every run and left out; `--stat PATTERN` shows any statistic." in out
    assert "| smoother | PASSED | PASSED |" in out


def test_compare_stat_picks_the_statistics(two_runs, capsys):
    assert cli.main(["compare", *map(str, two_runs), "--stat", "ci_low", "--stat", "smoothness.overall.p"]) == 0
    out = capsys.readouterr().out
    assert "| smoothness.overall.d_ci_low | 0.1 | 0.2 | 0.1 |" in out
    assert "| smoothness.overall.p | 0.01 | 0.01 | 0 |" in out  # asked for: shown though equal
    assert "smoothness.overall.d |" not in out and "left out" not in out
    assert cli.main(["compare", *map(str, two_runs), "--stat", "nothing*"]) == ExitCode.INPUT
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith("error: --stat 'nothing*': matches none of the 4 statistics")


def _sparse(path: Path) -> None:
    with path.open("wb") as file:
        file.truncate(420 * 10**6)


MALFORMED = {  # file, how it is broken, what the one line says
    "stats_list": ("stats.json", lambda path: path.write_text("[1, 2]"), "stats.json: holds a list, expected a mapping"),
    "stats_not_json": ("stats.json", lambda path: path.write_text('{"a": '), "stats.json: not valid JSON (line 1 column 7"),
    "stats_value_list": ("stats.json", lambda path: path.write_text('{"a": [1]}'), "stats.json: 'a': '[1]' is not a number"),
    "stats_huge": ("stats.json", _sparse, "stats.json: is 400.5 MiB, more than the 64 MiB a run_json file may have"),
    "stats_unreadable": ("stats.json", lambda path: path.symlink_to("/proc/self/mem"), "stats.json: cannot be read"),
    "criteria_dict": ("criteria.json", lambda path: path.write_text("{}"), "criteria.json: holds a mapping, expected a list"),
    "criteria_missing_key": ("criteria.json", lambda path: path.write_text('[{"name": "x", "passed": true}]'),
                             "criteria.json: row 0: no values"),
    "criteria_values_text": ("criteria.json", lambda path: path.write_text('[{"name": "x", "passed": true, "values": {"d": "big"}}]'),
                             "criteria.json: row 0: values: 'd': 'big' is not a number"),
}


@pytest.mark.parametrize("command", ["compare", "ls"])
@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_run_files_are_one_line_naming_the_file(two_runs, capsys, case, command):
    name, damage, expected = MALFORMED[case]
    path = two_runs[1] / name
    path.unlink()
    damage(path)
    argv = ["compare", *map(str, two_runs)] if command == "compare" else ["ls", "stats", str(two_runs[1])]
    if command == "ls" and name == "criteria.json":
        pytest.skip("ls stats reads stats.json only")
    assert cli.main(argv) == ExitCode.INPUT
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {two_runs[1]}/") and expected in error[0], error


def test_a_closed_pipe_keeps_the_exit_code(tmp_path):
    """`harness validate --show DIR | head -1` with an invalid spec in DIR: still exit 2."""
    import subprocess
    import sys

    (tmp_path / "a_good.yaml").write_text(f"extends: {REPO / 'tests' / 'bad_inputs' / '_base.yaml'}\n", encoding="utf-8")
    (tmp_path / "z_bad.yaml").write_text("name: [\n", encoding="utf-8")
    done = subprocess.Popen([sys.executable, "-m", "harness", "validate", "--show", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()  # the reader leaves before the first line is written
    errors = done.stderr.read().decode()
    assert done.wait() == ExitCode.INPUT, errors
    assert errors.count("\n") == 1 and "z_bad.yaml: line 2: not valid YAML" in errors, errors


def test_validate_models_checks_the_context_without_loading_weights(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    spec = tmp_path / "long.yaml"
    spec.write_text(f"extends: {REPO / 'tests' / 'bad_inputs' / '_base.yaml'}\nmodels: {{base: {{id: {tiny_model_dir}}}}}\n"
                    "conditions: {model: {generation: {max_new_tokens: 1000000000}}}\n", encoding="utf-8")
    plain = subprocess.run([sys.executable, "-m", "harness", "validate", str(spec)], cwd=REPO, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr  # the spec itself is valid
    done = subprocess.run([sys.executable, "-m", "harness", "validate", "--models", str(spec)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HARNESS_MODEL_CACHE": str(tmp_path / "models")})
    assert done.returncode == ExitCode.INPUT
    assert done.stderr.count("\n") == 1 and ("long.yaml: conditions.model.generation.max_new_tokens: 1000000000 new tokens"
                                            in done.stderr), done.stderr
