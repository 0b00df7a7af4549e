"""Runs one strategy over one class-incremental benchmark and collects its results; :func:`run_cell`
runs one cell of a job (one benchmark, method, seed and settings) wherever an engine puts it.

After every training experience the strategy is evaluated on the whole test stream through an
Avalanche ``EvaluationPlugin``. The headline numbers are ``avalanche_dkvb.metrics`` plugin metrics, so
they reach every logger, and the runner reads them from those metric objects: the accuracy matrix
(after experience i, on test experience j), the class-balanced accuracy (mean of per-class
accuracies), the same over the classes seen so far, forgetting and BWT (from the matrix).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics, loss_metrics
from avalanche.logging import CSVLogger, TensorboardLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from avalanche_dkvb.checkpoint import (CheckpointError, checkpoint_refusal, describe_differences, load_training_state,
                                      read_extra, save_training_state)
from avalanche_dkvb.data import make_class_incremental_benchmark
from avalanche_dkvb.metrics import (AccuracyMatrix, BottleneckDiagnostic, ClassBalancedAccuracy,
                                    SeenClassesAccuracy, dkvb_metrics, headline_metrics)
from benchmarks import toy2d
from benchmarks.methods import METHODS, MethodSettings


def make_evaluator(loggers: list, diagnostics: bool = False) -> EvaluationPlugin:
    """Training accuracy and loss per epoch (without them Avalanche's CSVLogger writes 0 in every row of
    ``training_results.csv``), accuracy per experience and stream, the headline metrics (class-balanced
    accuracy, accuracy on the classes seen so far, the accuracy matrix), forgetting and BWT; with
    ``diagnostics``, DKVB's key and value diagnostics."""
    return EvaluationPlugin(
        accuracy_metrics(epoch=True, experience=True, stream=True),
        loss_metrics(epoch=True),
        *headline_metrics(),
        forgetting_metrics(stream=True),
        bwt_metrics(stream=True),
        *(dkvb_metrics() if diagnostics else []),
        loggers=loggers,
    )


@dataclass
class RunResult:
    """What one (benchmark, method, seed) run measured; ``accuracy_matrix[i, j]`` is the accuracy
    on test experience j after training on experience i, ``class_balanced[i]`` the mean per-class
    accuracy over all test classes after experience i."""

    accuracy_matrix: np.ndarray
    class_balanced: np.ndarray
    seen_class_balanced: np.ndarray
    forgetting: float
    bwt: float
    train_seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "final_accuracy": float(self.class_balanced[-1]),
            "avg_incremental_accuracy": float(self.seen_class_balanced.mean()),
            "forgetting": self.forgetting,
            "bwt": self.bwt,
            "train_seconds": self.train_seconds,
        }


def _metric(strategy, kind):
    """The evaluator's metric object of type ``kind``."""
    return next(m for m in strategy.evaluator.metrics if isinstance(m, kind))


def checkpoint_path(out: Path, method: str, seed: int) -> Path:
    """Where a (method, seed) run in ``out`` keeps its training state between experiences."""
    return Path(out) / "checkpoints" / f"{method}_seed{seed}.pt"


def run_stream(strategy, benchmark, *, progress: Callable[[str], None] = print,
               after_experience: Callable[[int], None] | None = None, checkpoint: Path | None = None,
               resume: bool = False, settings: dict | None = None, carry: dict | None = None) -> RunResult:
    """Train ``strategy`` on each experience of ``benchmark.train_stream`` in order, evaluating on
    the whole test stream after each; ``after_experience(i)`` runs after that evaluation.

    With ``checkpoint``, the training state (:mod:`avalanche_dkvb.checkpoint`), ``settings`` and
    ``carry`` (plain data the caller keeps across experiences, updated in ``after_experience``) are
    saved there after each experience; with ``resume`` and that file present, the run continues
    after its last finished experience (``carry`` restored), refusing one saved with other
    ``settings``. Without ``resume`` a file left there is deleted first. A strategy that cannot be
    saved runs without checkpoints (a progress line says why). The caller deletes the file once the
    result is stored."""
    test_stream = benchmark.test_stream
    num_exps = len(benchmark.train_stream)
    matrix = _metric(strategy, AccuracyMatrix)
    class_balanced, seen = _metric(strategy, ClassBalancedAccuracy), _metric(strategy, SeenClassesAccuracy)
    train_seconds, start_exp = 0.0, 0
    settings = dict(settings or {}, experiences=num_exps)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        refusal = checkpoint_refusal(strategy)
        if refusal is not None:
            progress(f"no checkpoints: {refusal}")
            checkpoint = None
        elif resume and checkpoint.exists():
            extra = load_training_state(checkpoint, strategy)
            saved = extra.get("settings") or {}
            if saved != settings:
                raise CheckpointError(f"{checkpoint}: saved with other settings "
                                      f"({describe_differences(saved, settings)}); delete it to start this run afresh.")
            start_exp, train_seconds = int(extra["next_experience"]), float(extra["train_seconds"])
            if carry is not None:
                carry.clear()
                carry.update(extra["carry"])
            progress(f"resumed from {checkpoint} after experience {start_exp}/{num_exps}")
        else:
            checkpoint.unlink(missing_ok=True)
    for i, experience in enumerate(benchmark.train_stream):
        if i < start_exp:
            continue
        start = time.perf_counter()
        strategy.train(experience)
        train_seconds += time.perf_counter() - start
        strategy.eval(test_stream)
        progress(f"experience {i + 1}/{num_exps}: class-balanced accuracy {class_balanced.history[-1]:.3f} "
                 f"(seen classes {seen.history[-1]:.3f}), training {train_seconds:.1f} s")
        if after_experience is not None:
            after_experience(i)
        if checkpoint is not None and i + 1 < num_exps:
            save_training_state(checkpoint, strategy, {"settings": settings, "next_experience": i + 1,
                                                       "train_seconds": train_seconds, "carry": dict(carry or {})})
    diagnostics = {m.name: m.history for m in strategy.evaluator.metrics if isinstance(m, BottleneckDiagnostic)}
    return RunResult(np.array(matrix.rows), np.array(class_balanced.history), np.array(seen.history),
                     forgetting=matrix.forgetting(), bwt=matrix.bwt(), train_seconds=train_seconds,
                     extra={"diagnostics": diagnostics} if diagnostics else {})


@dataclass(frozen=True)
class Cell:
    """One (benchmark, method, seed) run of a job, as the worker that runs it needs it: the job's
    output folder ``out`` (logs and checkpoint go there), the resolved ``settings`` of a real-image
    run (:func:`benchmarks.real.resolve` without the seeds; empty for toy2d) and the ``device``."""

    benchmark: str
    method: str
    seed: int
    out: Path
    settings: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def key(self) -> tuple[str, str, int]:
        return self.benchmark, self.method, self.seed

    @property
    def run_settings(self) -> dict:
        """What a checkpoint of the cell must have been saved with (:func:`run_stream` adds the
        number of experiences)."""
        return {"benchmark": self.benchmark, "method": self.method, "seed": self.seed, **self.settings}

    def __str__(self) -> str:
        return f"{self.benchmark} {self.method} seed {self.seed}"


@dataclass(frozen=True)
class CachedArray:
    """An embeddings or labels ``.npy`` file of the embedding cache, read by the worker itself
    (``--embeddings-via cache``)."""

    path: Path

    def load(self) -> np.ndarray:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} is not on this node; --embeddings-via cache needs --cache-root "
                                    f"on a filesystem shared by the driver and every worker node.")
        return np.load(self.path, mmap_mode="r")


def _tensor(array) -> torch.Tensor:
    """A writable tensor copy of an array, a read-only object-store array or a :class:`CachedArray`."""
    return torch.from_numpy(np.array(array.load() if isinstance(array, CachedArray) else array))


def check_checkpoint_settings(path: Path, cell: Cell) -> None:
    """CheckpointError (a ValueError) naming ``path`` if the checkpoint there was saved with settings
    other than ``cell``'s, or cannot be read; cheap (the file is memory-mapped), so a driver can check
    every cell's checkpoint before it loads data or runs any cell."""
    saved, expected = read_extra(path).get("settings") or {}, cell.run_settings
    saved = {k: saved.get(k) for k in expected}  # the number of experiences, also saved, is checked by run_stream
    if saved != expected:
        raise CheckpointError(f"{path}: saved with other settings ({describe_differences(saved, expected)}); delete "
                              f"it to start {cell} afresh, or resume with the settings it was saved with.")


CSV_LOGS = ("training_results", "eval_results")  # the files Avalanche's CSVLogger writes


def keep_csv_logs_of_earlier_attempts(run_dir: Path) -> None:
    """Avalanche's CSVLogger starts its files afresh. Before a cell continues from its checkpoint, the
    earlier attempt's files are renamed to ``<name>.attempt<N>.csv`` (N = 1, 2, ...), so the rows of the
    experiences it finished stay (the text log is appended to instead)."""
    for name in CSV_LOGS:
        current = run_dir / f"{name}.csv"
        if current.exists():
            attempt = 1
            while (run_dir / f"{name}.attempt{attempt}.csv").exists():  # never over an earlier one
                attempt += 1
            current.rename(run_dir / f"{name}.attempt{attempt}.csv")


def run_cell(cell: Cell, data: dict | None) -> RunResult:
    """Run ``cell`` in this process and return its result; toy2d's decision regions after each
    experience are in ``result.extra["regions"]``. A checkpoint of the cell in ``cell.out`` (left by
    an interrupted or killed attempt) is continued; the caller removes stale ones. ``data``: for a
    real-image cell, the embeddings as ``train_x, train_y, test_x, test_y, init_x`` arrays (N, D) and
    (N,) (or :class:`CachedArray` files); None for toy2d."""
    run_dir = cell.out / "logs" / f"{cell.method}_seed{cell.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_path(cell.out, cell.method, cell.seed)
    if checkpoint.exists():
        keep_csv_logs_of_earlier_attempts(run_dir)
    with open(run_dir / "log.txt", "a" if checkpoint.exists() else "w") as log_file:
        loggers = [TextLogger(log_file), CSVLogger(str(run_dir))]
        carry, after_experience = None, None
        if cell.benchmark == "toy2d":
            benchmark = toy2d.toy2d_benchmark(cell.seed)
            torch.manual_seed(cell.seed)
            strategy = toy2d.METHODS[cell.method](make_evaluator(loggers), cell.seed)
            carry = {"regions": []}  # decision regions after each experience, kept in the checkpoint

            def after_experience(i: int) -> None:
                carry["regions"].append(torch.from_numpy(toy2d.predict_grid(strategy.model)))
        else:
            loggers.append(TensorboardLogger(run_dir / "tb"))
            train_x, train_y, test_x, test_y, init_x = (_tensor(data[name]) for name in
                                                        ("train_x", "train_y", "test_x", "test_y", "init_x"))
            benchmark = make_class_incremental_benchmark(train_x, train_y, test_x, test_y,
                                                         cell.settings["experiences"], seed=cell.seed)
            torch.manual_seed(cell.seed)
            options = {f.name: cell.settings[f.name] for f in dataclasses.fields(MethodSettings)
                       if cell.settings.get(f.name) is not None}  # epochs, memory, strengths, ...
            method_settings = MethodSettings(input_dim=train_x.shape[1], num_classes=int(train_y.max()) + 1,
                                             key_init_data=init_x, device=cell.device, **options)
            evaluator = make_evaluator(loggers, diagnostics=cell.method.startswith("dkvb"))
            strategy = METHODS[cell.method](method_settings, evaluator)
        print(f"[{cell.benchmark}] {cell.method}, seed {cell.seed}", flush=True)
        result = run_stream(strategy, benchmark, progress=lambda line: print(f"  {line}", flush=True),
                            after_experience=after_experience, checkpoint=checkpoint, resume=True,
                            settings=cell.run_settings, carry=carry)
        loggers[1].close()  # the CSV files
        if len(loggers) > 2:
            loggers[2].writer.close()  # the TensorBoard events
    if carry is not None:
        result.extra["regions"] = [region.numpy() for region in carry["regions"]]
    return result
