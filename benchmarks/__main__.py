"""Command line: ``python -m benchmarks`` (or ``dkvb-benchmarks``).

With no arguments it runs the main job, the seeds' 2D class-incremental stream, for DKVB, a linear
probe and an MLP, and writes results.csv, accuracy_matrix.csv, summary.csv/.md and decision-region
PNGs into ``--out``. ``--benchmark split_cifar10_jpeg`` (or split_cifar10, split_cifar100,
split_tinyimagenet) runs a real-image benchmark on cached embeddings of a frozen encoder, with the
methods of ``benchmarks/methods.py``, and also writes accuracy plots and Avalanche CSV/TensorBoard logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch
from avalanche.logging import CSVLogger, TextLogger

from avalanche_dkvb.atomic_files import atomic_write_text
from avalanche_dkvb.validation import check_positive_int, check_seeds
from benchmarks import cli, methods, real, toy2d
from benchmarks.folder_lock import FolderBusy, FolderLock
from benchmarks.outputs import ResultsWriter, read_run_info
from benchmarks.runner import checkpoint_path, make_evaluator, run_stream


PROG = "python -m benchmarks"


def _csv_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="toy2d", choices=["toy2d", *real.BENCHMARKS])
    parser.add_argument("--methods", type=_csv_list(str), default=None,
                        help=f"comma-separated methods (default: all); toy2d: {','.join(toy2d.METHODS)}; "
                             f"real: {','.join(methods.METHODS)}")
    parser.add_argument("--seeds", type=_csv_list(int), default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/BENCHMARK)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (same settings) and run only the missing ones")
    real.add_arguments(parser)
    args = parser.parse_args(argv)
    available = toy2d.METHODS if args.benchmark == "toy2d" else methods.METHODS
    args.methods = args.methods or list(available)
    unknown = sorted(set(args.methods) - set(available))
    if unknown:
        parser.error(f"unknown method(s) {unknown} for {args.benchmark}; expected some of {sorted(available)}")
    args.out = args.out or Path("results") / args.benchmark
    parser.check(lambda: check_positive_int("--threads", args.threads))
    if args.benchmark == "toy2d":
        args.seeds = [0, 1, 2] if args.seeds is None else args.seeds
        parser.check(lambda: check_seeds("--seeds", args.seeds))
        if real.flags_set(args):
            parser.error(f"{', '.join(real.flags_set(args))} apply to the real-image benchmarks only, not to toy2d")
    else:
        parser.check(lambda: real.check_settings(real.resolve(args)))
    return args


def run_toy2d(args: argparse.Namespace, writer: ResultsWriter) -> ResultsWriter:
    for seed in args.seeds:
        benchmark = toy2d.toy2d_benchmark(seed)
        for method in args.methods:
            if writer.done("toy2d", method, seed):
                continue
            torch.manual_seed(seed)
            run_dir = args.out / "logs" / f"{method}_seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            checkpoint = checkpoint_path(args.out, method, seed)
            resuming = args.resume and checkpoint.exists()
            with open(run_dir / "log.txt", "a" if resuming else "w") as log_file:
                evaluator = make_evaluator([TextLogger(log_file), CSVLogger(str(run_dir))])
                strategy = toy2d.METHODS[method](evaluator, seed)
                carry = {"regions": []}  # decision regions after each experience, kept in the checkpoint
                print(f"[toy2d] {method}, seed {seed}", flush=True)
                result = run_stream(
                    strategy, benchmark, progress=lambda line: print(f"  {line}", flush=True),
                    after_experience=lambda i: carry["regions"].append(
                        torch.from_numpy(toy2d.predict_grid(strategy.model))),
                    checkpoint=checkpoint, resume=args.resume,
                    settings={"benchmark": "toy2d", "method": method, "seed": seed}, carry=carry)
            toy2d.plot_decision_regions(method, seed, [r.numpy() for r in carry["regions"]], benchmark,
                                        args.out / f"decision_regions_{method}_seed{seed}.png")
            writer.add("toy2d", method, seed, result)
            checkpoint.unlink(missing_ok=True)
    return writer


def write_run_info(out: Path, threads: int, command: str, seconds: float, status: str,
                   error: str | None = None) -> None:
    """``run.json``: the command, wall-clock time and status ("running" until the run finishes;
    "finished", "interrupted", or "failed" with the ``error``)."""
    atomic_write_text(out / "run.json", json.dumps(
        {"command": command, "status": status, "wall_clock_seconds": round(seconds, 1),
         "torch_threads": threads, "torch": torch.__version__,
         "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **({"error": error} if error else {})},
        indent=2))


def open_results(args: argparse.Namespace) -> ResultsWriter:
    """The run's results in ``--out``; with ``--resume``, the finished runs there after checking their
    files and settings (ValueError naming the file otherwise). Reads only, so it runs before any write."""
    if args.resume and (args.out / "run.json").exists():
        read_run_info(args.out)
    if args.benchmark == "toy2d":
        return ResultsWriter(args.out, resume=args.resume)
    return real.open_results(args, real.resolve(args))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("avalanche_dkvb").setLevel(logging.INFO)  # key-initialisation progress
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU
    cli.hide_avalanche_deprecations()
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    lock = FolderLock(args.out, command)
    try:
        lock.acquire()
        writer = open_results(args)  # a refused --resume has written nothing
    except (FolderBusy, ValueError, OSError) as error:
        lock.release()
        return cli.report(PROG, error, args.debug, cli.USAGE_ERROR)
    try:
        if lock.took_over:
            print(f"Took over the stale lock of {args.out} from pid {lock.took_over.get('pid')} (no longer "
                  f"running): {lock.took_over.get('command')}", file=sys.stderr)
        return _run(args, command, writer)
    except Exception as error:
        return cli.report(PROG, error, args.debug, cli.RUN_ERROR)
    finally:
        lock.release()


def _run(args: argparse.Namespace, command: str, writer: ResultsWriter) -> int:
    """Run the job in the held ``--out``, keeping run.json's status true however it ends."""
    start = time.perf_counter()
    write_run_info(args.out, args.threads, command, 0.0, "running")
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops it like Ctrl-C
    try:
        # run_real opens its own writer (the same files and checks as ``writer``)
        writer = run_toy2d(args, writer) if args.benchmark == "toy2d" else real.run_real(args)
    except KeyboardInterrupt:
        write_run_info(args.out, args.threads, command, time.perf_counter() - start, "interrupted")
        print(f"Interrupted: the finished runs are in {args.out}; --resume continues from them.", file=sys.stderr)
        return 130
    except Exception as error:
        write_run_info(args.out, args.threads, command, time.perf_counter() - start, "failed",
                       error=f"{type(error).__name__}: {error}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    seconds = time.perf_counter() - start
    write_run_info(args.out, args.threads, command, seconds, "finished")
    print()
    print(writer.results.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print((args.out / "summary.md").read_text())
    print(f"Wrote results.csv, accuracy_matrix.csv, summary.csv, summary.md, run.json and plots to {args.out} "
          f"in {seconds:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
