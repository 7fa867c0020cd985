"""`harness` command line: run, validate, ls, schema, compare, directions, view, log.

Exit codes are pytest-style (`harness.errors.ExitCode`); `harness run --help` lists them.
Each command imports what it runs inside its function: the start-up path (`--help`,
`validate`, `ls`) loads no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import Sequence

from harness.errors import ExitCode, HarnessError, InputError
from harness.select import PATTERN_HELP, keyword_matches


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
            for point in sweep.points if args.models else []:
                _check_models(point.spec, path)
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


def _check_models(spec, path: Path) -> None:
    """`validate --models`: the model checks of collection, and each tokenizer, loading no weights
    (nothing is written but the model cache's memo of file hashes)."""
    from harness.cache import StageCache
    from harness.executor import Executor
    from harness.pool import ModelPool
    from harness.runner import check_models

    executor = Executor(StageCache(Path(os.devnull), enabled=False), lambda line: None)  # runs no stage
    check_models(spec, ModelPool(spec, path, executor), tokenizers=True)


def cmd_schema(args: argparse.Namespace) -> int:
    from harness.spec import spec_json_schema

    print(json.dumps(spec_json_schema(), indent=2))
    return ExitCode.PASSED


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.compare import compare_runs
    from harness.writing import check_output_file

    if args.output:
        check_output_file(Path(args.output), "-o", args.force)
    markdown = compare_runs([Path(run) for run in args.runs], args.stat)
    print(markdown)
    if args.output:
        from harness.artifacts import write_text

        write_text(Path(args.output), markdown)
    return ExitCode.PASSED


def cmd_directions(args: argparse.Namespace) -> int:
    from harness.direction_builder import difference_of_means, write_direction_file
    from harness.writing import check_output_file

    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise InputError(f"{output}: -o: the direction file must end in .safetensors")
    check_output_file(output, "-o", args.force)
    direction, metadata = difference_of_means(Path(args.run_dir), args.a, args.b, args.split)
    write_direction_file(output, direction, metadata)
    count = len(metadata["samples"].split(","))
    print(f"{output}: {args.a} − {args.b}, {direction.shape[0]} layers x {direction.shape[1]}, from {count} samples ({args.split})")
    return ExitCode.PASSED


def cmd_ls(args: argparse.Namespace) -> int:
    from harness import listing

    if args.what == "stats":
        if len(args.paths) not in (1, 2):
            raise InputError("ls stats: name one spec file, run folder or sweep folder, then optionally a PATTERN")
        names = listing.stats(Path(args.paths[0]))
        rows = listing.matching(names, args.paths[1]) if len(args.paths) == 2 else names
        if not rows:
            print(f"no statistic name matches {args.paths[1]!r} (of {len(names)}; {PATTERN_HELP})", file=sys.stderr)
    elif args.what == "specs":
        rows = listing.specs(spec_files(args.paths or ["specs"]), shutil.get_terminal_size().columns)
    else:
        if args.paths:
            raise InputError(f"ls {args.what}: takes no path")
        rows = {"metrics": listing.metrics, "sources": listing.sources, "sites": listing.sites,
                "interventions": listing.interventions}[args.what]()
    if rows:
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
    from harness.cache import ROOT_VARIABLE, cache_root

    runs_dir = Path(args.runs_dir)
    check_writable_folder(runs_dir, "--runs-dir")
    if args.view:
        from harness.view import plotly_bundle

        plotly_bundle()
    if args.log:
        from harness.tracking import require_mlflow

        require_mlflow()
    check_writable_folder(cache_root(runs_dir), ROOT_VARIABLE)

    from harness.session import Session

    session = Session(runs_dir, not args.no_cache, tag=args.tag)

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
                outcome = session.run(sweep, report_point if sweep.is_matrix else lambda point, run: None)
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
        _publish(outcome.run_dir, args.view, args.log)
        if sweep.is_matrix:
            report(f"{path}: sweep of {len(sweep.points)} points", outcome)
            outcomes += [(f"{path}::{point.id}", run) for point, run in outcome.points] + [(f"{path}::sweep", outcome)]
        else:
            report(str(path), outcome)
            outcomes.append((path, outcome))
        print(f"{summary_line(outcome.all_results)} in {outcome.seconds:.1f}s")
        totals.extend(outcome.all_results)
        worst = max(worst, outcome.exit_code)
    if args.junitxml:
        from harness.junit import write_junit

        write_junit(Path(args.junitxml), outcomes)
    if len(files) > 1:
        print(f"\n{len(outcomes)} specs and points run")
        print(summary_line(totals))
    return worst


def _publish(folder: Path, view: bool, log: str | None) -> None:
    """`run --view` / `run --log`: the finished run or sweep folder's site, its MLflow runs."""
    if view:
        from harness.view import write_view

        print(f"view: {write_view(folder)}")
    if log:
        from harness.tracking import log_folder, tracking_uri

        print(f"logged to MLflow ({tracking_uri()}): {len(log_folder(folder))} runs")


def cmd_view(args: argparse.Namespace) -> int:
    from harness.view import write_view

    index = write_view(Path(args.target), Path(args.output) if args.output else None)
    print(index)
    if args.open:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())
    return ExitCode.PASSED


def cmd_log(args: argparse.Namespace) -> int:
    from harness.tracking import log_folder, tracking_uri

    ids = log_folder(Path(args.target))
    print(f"{args.target}: logged to MLflow ({tracking_uri()}) as {len(ids)} runs: {', '.join(ids)}")
    return ExitCode.PASSED


def _quiet_libraries() -> None:
    # set where transformers reads them when it is first imported (the environment, the hub's
    # progress-bar switch): a fully cached run never imports it
    import huggingface_hub.utils

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    huggingface_hub.utils.disable_progress_bars()


ENVIRONMENT = {
    "HARNESS_CACHE_DIR": "the stage cache (default, also when empty: <runs dir>/.cache)",
    "HARNESS_CACHE_KEY": "a secret: sign cache entries, use only entries signed with it",
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


TRACKERS = ("mlflow",)
"""Experiment trackers `harness log --to` and `harness run --log` write to (harness/tracking.py)."""

SPEC_PATHS = "spec files, or folders of them (their *.yaml files; names starting with _ are left out)"

RUN_EXAMPLES = """\
examples:
  harness run specs/quickstart.yaml                  SmolLM2-135M, offline, on a CPU in minutes
  harness run specs/quickstart.yaml --limit 8 --set conditions.model.generation.max_new_tokens=30 --tag smoke
  harness run specs/ -k "quickstart and not reference" -x     a folder, pytest-style selection
  harness run specs/cross-model-offline.yaml         a sweep: a run per matrix point, one combined report
  harness run specs/baseline.yaml --runs-dir /scratch/runs --device cuda:0
"""


def _exit_codes() -> str:
    return "exit codes:\n" + "\n".join(f"  {code.value:<4} {code.meaning}" for code in ExitCode)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    import harness

    parser = argparse.ArgumentParser(
        prog="harness", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A pytest-style, declarative experiment harness for interpretability research on language models:\n"
                    "a YAML spec states a hypothesis, `harness run` checks it criterion by criterion.",
        epilog="environment variables:\n" + "\n".join(f"  {name:<22}{text}" for name, text in ENVIRONMENT.items()),
    )
    parser.add_argument("--version", action="version", version=f"harness {harness.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do; `harness COMMAND --help` shows its arguments and examples")

    def command(name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    run = command("run", "run specs (files or folders) and check their criteria",
                  RUN_EXAMPLES + "\n" + _exit_codes())
    run.add_argument("paths", nargs="+", metavar="PATH", help=SPEC_PATHS)
    run.add_argument("-k", dest="select", metavar="EXPRESSION",
                     help="only specs whose file name matches: substrings with and/or/not, as pytest's -k")
    run.add_argument("-x", "--exitfirst", action="store_true", help="stop after the first spec with a failed criterion or error")
    run.add_argument("--tag", type=_tag, help="name the run: its folder is <runs dir>/<spec name>/<time>-<tag>")
    _add_overrides(run)
    run.add_argument("--no-cache", action="store_true", help="recompute every stage (overwriting its cache entries)")
    run.add_argument("--runs-dir", default="runs", metavar="DIR", help="where run folders go (default: runs)")
    run.add_argument("--junitxml", metavar="FILE", help="also write criteria results as JUnit XML")
    run.add_argument("--view", action="store_true", help="also write the run's static site into its folder as view/ (harness view)")
    run.add_argument("--log", choices=TRACKERS, help="also log each finished run or sweep (harness log --to)")
    run.set_defaults(handler=cmd_run)

    validate = command("validate", "parse and validate specs (every matrix point); run nothing", _examples(
        "harness validate specs/                       every shipped spec, one line each",
        "harness validate specs/quickstart.yaml        one spec: prints it resolved (extends, defaults)",
        "harness validate specs/baseline.yaml --set runtime.compile=true   with an override",
        "harness validate specs/ --models              also each model's files, tokenizer and context (no weights)",
    ))
    validate.add_argument("paths", nargs="+", metavar="PATH", help=SPEC_PATHS)
    validate.add_argument("--show", action="store_true", help="print each resolved spec (one spec is always printed)")
    validate.add_argument("--models", action="store_true",
                          help="also check each model: its files, tokenizer and context length (no weights loaded)")
    _add_overrides(validate)
    validate.set_defaults(handler=cmd_validate)

    ls = command("ls", "list specs, metrics, condition sources, capture sites, interventions, or statistic names", _examples(
        "harness ls specs                              one line per spec: name, offline or hub, summary",
        "harness ls stats specs/quickstart.yaml        the statistic names its run writes (criteria use them)",
        "harness ls stats runs/quickstart/RUN 'smoothness.overall.*'   the names a run wrote, filtered",
        "harness ls stats runs/quickstart/RUN ci_low   those containing ci_low",
        "harness ls metrics                            the registered metrics (also: sources, sites, interventions)",
    ))
    ls.add_argument("what", choices=["specs", "metrics", "sources", "sites", "interventions", "stats"], help="what to list")
    ls.add_argument("paths", nargs="*", metavar="PATH",
                    help="specs: spec files or folders (default: specs/); stats: a spec, run folder or sweep folder, "
                         f"then optionally a PATTERN: {PATTERN_HELP}")
    ls.set_defaults(handler=cmd_ls)

    schema = command("schema", "print the spec's JSON Schema (for editors: harness schema > spec.schema.json)")
    schema.set_defaults(handler=cmd_schema)

    compare = command("compare", "statistics of runs (or a sweep folder's points) side by side, then their criteria",
                      _examples(
                          "harness compare runs/quickstart/RUN_A runs/quickstart-reference/RUN_B",
                          "harness compare runs/temperature-sweep-offline/TIME-sweep     every point of a sweep",
                          "harness compare RUN_A RUN_B --stat 'smoothness.overall.*' --stat ci_   chosen statistics",
                      ))
    compare.add_argument("runs", nargs="+", metavar="RUN", help="finished run folders, or sweep folders (their points' runs)")
    compare.add_argument("--stat", action="append", default=[], metavar="PATTERN",
                         help="the statistics to show (repeatable), every row of them; default: the key statistics "
                              f"that differ between the runs. A PATTERN is {PATTERN_HELP}")
    compare.add_argument("-o", "--output", metavar="FILE", help="also write the markdown table here (its folder must exist)")
    compare.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    compare.set_defaults(handler=cmd_compare)

    from typing import get_args

    from harness.schema import DirectionSplit

    directions = command("directions", "a difference-of-means direction per layer from a run that saved activations",
                         _examples("harness directions runs/x/RUN --a model --b human --split first_half -o dir.safetensors"))
    directions.add_argument("run_dir", metavar="RUN", help="a finished run folder with activations/ (capture.save_activations: true)")
    directions.add_argument("--a", required=True, metavar="CONDITION", help="condition whose mean the direction points to")
    directions.add_argument("--b", required=True, metavar="CONDITION", help="condition whose mean it points away from")
    directions.add_argument("--split", choices=get_args(DirectionSplit), default="all", help="which samples build it (default: all)")
    directions.add_argument("-o", "--output", required=True, metavar="FILE",
                            help="the .safetensors file to write: not inside a run folder, its folder must exist")
    directions.add_argument("--force", action="store_true", help="replace the -o file if it exists")
    directions.set_defaults(handler=cmd_directions)

    view = command("view", "write a run's or sweep's evidence as a static site that opens from disk (no server, no network)",
                   _examples("harness view runs/quickstart/RUN                 writes runs/quickstart/RUN/view/index.html",
                             "harness view runs/x/TIME-sweep -o /tmp/x-view --open   a sweep: its points, each linking to its page"))
    view.add_argument("target", metavar="RUN|SWEEP", help="a finished run folder or sweep folder")
    view.add_argument("-o", "--output", metavar="DIR", help="where the site goes (default: RUN/view; replaced if it is a view)")
    view.add_argument("--open", action="store_true", help="open index.html in the default browser")
    view.set_defaults(handler=cmd_view)

    log = command("log", "log a finished run or sweep into experiment tracking (MLflow)",
                  _examples("harness log runs/quickstart/RUN --to mlflow      into ./mlruns, or MLFLOW_TRACKING_URI",
                            "harness log runs/x/TIME-sweep --to mlflow       a parent run and a child run per point"))
    log.add_argument("target", metavar="RUN|SWEEP", help="a finished run folder or sweep folder")
    log.add_argument("--to", required=True, choices=TRACKERS, help="where to log it")
    log.set_defaults(handler=cmd_log)
    return parser


def _tag(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.=,-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to 64 letters, digits, '_', '.', '=', ',' or '-'")
    return text


def _terminate(signum, frame) -> None:
    from harness.executor import Terminated

    raise Terminated()


class _ReaderMayLeave:
    """stdout or stderr that outlives its reader (`harness validate specs/ | head -1`): once the
    pipe is closed, the rest is written to /dev/null and the command finishes with its own exit
    code, so a closed pipe never turns exit 2 into 0."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._reader_left()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._reader_left()

    def _reader_left(self) -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ReaderMayLeave(sys.stdout), _ReaderMayLeave(sys.stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = streams


def _main(argv: Sequence[str] | None) -> int:
    signal.signal(signal.SIGTERM, _terminate)  # timeout, docker stop, schedulers: like Ctrl-C
    try:
        args = build_parser().parse_args(argv)  # inside: the parser reads the schema, which loads the plugins
        return args.handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.INPUT
    except KeyboardInterrupt as exc:
        from harness.executor import Terminated

        terminated = isinstance(exc, Terminated)
        resume = ("finished batches are saved in the stage cache; run the same command again to resume from there"
                  if args.command == "run" else "nothing was written")
        print(f"\n{'terminated' if terminated else 'interrupted'}: {resume}", file=sys.stderr)
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
