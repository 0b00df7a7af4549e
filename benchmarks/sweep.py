"""Regularisation-strength sweeps on a real-image benchmark:
``python -m benchmarks.sweep --out DIR --ewc-lambda 1e3,1e4 [--lwf-alpha ...] [--si-lambda ...] BENCHMARK ARGS``.

Each (method, strength) is one ``python -m benchmarks`` run with the remaining arguments, in
``DIR/<method>_<strength>/`` and with ``--resume`` (an interrupted sweep keeps its finished runs).
The cells of all of them (method, strength, seed) run on one engine: ``--engine ray`` fans them all
out at once, the embeddings loaded once for the whole sweep. The sweep then writes ``DIR/results.csv`` (every run's rows, with a ``strength`` column such as
``ewc_lambda=1e3``), ``DIR/summary.csv``/``summary.md`` (mean ± std over seeds per method and strength)
and ``DIR/run.json``. Strengths are chosen on the test stream here, so the best row is an optimistic
estimate of what a tuned method reaches, not a tuned result.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import pandas as pd

from avalanche_dkvb.atomic_files import atomic_write_text
from avalanche_dkvb.validation import check_non_negative_float
from benchmarks import cli
from benchmarks.__main__ import (PROG as BENCHMARK_PROG, Job, failure_message, open_results, run_jobs, setup_process,
                                 StopSignals, write_run_info)
from benchmarks.__main__ import parse_args as parse_benchmark_args
from benchmarks.folder_lock import FolderBusy, FolderLock
from benchmarks.outputs import summarise, to_markdown
from benchmarks.real import STRENGTHS

PROG = "python -m benchmarks.sweep"
RESERVED = ("--methods", "--out", "--resume")  # set by the sweep for each run


def _flag(strength: str) -> str:
    return "--" + strength.replace("_", "-")


def numbers(text: str) -> list[str]:
    """Comma-separated numbers, kept as typed (they name the run folders)."""
    values = [item for item in text.split(",") if item]
    for value in values:
        number = float(value)  # a ValueError: argparse's "invalid numbers value"
        try:
            check_non_negative_float("each strength", number)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return values


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="sweep folder")
    for name, method in STRENGTHS.items():
        parser.add_argument(_flag(name), type=numbers, default=[],
                            help=f"comma-separated values for {method}")
    args, benchmark_args = parser.parse_known_args(argv)
    reserved = [a for a in benchmark_args if a.split("=")[0] in RESERVED]
    if reserved:
        parser.error(f"{reserved} are set by the sweep for each run; leave them out")
    swept = [method for name, method in STRENGTHS.items() if getattr(args, name)]
    if not swept:
        parser.error(f"nothing to sweep: give at least one of {[_flag(name) for name in STRENGTHS]}")
    # The benchmark arguments are checked once, before any run: unknown options, a benchmark without these methods.
    args.settings = parse_benchmark_args([*benchmark_args, "--methods", ",".join(swept)])  # threads, engine, ...
    return args, benchmark_args


def runs(args: argparse.Namespace, benchmark_args: list[str]) -> list[tuple[str, str, Path, list[str]]]:
    """Each (strength, value) of the sweep: its name, value, folder and ``python -m benchmarks`` arguments."""
    return [(name, value, args.out / f"{method}_{value}",
             [*benchmark_args, "--methods", method, _flag(name), value, "--out", str(args.out / f"{method}_{value}"),
              "--resume"])
            for name, method in STRENGTHS.items() for value in getattr(args, name)]


def main(argv=None) -> int:
    args, benchmark_args = parse_args(argv)
    setup_process(args.settings)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(FolderLock(args.out, command))
            jobs = []
            for _, _, run_dir, run_argv in runs(args, benchmark_args):
                run_args = parse_benchmark_args(run_argv)
                held.enter_context(FolderLock(run_dir, " ".join([BENCHMARK_PROG, *run_argv])))
                jobs.append(Job(run_args, open_results(run_args)))  # a refused resume has written nothing
        except (FolderBusy, ValueError, OSError) as error:
            return cli.report(PROG, error, args.debug, cli.USAGE_ERROR)
        try:
            return _sweep(args, benchmark_args, command, jobs)
        except Exception as error:
            return cli.report(PROG, error, args.debug, cli.RUN_ERROR)


def _sweep(args: argparse.Namespace, benchmark_args: list[str], command: str, jobs: list[Job]) -> int:
    """Run every job's cells on one engine, keeping each run.json true, then tabulate the sweep."""
    start = time.perf_counter()
    commands = {job.args.out: " ".join([BENCHMARK_PROG, *run_argv]) for job, (*_, run_argv) in
                zip(jobs, runs(args, benchmark_args))}

    def record(status: str, error: str | None = None, failures=()) -> None:
        seconds = time.perf_counter() - start
        write_run_info(args.out, args.settings, command, seconds, status, error=error, failures=failures)
        for job in jobs:
            mine = [f for f in failures if f.cell.out == job.args.out]
            if mine:
                write_run_info(job.args.out, job.args, commands[job.args.out], seconds, "failed",
                               error=failure_message(mine, len(job.todo)), failures=mine)
            else:
                write_run_info(job.args.out, job.args, commands[job.args.out], seconds,
                               "finished" if status != "running" and job.finished else status, error=error)

    record("running")
    try:
        with StopSignals() as stops:
            failures = run_jobs(jobs, args.settings, stops)
    except KeyboardInterrupt:
        record("interrupted")
        print(f"Interrupted: the finished runs are in {args.out}; running the sweep again continues from them.",
              file=sys.stderr)
        return 130
    except Exception as error:
        record("failed", error=f"{type(error).__name__}: {error}")
        raise
    if failures:
        message = failure_message(failures, sum(len(job.todo) for job in jobs))
        record("failed", error=message, failures=failures)
        print(f"{PROG}: {message}. Running the sweep again runs only the missing cells.", file=sys.stderr)
        return cli.RUN_ERROR
    frames = [pd.read_csv(run_dir / "results.csv").assign(strength=f"{name}={value}")
              for name, value, run_dir, _ in runs(args, benchmark_args)]
    results = pd.concat(frames, ignore_index=True)
    summary = summarise(results, keys=("benchmark", "method", "strength"))
    atomic_write_text(args.out / "results.csv", results.to_csv(index=False))
    atomic_write_text(args.out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(args.out / "summary.md", to_markdown(summary))
    record("finished")
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
