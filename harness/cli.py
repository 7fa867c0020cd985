"""`harness` command line: run, validate, schema, compare, directions.

Exit codes (pytest-style, `harness.errors.ExitCode`): 0 every criterion passed, 1 some
criterion failed, 2 bad input or usage, 3 runtime error, 130 interrupted, 143 terminated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Sequence

from harness.errors import ExitCode, HarnessError, InputError


def spec_files(paths: Sequence[str], select: str | None = None) -> list[Path]:
    """Spec files named directly or found in folders (`*.yaml`), optionally filtered by -k."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.glob("*.yaml") if not p.name.startswith("_")))
        elif path.is_file():
            found.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if select:
        found = [p for p in found if _selected(p.stem, select)]
    return found


def _selected(name: str, expression: str) -> bool:
    """pytest's -k: words match as substrings of the spec's file name; `and`, `or`, `not`, ()."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if peek() is None:
            raise InputError(f"-k: incomplete expression {expression!r}")
        position += 1
        return tokens[position - 1]

    def either() -> bool:
        value = both()
        while peek() == "or":
            take()
            value = both() or value
        return value

    def both() -> bool:
        value = single()
        while peek() == "and":
            take()
            value = single() and value
        return value

    def single() -> bool:
        token = take()
        if token == "not":
            return not single()
        if token == "(":
            value = either()
            if take() != ")":
                raise InputError(f"-k: unbalanced parentheses in {expression!r}")
            return value
        if token in ("and", "or", ")"):
            raise InputError(f"-k: unexpected {token!r} in {expression!r}")
        return token in name

    value = either()
    if peek() is not None:
        raise InputError(f"-k: unexpected {peek()!r} in {expression!r}")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.spec import dump_spec, load_spec

    files = spec_files(args.paths)
    if not files:
        raise InputError(f"{' '.join(args.paths)}: no spec files found")
    bad = 0
    for path in files:
        try:
            spec = load_spec(path)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            bad += 1
            continue
        if args.show or len(files) == 1:
            print(f"# {path} (resolved)")
            print(dump_spec(spec))
        else:
            print(f"ok     {path}  ({spec.name})")
    print(f"{len(files) - bad} valid, {bad} invalid")
    return ExitCode.INPUT if bad else ExitCode.PASSED


def cmd_schema(args: argparse.Namespace) -> int:
    from harness.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return ExitCode.PASSED


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import compare_runs

    markdown = compare_runs(Path(args.run_a), Path(args.run_b))
    print(markdown)
    if args.output:
        from harness.artifacts import write_text

        write_text(Path(args.output), markdown)
    return ExitCode.PASSED


def cmd_directions(args: argparse.Namespace) -> int:
    from harness.directions import difference_of_means, write_direction_file

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise InputError(f"{output}: -o: the direction file must end in .safetensors")
    direction, metadata = difference_of_means(Path(args.run_dir), args.a, args.b, args.split)
    write_direction_file(output, direction, metadata)
    count = len(metadata["samples"].split(","))
    print(f"{output}: {args.a} − {args.b}, {direction.shape[0]} layers x {direction.shape[1]}, from {count} samples ({args.split})")
    return ExitCode.PASSED


def cmd_run(args: argparse.Namespace) -> int:
    from harness.stages.criteria import format_result, summary_line
    from harness.spec import load_spec
    from harness.writing import check_writable_folder, disk_errors_named

    files = spec_files(args.paths, args.select)
    if not files:
        raise InputError(f"{' '.join(args.paths)}: no spec files selected")
    for path in files:  # every spec must be valid before anything runs or is written
        load_spec(path)
    runs_dir = Path(args.runs_dir)
    check_writable_folder(runs_dir, "--runs-dir")
    if os.environ.get("HARNESS_CACHE_DIR"):
        check_writable_folder(Path(os.environ["HARNESS_CACHE_DIR"]), "HARNESS_CACHE_DIR")

    from harness.runner import run_spec

    _quiet_libraries()
    outcomes, totals, worst = [], [], ExitCode.PASSED
    for path in files:
        try:
            with disk_errors_named(runs_dir):
                outcome = run_spec(path, runs_dir, use_cache=not args.no_cache)
        except InputError:
            raise
        except HarnessError as exc:
            if len(files) == 1:
                raise
            print(f"ERROR  {path}: {exc}", file=sys.stderr)
            worst = max(worst, ExitCode.RUNTIME)
            continue
        if outcome.run_dir is None:  # a helper process under accelerate launch
            continue
        print(f"\n{path}  →  {outcome.run_dir}")
        for result in outcome.results:
            print(format_result(result))
        print(f"{summary_line(outcome.results)} in {outcome.seconds:.1f}s")
        outcomes.append((path, outcome))
        totals.extend(outcome.results)
        worst = max(worst, outcome.exit_code)
    if args.junitxml:
        from harness.junit import write_junit

        write_junit(Path(args.junitxml), outcomes)
    if len(files) > 1:
        print(f"\n{len(outcomes)} specs run")
        print(summary_line(totals))
    return worst


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run specs (files or folders) and check their criteria")
    run.add_argument("paths", nargs="+")
    run.add_argument("-k", dest="select", help="only specs whose name matches (substrings, `or`, `not`)")
    run.add_argument("--no-cache", action="store_true", help="recompute every stage")
    run.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    run.add_argument("--junitxml", help="also write criteria results as JUnit XML")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="parse and validate specs; run nothing")
    validate.add_argument("paths", nargs="+")
    validate.add_argument("--show", action="store_true", help="print each resolved spec")
    validate.set_defaults(handler=cmd_validate)

    schema = commands.add_parser("schema", help="print the spec's JSON Schema")
    schema.set_defaults(handler=cmd_schema)

    compare = commands.add_parser("compare", help="key statistics of two runs side by side")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.add_argument("-o", "--output", help="also write the markdown table here")
    compare.set_defaults(handler=cmd_compare)

    from typing import get_args

    from harness.schema import DirectionSplit

    directions = commands.add_parser(
        "directions", help="a difference-of-means direction per layer from a run that saved activations"
    )
    directions.add_argument("run_dir", help="a finished run folder with activations/ (capture.save_activations: true)")
    directions.add_argument("--a", required=True, help="condition whose mean the direction points to")
    directions.add_argument("--b", required=True, help="condition whose mean it points away from")
    directions.add_argument("--split", choices=get_args(DirectionSplit), default="all", help="which samples build it (default: all)")
    directions.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    directions.set_defaults(handler=cmd_directions)
    return parser


def _terminate(signum, frame) -> None:
    from harness.executor import Terminated

    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # timeout, docker stop, schedulers: like Ctrl-C
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INPUT
    except BrokenPipeError:  # `harness validate specs/ | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.PASSED
    except KeyboardInterrupt as exc:
        from harness.executor import Terminated

        terminated = isinstance(exc, Terminated)
        print(
            f"\n{'terminated' if terminated else 'interrupted'}: finished batches are saved in the stage cache; "
            "run the same command again to resume from there",
            file=sys.stderr,
        )
        return ExitCode.TERMINATED if terminated else ExitCode.INTERRUPTED
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # an unexpected failure still ends in one line (and exit 3)
        if os.environ.get("HARNESS_DEBUG"):
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"runtime error: {type(exc).__name__}: {message} (HARNESS_DEBUG=1 shows the traceback)", file=sys.stderr)
        return ExitCode.RUNTIME


if __name__ == "__main__":
    sys.exit(main())
