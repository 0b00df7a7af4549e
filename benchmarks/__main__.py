"""Command line: ``python -m benchmarks`` (or ``dkvb-benchmarks``).

With no arguments it runs the main job, the seeds' 2D class-incremental stream, for DKVB, a linear
probe and an MLP, and writes results.csv, accuracy_matrix.csv, summary.csv/.md and decision-region
PNGs into ``--out``. ``--benchmark split_cifar10_jpeg`` (or split_cifar10, split_cifar100,
split_tinyimagenet) runs a real-image benchmark on cached embeddings of a frozen encoder, with the
methods of ``benchmarks/methods.py``, and also writes accuracy plots and Avalanche CSV/TensorBoard logs.

Each (benchmark, method, seed) is a cell; ``--engine ray`` runs every cell as a Ray task
(``benchmarks/engine.py``), with the same results as the default ``--engine local``. A cell that
fails is reported and the others go on; ``--resume`` runs only the cells not yet in ``--out``.
"""

from __future__ import annotations

import _thread
import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from avalanche_dkvb.atomic_files import atomic_write_text
from avalanche_dkvb.embeddings.cache import EmbeddingCache
from avalanche_dkvb.validation import check_positive_int, check_seeds
from benchmarks import cli, engine, methods, real, toy2d
from benchmarks.engine import Failure
from benchmarks.folder_lock import FolderBusy, FolderLock
from benchmarks.outputs import ResultsWriter, read_run_info
from benchmarks.plots import plot_accuracy_curves, plot_final_matrices, plot_key_diagnostics
from benchmarks.runner import CachedArray, Cell, RunResult, check_checkpoint_settings, checkpoint_path, run_cell

PROG = "python -m benchmarks"
DEVICES = ("cpu", "cuda", "auto")


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
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (of this process)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="where the strategies train and evaluate (default cpu; auto: cuda where there is one, "
                             "with --engine ray where --gpus-per-cell > 0)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs already in --out (same settings) and run only the missing ones")
    real.add_arguments(parser)
    engine.add_arguments(parser)
    args = parser.parse_args(argv)
    available = toy2d.METHODS if args.benchmark == "toy2d" else methods.METHODS
    if args.methods == []:  # "--methods ," names none, which is not "all"
        parser.error("--methods names no method; leave it out to run all")
    args.methods = args.methods or list(available)
    unknown = sorted(set(args.methods) - set(available))
    if unknown:
        parser.error(f"unknown method(s) {unknown} for {args.benchmark}; expected some of {sorted(available)}")
    repeated = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if repeated:
        parser.error(f"--methods names {repeated} more than once")
    args.out = args.out or Path("results") / args.benchmark
    parser.check(lambda: check_positive_int("--threads", args.threads), lambda: engine.check_arguments(args),
                 lambda: check_device(args))
    if args.benchmark == "toy2d":
        args.seeds = [0, 1, 2] if args.seeds is None else args.seeds
        parser.check(lambda: check_seeds("--seeds", args.seeds))
        if real.flags_set(args):
            parser.error(f"{', '.join(real.flags_set(args))} apply to the real-image benchmarks only, not to toy2d")
    else:
        parser.check(lambda: real.check_settings(real.resolve(args)))
    return args


def check_device(args: argparse.Namespace) -> None:
    """Resolve ``--device auto`` and refuse a device the run cannot use (ValueError), before any work."""
    ray = args.engine == "ray"
    if args.device == "auto":
        cuda = args.gpus_per_cell > 0 if ray else torch.cuda.is_available()
        args.device = "cuda" if cuda and args.benchmark != "toy2d" else "cpu"
    if args.device == "cuda" and args.benchmark == "toy2d":
        raise ValueError("--device cuda applies to the real-image benchmarks; the 2D main job runs on the CPU.")
    if ray and args.device == "cuda" and not args.gpus_per_cell > 0:
        raise ValueError("--device cuda with --engine ray needs --gpus-per-cell > 0 (the GPU share Ray gives each "
                         "cell).")
    if ray and args.device == "cpu" and args.gpus_per_cell > 0:
        raise ValueError(f"--gpus-per-cell {args.gpus_per_cell:g} reserves GPUs that --device cpu leaves unused; "
                         f"give --device cuda (or auto) or --gpus-per-cell 0.")
    if not ray and args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); "
                         "use --device cpu or auto.")


class Job:
    """One run of ``python -m benchmarks`` in its held ``--out``: its cells in table order (seeds, then
    methods), those not finished yet, and the commit of each finished cell into the results, tables
    and plots there."""

    def __init__(self, args: argparse.Namespace, writer: ResultsWriter) -> None:
        self.args, self.writer = args, writer
        settings = {} if args.benchmark == "toy2d" else real.resolve(args)
        seeds = args.seeds if args.benchmark == "toy2d" else settings.pop("seeds")
        self.settings = settings
        self.via_cache = args.engine == "ray" and args.embeddings_via == "cache"  # workers read the cache files
        self.cells = [Cell(args.benchmark, method, seed, args.out, settings, args.device)
                      for seed in seeds for method in args.methods]
        writer.order = {cell.key: i for i, cell in enumerate(self.cells)}
        self.todo = [cell for cell in self.cells if not writer.done(*cell.key)]

    @property
    def finished(self) -> bool:
        return all(self.writer.done(*cell.key) for cell in self.cells)

    @property
    def data_key(self) -> tuple | None:
        """What identifies the embeddings the cells share (None: toy2d makes its own data)."""
        if self.args.benchmark == "toy2d":
            return None
        names = ("encoder", "weights", "image_size", "image_set", "key_init_set", "train_per_class",
                 "test_per_class", "key_init_per_class")
        return (*(self.settings[name] for name in names), str(self.args.data_root), str(self.args.cache_root),
                self.via_cache)

    def load_data(self) -> dict | None:
        """The embeddings every cell uses, computed or read from the cache once, before the fan-out:
        arrays, or with ``--embeddings-via cache`` the cache files the workers read themselves."""
        if self.args.benchmark == "toy2d":
            return None
        s = self.settings
        entries = {"train": real.load_embeddings(self.args, s["image_set"], "train", s["train_per_class"]),
                   "test": real.load_embeddings(self.args, s["image_set"], "test", s["test_per_class"]),
                   "init": real.load_embeddings(self.args, s["key_init_set"], "train", s["key_init_per_class"])}
        print(f"[{self.args.benchmark}] train {entries['train'].embeddings.shape}, test "
              f"{entries['test'].embeddings.shape}, key init {entries['init'].embeddings.shape} "
              f"({s['key_init_set']})", flush=True)
        if self.via_cache:
            cache = EmbeddingCache(self.args.cache_root)
            files = {name: cache.paths(entry.fingerprint) for name, entry in entries.items()}
            return {f"{name}_{part}": CachedArray(files[name][kind])
                    for name, part, kind in (("train", "x", "embeddings"), ("train", "y", "labels"),
                                             ("test", "x", "embeddings"), ("test", "y", "labels"),
                                             ("init", "x", "embeddings"))}
        return {"train_x": np.asarray(entries["train"].embeddings), "train_y": entries["train"].labels,
                "test_x": np.asarray(entries["test"].embeddings), "test_y": entries["test"].labels,
                "init_x": np.asarray(entries["init"].embeddings)}

    def check_checkpoints(self) -> None:
        """With ``--resume``, ValueError naming the file if a checkpoint of a cell to run was saved
        with other settings than the cell's (before any data is loaded; the cell checks the rest)."""
        if not self.args.resume:
            return
        for cell in self.todo:
            path = checkpoint_path(cell.out, cell.method, cell.seed)
            if path.exists():
                check_checkpoint_settings(path, cell)

    def clear_stale_checkpoints(self) -> None:
        """Without ``--resume``, the checkpoints an earlier run left for the cells to run are dropped
        (a cell continues only its own attempts' checkpoints: a retry after its worker died)."""
        if not self.args.resume:
            for cell in self.todo:
                checkpoint_path(cell.out, cell.method, cell.seed).unlink(missing_ok=True)

    def refresh_outputs(self) -> None:
        """The summaries and plots of the runs already in the results, and no checkpoint of a finished
        cell: a run stopped between a cell's results.csv and those left them one cell behind."""
        if not self.writer.rows:
            return
        self.writer.write_summaries()
        for cell in self.cells:
            if self.writer.done(*cell.key):
                checkpoint_path(cell.out, cell.method, cell.seed).unlink(missing_ok=True)
        if self.args.benchmark != "toy2d":
            self._plot_tables()

    def _plot_tables(self) -> None:
        """The accuracy curves and final matrices of every run in the results."""
        plot_accuracy_curves(self.writer, self.args.out / "accuracy_curves.png")
        plot_final_matrices(self.writer, self.args.out / "final_accuracy_matrices.png")

    def commit(self, cell: Cell, result: RunResult) -> None:
        """Store a finished cell (replacing any earlier result of it) and draw its plots."""
        out = self.args.out
        self.writer.add(*cell.key, result)
        checkpoint_path(out, cell.method, cell.seed).unlink(missing_ok=True)
        if cell.benchmark == "toy2d":
            toy2d.plot_decision_regions(cell.method, cell.seed, result.extra["regions"],
                                        toy2d.toy2d_benchmark(cell.seed),
                                        out / f"decision_regions_{cell.method}_seed{cell.seed}.png")
            return
        if "diagnostics" in result.extra:
            plot_key_diagnostics(result.extra["diagnostics"], f"{cell.method} (seed {cell.seed})",
                                 out / f"key_diagnostics_{cell.method}_seed{cell.seed}.png")
        self._plot_tables()


def run_jobs(jobs: list[Job], args: argparse.Namespace, stops: StopSignals | None = None) -> list[Failure]:
    """Run the unfinished cells of every job on ``args``' engine (started, and checked able to run a
    cell, first; then the outputs of the cells already done refreshed and, with ``--resume``, the
    checkpoints checked against the cells' settings), each distinct set of embeddings loaded once
    before the fan-out, and commit each finished cell to its job; the failed cells. A stop signal of
    ``stops`` that did not surface as KeyboardInterrupt stops it at the next step."""
    stop_requested = (lambda: False) if stops is None else (lambda: stops.requested)
    with engine.started(args) as run_cells:
        shared, cells = {}, []
        for job in jobs:
            job.refresh_outputs()
            job.check_checkpoints()
        for job in jobs:
            skipped = len(job.cells) - len(job.todo)
            if skipped:
                print(f"[{job.args.benchmark}] {skipped} of {len(job.cells)} cells already in {job.args.out}, "
                      f"skipped", flush=True)
            if job.todo and job.data_key not in shared:
                shared[job.data_key] = job.load_data()
                if stop_requested():
                    raise KeyboardInterrupt
            job.clear_stale_checkpoints()
            cells += [(cell, job.data_key) for cell in job.todo]
        by_out = {job.args.out: job for job in jobs}
        return run_cells(run_cell, cells, shared, lambda cell, result: by_out[cell.out].commit(cell, result),
                         stop_requested=stop_requested)


def engine_info(args: argparse.Namespace) -> dict:
    """The engine settings run.json records."""
    if args.engine == "local":
        return {"engine": "local", "device": args.device}
    return {"engine": "ray", "ray_address": args.ray_address or "local instance", "cpus_per_cell": args.cpus_per_cell,
            "gpus_per_cell": args.gpus_per_cell, "cell_threads": engine.cell_threads(args.cpus_per_cell),
            "embeddings_via": args.embeddings_via, "device": args.device}


def write_run_info(out: Path, args: argparse.Namespace, command: str, seconds: float, status: str,
                   error: str | None = None, failures: list[Failure] = ()) -> None:
    """``run.json``: the command, engine, wall-clock time and status ("running" until the run
    finishes; "finished", "interrupted", or "failed" with the ``error`` and the failed cells)."""
    atomic_write_text(out / "run.json", json.dumps(
        {"command": command, "status": status, "wall_clock_seconds": round(seconds, 1),
         "torch_threads": args.threads, **engine_info(args), "torch": torch.__version__,
         "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **({"error": error} if error else {}),
         **({"failed_cells": [{"cell": str(f.cell), "error": f.error} for f in failures]} if failures else {})},
        indent=2))


def failure_message(failures: list[Failure], total: int) -> str:
    return f"{len(failures)} of {total} cells failed: " + "; ".join(f"{f.cell} ({f.error})" for f in failures)


def open_results(args: argparse.Namespace) -> ResultsWriter:
    """The run's results in ``--out``; with ``--resume``, the finished runs there after checking their
    files and settings (ValueError naming the file otherwise). Reads only, so it runs before any write."""
    if args.resume and (args.out / "run.json").exists():
        read_run_info(args.out)
    if args.benchmark == "toy2d":
        return ResultsWriter(args.out, resume=args.resume)
    return real.open_results(args, real.resolve(args))


def setup_process(args: argparse.Namespace) -> None:
    """Torch threads, the progress logging and the warnings every command line of the benchmarks shows."""
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("avalanche_dkvb").setLevel(logging.INFO)  # key-initialisation progress
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU
    cli.hide_avalanche_deprecations()


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# Libraries whose C++ code calls back into Python and cannot carry a Python exception back out: a
# KeyboardInterrupt raised there becomes std::terminate (SIGABRT: no status written) or an ordinary
# error the library recovers from (OpenVINO's model conversion, through pybind11, does both).
NATIVE_CALLERS = ("openvino",)
RETRY_SECONDS = 0.05  # how often a stop that waits for such a call to return is tried again


def _called_back_from_native_code(frame) -> bool:
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(NATIVE_CALLERS):
            return True
        frame = frame.f_back
    return False


class StopSignals:
    """Within the block, Ctrl-C (SIGINT), ``kill`` (SIGTERM) and the end of the terminal or session
    (SIGHUP) stop the run: the first such signal raises KeyboardInterrupt in the main thread, once,
    and is remembered (``requested``) so that code which catches the KeyboardInterrupt or turns it
    into another error cannot make the run carry on (the engine stops after the cell it lands in, and
    the run ends "interrupted"). Where Python code runs called back from a native library
    (``NATIVE_CALLERS``), the KeyboardInterrupt waits until that call has returned. After
    ``finishing()`` (the final status being written) signals are only remembered. A signal ignored
    when the block starts (``nohup``) stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.finished = self.raised = False
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def finishing(self) -> None:
        self.finished = True

    def __enter__(self) -> "StopSignals":
        self.signum, self.finished, self.raised = None, False, False
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread handles signals; remembered stops still count here
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous = signal.signal(signum, self._handle)
                self._previous[signum] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc_info) -> None:
        self.finished = True
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if self.finished or self.raised:
            return
        if _called_back_from_native_code(frame):
            timer = threading.Timer(RETRY_SECONDS, self._retry, (signum,))
            timer.daemon = True
            timer.start()
            return
        self.raised = True
        raise KeyboardInterrupt

    def _retry(self, signum: int) -> None:
        if self._previous and not self.finished:
            _thread.interrupt_main(signum)  # runs _handle again in the main thread


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_process(args)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    lock = FolderLock(args.out, command)
    with StopSignals() as stops:
        try:
            lock.acquire()
            writer = open_results(args)  # a refused --resume has written nothing
        except (FolderBusy, ValueError, OSError) as error:
            lock.release()
            return cli.report(PROG, error, args.debug, cli.USAGE_ERROR)
        except KeyboardInterrupt:
            lock.release()
            print(f"Interrupted before the run started: nothing was written to {args.out}.", file=sys.stderr)
            return 130
        try:
            if lock.took_over:
                print(f"Took over the stale lock of {args.out} from pid {lock.took_over.get('pid')} (no longer "
                      f"running): {lock.took_over.get('command')}", file=sys.stderr)
            return _run(args, command, writer, stops)
        except Exception as error:
            return cli.report(PROG, error, args.debug, cli.RUN_ERROR)
        finally:
            stops.finishing()
            lock.release()


def _run(args: argparse.Namespace, command: str, writer: ResultsWriter, stops: StopSignals) -> int:
    """Run the job in the held ``--out``, keeping run.json's status true however it ends: from the
    "running" written first to the final status, a stop signal ends the run "interrupted" (even one
    that the code it landed in swallowed or turned into another error), and the final status is
    written atomically with further signals held off."""
    start = time.perf_counter()
    write_run_info(args.out, args, command, 0.0, "running")
    try:
        job = Job(args, writer)
        failures = run_jobs([job], args, stops)
        if stops.requested:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        return _interrupted(args, command, time.perf_counter() - start, stops)
    except Exception as error:
        if stops.requested:  # the KeyboardInterrupt, turned into another error where it landed
            return _interrupted(args, command, time.perf_counter() - start, stops)
        stops.finishing()
        write_run_info(args.out, args, command, time.perf_counter() - start, "failed",
                       error=f"{type(error).__name__}: {error}")
        raise
    stops.finishing()
    seconds = time.perf_counter() - start
    if failures:
        write_run_info(args.out, args, command, seconds, "failed", error=failure_message(failures, len(job.todo)),
                       failures=failures)
    else:
        write_run_info(args.out, args, command, seconds, "finished")
    print()
    if writer.rows:
        print(writer.results.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print()
        print((args.out / "summary.md").read_text())
        print(f"Wrote results.csv, accuracy_matrix.csv, summary.csv, summary.md, run.json and plots to {args.out} "
              f"in {seconds:.1f} s.")
    if failures:
        print(f"{PROG}: {failure_message(failures, len(job.todo))}. The finished cells are in {args.out}; "
              f"--resume runs the others again.", file=sys.stderr)
        return cli.RUN_ERROR
    return 0


def _interrupted(args: argparse.Namespace, command: str, seconds: float, stops: StopSignals) -> int:
    stops.finishing()
    write_run_info(args.out, args, command, seconds, "interrupted")
    print(f"Interrupted: the finished runs are in {args.out}; --resume continues from them.", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
