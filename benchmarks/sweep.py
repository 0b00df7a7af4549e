"""Regularisation-strength sweeps on a real-image benchmark:
``python -m benchmarks.sweep --out DIR --ewc-lambda 1e3,1e4 [--lwf-alpha ...] [--si-lambda ...] BENCHMARK ARGS``.

Each (method, strength) is one ``python -m benchmarks`` run with the remaining arguments, in
``DIR/<method>_<strength>/`` and with ``--resume`` (an interrupted sweep keeps its finished runs). The
sweep then writes ``DIR/results.csv`` (every run's rows, with a ``strength`` column such as
``ewc_lambda=1e3``), ``DIR/summary.csv``/``summary.md`` (mean ± std over seeds per method and strength)
and ``DIR/run.json``. Strengths are chosen on the test stream here, so the best row is an optimistic
estimate of what a tuned method reaches, not a tuned result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from avalanche_dkvb.atomic_files import atomic_write_text
from avalanche_dkvb.validation import check_non_negative_float
from benchmarks import cli
from benchmarks.__main__ import main as run_benchmark, parse_args as parse_benchmark_args, write_run_info
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
    args.threads = parse_benchmark_args([*benchmark_args, "--methods", ",".join(swept)]).threads
    return args, benchmark_args


def main(argv=None) -> int:
    args, benchmark_args = parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        with FolderLock(args.out, command):
            return _sweep(args, benchmark_args, command)
    except FolderBusy as error:
        return cli.report(PROG, error, args.debug, cli.USAGE_ERROR)


def _sweep(args: argparse.Namespace, benchmark_args: list[str], command: str) -> int:
    start = time.perf_counter()
    write_run_info(args.out, args.threads, command, 0.0, "running")
    frames = []
    for name, method in STRENGTHS.items():
        for value in getattr(args, name):
            run_dir = args.out / f"{method}_{value}"
            status = run_benchmark([*benchmark_args, "--methods", method, _flag(name), value,
                                    "--out", str(run_dir), "--resume"])
            if status != 0:
                write_run_info(args.out, args.threads, command, time.perf_counter() - start,
                               "interrupted" if status == 130 else "failed",
                               error=None if status == 130 else f"the run in {run_dir} ended with status {status}")
                return status
            frames.append(pd.read_csv(run_dir / "results.csv").assign(strength=f"{name}={value}"))
    results = pd.concat(frames, ignore_index=True)
    summary = summarise(results, keys=("benchmark", "method", "strength"))
    atomic_write_text(args.out / "results.csv", results.to_csv(index=False))
    atomic_write_text(args.out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(args.out / "summary.md", to_markdown(summary))
    write_run_info(args.out, args.threads, command, time.perf_counter() - start, "finished")
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
