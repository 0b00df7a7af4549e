"""Where a job's cells run: ``--engine local`` (one after another in this process, the default; Ray is
never imported) or ``--engine ray`` (each cell one Ray task on a local Ray instance or a cluster).

A cell is one (benchmark, method, seed, settings) run (:class:`benchmarks.runner.Cell`). The driver
loads the data the cells share (the embeddings) once, before the fan-out: with Ray it is put in the
object store once and every task reads it from there (on one node the tasks share it in memory;
across nodes Ray copies it once to each node), or with ``--embeddings-via cache`` every task reads
the embedding cache files the driver filled (``--cache-root`` on a filesystem shared by every node).
No cell ever computes embeddings. Each finished cell is handed to ``commit`` in the driver as soon
as it arrives; a cell that raises is recorded as a :class:`Failure` and the others go on; a worker
that dies (killed, out of memory, a lost node) is retried by Ray up to ``RETRIES`` times, and its
one result is committed once. One progress line per finished or failed cell: finished / running /
failed, elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from avalanche_dkvb.validation import check_non_negative_float, check_positive_float

ENGINES = ("local", "ray")
RETRIES = 3  # Ray re-runs a cell whose worker died this many times before reporting it failed
RAY_FLAGS = ("ray_address", "cpus_per_cell", "gpus_per_cell", "embeddings_via")
INSTALL_RAY = "pip install 'avalanche-dkvb[ray]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine (where the cells run)")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: one cell after another in this process (default); ray: each cell one Ray task")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to use: 'auto' (the one started on this node with `ray start`) or an "
                        "address such as 10.0.0.1:6379 (default: start a local Ray instance)")
    g.add_argument("--cpus-per-cell", type=float, default=None,
                   help="CPUs each Ray task declares, fractions allowed (default 1); its torch threads: "
                        "the whole CPUs of it, at least 1")
    g.add_argument("--gpus-per-cell", type=float, default=None,
                   help="GPUs each Ray task declares, fractions allowed (default 0; > 0 needs --device cuda or auto)")
    g.add_argument("--embeddings-via", choices=("object-store", "cache"), default=None,
                   help="how Ray tasks get the embeddings: 'object-store' (default; put once by the driver) or "
                        "'cache' (read from --cache-root, which must be on a filesystem shared by every node)")


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the flag if the engine settings are unusable (Ray flags without ``--engine
    ray``, non-positive CPUs, negative GPUs, Ray not installed); fills in the defaults. Cheap: Ray is
    looked up, not imported."""
    if args.engine != "ray":
        given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --engine ray only, "
                             f"not to --engine {args.engine}.")
        return
    import importlib.util
    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"--engine ray needs Ray, which is not installed here: {INSTALL_RAY}.")
    args.cpus_per_cell = 1.0 if args.cpus_per_cell is None else args.cpus_per_cell
    args.gpus_per_cell = 0.0 if args.gpus_per_cell is None else args.gpus_per_cell
    args.embeddings_via = args.embeddings_via or "object-store"
    check_positive_float("--cpus-per-cell", args.cpus_per_cell)
    check_non_negative_float("--gpus-per-cell", args.gpus_per_cell)


def cell_threads(cpus_per_cell: float) -> int:
    """Torch threads of a Ray task that declares ``cpus_per_cell`` CPUs: its whole CPUs, at least 1."""
    return max(1, math.floor(cpus_per_cell))


@dataclass(frozen=True)
class Failure:
    """A cell that did not finish, and why (the exception's type and message)."""

    cell: Any
    error: str


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """The one progress display: a line per finished or failed cell with the counts, the elapsed time
    and an estimate of the time left (the remaining cells at the pace so far)."""

    def __init__(self, total: int, stream=None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.stream, self.clock = total, stream, clock
        self.start = clock()
        self.finished = self.failed = 0

    def line(self, running: int) -> str:
        elapsed = self.clock() - self.start
        done = self.finished + self.failed
        left = "" if not done or done == self.total else \
            f", about {_elapsed(elapsed / done * (self.total - done))} left"
        return (f"[cells: {self.finished}/{self.total} finished, {running} running, {self.failed} failed; "
                f"{_elapsed(elapsed)} elapsed{left}]")

    def report(self, running: int, event: str = "") -> None:
        print(f"{self.line(running)}{' ' + event if event else ''}", file=self.stream or sys.stdout, flush=True)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


@contextlib.contextmanager
def started(args: argparse.Namespace) -> Iterator[Callable[..., list[Failure]]]:
    """The engine of ``args``, ready to run cells, before the caller loads any data: with Ray, the
    instance started (or the cluster at ``--ray-address`` joined) and checked able to run one cell
    (ValueError otherwise), shut down after the block if started here. Yields
    ``run_cells(work, cells, shared, commit, stop_requested=lambda: False)``, which runs
    ``work(cell, shared[data_key])`` for each ``(cell, data_key)`` of ``cells``, calls
    ``commit(cell, result)`` in this process for each cell that finishes (in the order they finish)
    and returns the failures. ``work`` must be importable by name (or picklable) for Ray. Once
    ``stop_requested()`` (a stop signal arrived), the job stops with KeyboardInterrupt after the cell
    that finishes or fails next, and that failure is not recorded: it is the KeyboardInterrupt of the
    signal, swallowed or turned into another error by the code it landed in."""
    if args.engine == "local":
        yield _run_local
        return
    import ray  # only here: the local engine never imports Ray

    started_here = not ray.is_initialized()
    if started_here:
        with _signal_handlers_kept():
            ray.init(address=args.ray_address, log_to_driver=False, include_dashboard=False,
                     logging_level="WARNING", configure_logging=True)
    try:
        slots = _slots(ray.cluster_resources(), args)
        yield functools.partial(_run_ray, args=args, slots=slots)
    finally:
        if started_here:
            ray.shutdown()


def _slots(resources: dict, args: argparse.Namespace) -> int:
    """How many cells the Ray cluster with ``resources`` runs at once (ValueError if none)."""
    slots = math.floor(resources.get("CPU", 0) / args.cpus_per_cell + 1e-9)
    if args.gpus_per_cell > 0:
        slots = min(slots, math.floor(resources.get("GPU", 0) / args.gpus_per_cell + 1e-9))
    if slots < 1:
        raise ValueError(f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
                         f"GPUs, less than one cell's --cpus-per-cell {args.cpus_per_cell:g} --gpus-per-cell "
                         f"{args.gpus_per_cell:g}; no cell could ever start.")
    return slots


def _run_local(work, cells, shared, commit, stop_requested=lambda: False) -> list[Failure]:
    progress, failures = Progress(len(cells)), []
    for index, (cell, data_key) in enumerate(cells):
        running = int(index + 1 < len(cells))  # the next cell, started right after this line
        try:
            result = work(cell, shared[data_key])
        except Exception as error:  # the cell's own failure; KeyboardInterrupt stops the job
            if stop_requested():
                raise KeyboardInterrupt from error
            failures.append(Failure(cell, _error_text(error)))
            progress.failed += 1
            progress.report(running, f"{cell} failed: {failures[-1].error}")
            continue
        commit(cell, result)
        progress.finished += 1
        progress.report(running, f"{cell} finished")
        if stop_requested():
            raise KeyboardInterrupt
    return failures


def _ray_task(work, cell, data, threads: int):
    """A Ray task: one cell with ``threads`` torch threads (the whole CPUs it declared)."""
    torch.set_num_threads(threads)
    return work(cell, data)


@contextlib.contextmanager
def _signal_handlers_kept():
    """Put the process's SIGINT/SIGTERM handlers back after the block: ``ray.init`` replaces SIGTERM's
    with its own (which exits the driver at once, and a C++ one that logs the signal), so a ``kill``
    would end the run without its final status being written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # None: installed outside Python, cannot be put back from here
                signal.signal(signum, handler)


def _run_ray(work, cells, shared, commit, stop_requested=lambda: False, *, args: argparse.Namespace,
             slots: int) -> list[Failure]:
    import ray

    progress = Progress(len(cells))
    task = ray.remote(_ray_task).options(num_cpus=args.cpus_per_cell, num_gpus=args.gpus_per_cell,
                                         max_retries=RETRIES, retry_exceptions=False)
    refs = {key: ray.put(value) for key, value in shared.items()}  # once, before the fan-out
    threads = cell_threads(args.cpus_per_cell)
    pending = {task.remote(work, cell, refs[data_key], threads): cell for cell, data_key in cells}
    failures = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:  # the cell raised: its own exception
                cause = getattr(error, "cause", None)
                failures.append(Failure(cell, _error_text(cause) if isinstance(cause, BaseException)
                                        else _error_text(error)))
            except ray.exceptions.RayError as error:  # its worker died RETRIES + 1 times, or was cancelled
                failures.append(Failure(cell, _error_text(error)))
            else:
                commit(cell, result)
                progress.finished += 1
                progress.report(min(len(pending), slots), f"{cell} finished")
                if stop_requested():
                    raise KeyboardInterrupt
                continue
            if stop_requested():  # not the cell's failure: the stop signal, where it landed
                raise KeyboardInterrupt
            progress.failed += 1
            progress.report(min(len(pending), slots), f"{cell} failed: {failures[-1].error}")
    except BaseException:  # Ctrl-C, SIGTERM or a failed commit: stop the cells still queued or running
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return failures
