"""`harness` command line: run, validate, ls, schema, compare, directions.

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
from harness.select import keyword_matches


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
        found = [p for p in found if keyword_matches(p.stem, select)]
    return found


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.overrides import command_line
    from harness.spec import dump_spec
    from harness.sweep import expand

    files = spec_files(args.paths)
    if not files:
        raise InputError(f"{' '.join(args.paths)}: no spec files found")
    overrides = command_line(args.set, args.limit, args.device)
    bad = 0
    for path in files:
        try:
            sweep = expand(path, overrides)  # a matrix: every point, validated like a file
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            bad += 1
            continue
        if args.show or len(files) == 1:
            for point in sweep.points:
                print(f"# {path}{'::' + point.id if sweep.is_matrix else ''} (resolved)")
                print(dump_spec(point.spec))
        else:
            points = f", {len(sweep.points)} points" if sweep.is_matrix else ""
            print(f"ok     {path}  ({sweep.name}{points})")
    print(f"{len(files) - bad} valid, {bad} invalid")
    return ExitCode.INPUT if bad else ExitCode.PASSED


def cmd_schema(args: argparse.Namespace) -> int:
    from harness.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return ExitCode.PASSED


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import compare_runs

    markdown = compare_runs([Path(run) for run in args.runs])
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


def cmd_ls(args: argparse.Namespace) -> int:
    from harness import listing

    if args.what == "stats":
        if len(args.paths) != 1:
            raise InputError("ls stats: name one spec file, run folder or sweep folder")
        rows = listing.stats(Path(args.paths[0]))
    elif args.what == "specs":
        rows = listing.specs(spec_files(args.paths or ["specs"]))
    else:
        if args.paths:
            raise InputError(f"ls {args.what}: takes no path")
        rows = {"metrics": listing.metrics, "sources": listing.sources, "sites": listing.sites}[args.what]()
    print("\n".join(rows))
    return ExitCode.PASSED


def cmd_run(args: argparse.Namespace) -> int:
    from harness.overrides import command_line
    from harness.stages.criteria import format_result, summary_line
    from harness.sweep import expand
    from harness.writing import check_writable_folder, disk_errors_named

    files = spec_files(args.paths, args.select)
    if not files:
        raise InputError(f"{' '.join(args.paths)}: no spec files selected")
    overrides = command_line(args.set, args.limit, args.device)
    sweeps = [expand(path, overrides) for path in files]  # every spec and point valid before anything runs
    runs_dir = Path(args.runs_dir)
    check_writable_folder(runs_dir, "--runs-dir")
    if os.environ.get("HARNESS_CACHE_DIR"):
        check_writable_folder(Path(os.environ["HARNESS_CACHE_DIR"]), "HARNESS_CACHE_DIR")

    from harness.runner import run_spec
    from harness.sweep import run_sweep

    def report(header: str, outcome) -> None:
        print(f"\n{header}  →  {outcome.run_dir}")
        for result in outcome.results:
            print(format_result(result))

    def report_point(point, outcome) -> None:
        if outcome.run_dir is not None:  # None: a helper process under accelerate launch
            report(point.id, outcome)

    _quiet_libraries()
    outcomes, totals, worst = [], [], ExitCode.PASSED
    for sweep in sweeps:
        path = sweep.path
        if args.exitfirst and worst != ExitCode.PASSED:
            print(f"\nstopped after the first failure (-x): {path} and the specs after it not run")
            break
        try:
            with disk_errors_named(runs_dir):
                if sweep.is_matrix:
                    outcome = run_sweep(sweep, runs_dir, not args.no_cache, on_point=report_point, tag=args.tag)
                else:
                    outcome = run_spec(path, runs_dir, use_cache=not args.no_cache, overrides=overrides, tag=args.tag)
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
        if sweep.is_matrix:
            report(f"{path}: sweep of {len(sweep.points)} points", outcome)
            results = outcome.all_results
            outcomes += [(f"{path}::{point.id}", run) for point, run in outcome.points] + [(f"{path}::sweep", outcome)]
        else:
            report(str(path), outcome)
            results = outcome.results
            outcomes.append((path, outcome))
        print(f"{summary_line(results)} in {outcome.seconds:.1f}s")
        totals.extend(results)
        worst = max(worst, ExitCode.PASSED if all(result.passed for result in results) else ExitCode.FAILED)
    if args.junitxml:
        from harness.junit import write_junit

        write_junit(Path(args.junitxml), outcomes)
    if len(files) > 1:
        print(f"\n{len(outcomes)} specs and points run")
        print(summary_line(totals))
    return worst


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


ENVIRONMENT = {
    "HARNESS_CACHE_DIR": "the stage cache (default: <runs dir>/.cache)",
    "HARNESS_MODEL_CACHE": "converted GGUF weights and file hashes (default: ~/.cache/harness)",
    "HARNESS_DEBUG": "1: print the traceback of an unexpected error",
}
"""Environment variables the harness reads, listed in `harness --help`."""


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """--set/--limit/--device: what `run` and `validate` apply over every spec."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="set a spec key (YAML value; repeatable), e.g. conditions.model.generation.temperature=0.7")
    parser.add_argument("--limit", type=int, metavar="N", help="shorthand for --set dataset.n_samples=N")
    parser.add_argument("--device", help="placement of every model (models.*.device_map), e.g. cpu or cuda:0")


def build_parser() -> argparse.ArgumentParser:
    import harness

    parser = argparse.ArgumentParser(
        prog="harness", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="environment variables:\n" + "\n".join(f"  {name:<22}{text}" for name, text in ENVIRONMENT.items()),
    )
    parser.add_argument("--version", action="version", version=f"harness {harness.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run specs (files or folders) and check their criteria")
    run.add_argument("paths", nargs="+")
    run.add_argument("-k", dest="select", help="only specs whose name matches (substrings, `or`, `not`)")
    run.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first spec with a failed criterion or error")
    run.add_argument("--tag", type=_tag, help="name the run: its folder is runs/<name>/<time>-<tag>")
    _add_overrides(run)
    run.add_argument("--no-cache", action="store_true", help="recompute every stage")
    run.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    run.add_argument("--junitxml", help="also write criteria results as JUnit XML")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="parse and validate specs (every matrix point); run nothing")
    validate.add_argument("paths", nargs="+")
    validate.add_argument("--show", action="store_true", help="print each resolved spec")
    _add_overrides(validate)
    validate.set_defaults(handler=cmd_validate)

    ls = commands.add_parser("ls", help="list specs, metrics, condition sources, capture sites, or statistic names")
    ls.add_argument("what", choices=["specs", "metrics", "sources", "sites", "stats"])
    ls.add_argument("paths", nargs="*", help="specs: files or folders (default: specs/); stats: a spec, run or sweep folder")
    ls.set_defaults(handler=cmd_ls)

    schema = commands.add_parser("schema", help="print the spec's JSON Schema")
    schema.set_defaults(handler=cmd_schema)

    compare = commands.add_parser("compare", help="key statistics of runs (or a sweep folder's points) side by side")
    compare.add_argument("runs", nargs="+", help="run folders or sweep folders")
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


def _tag(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=,-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to 64 letters, digits, '_', '.', '=', ',' or '-'")
    return text


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
