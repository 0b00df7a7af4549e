"""Runs one strategy over one class-incremental benchmark and turns Avalanche's metrics into results.

After every training experience the strategy is evaluated on the whole test stream through an
Avalanche ``EvaluationPlugin``; from its metrics come the accuracy matrix (after experience i, on
test experience j), the class-balanced accuracy (mean of per-class accuracies), forgetting and BWT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from avalanche.evaluation.metrics import (accuracy_metrics, bwt_metrics, class_accuracy_metrics,
                                          forgetting_metrics)
from avalanche.training.plugins import EvaluationPlugin

STREAM = "eval_phase/test_stream"


def make_evaluator(loggers: list) -> EvaluationPlugin:
    """Accuracy per experience and stream, per-class accuracy, forgetting and BWT."""
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        class_accuracy_metrics(stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
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


def _by_last_component(metrics: dict, prefix: str) -> dict[str, float]:
    """Metrics named ``prefix/[TaskNNN/]LAST`` keyed by LAST (task-aware streams add TaskNNN)."""
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith(prefix + "/")}


def run_stream(strategy, benchmark, *, progress: Callable[[str], None] = print,
               after_experience: Callable[[int], None] | None = None) -> RunResult:
    """Train ``strategy`` on each experience of ``benchmark.train_stream`` in order, evaluating on
    the whole test stream after each; ``after_experience(i)`` runs after that evaluation."""
    test_stream = benchmark.test_stream
    num_exps = len(benchmark.train_stream)
    exp_classes = [sorted(exp.classes_in_this_experience) for exp in test_stream]
    matrix = np.zeros((num_exps, len(test_stream)))
    class_balanced, seen_class_balanced = np.zeros(num_exps), np.zeros(num_exps)
    train_seconds = 0.0
    for i, experience in enumerate(benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(experience)
        train_seconds += time.perf_counter() - start
        metrics = strategy.eval(test_stream)
        per_exp = _by_last_component(metrics, f"Top1_Acc_Exp/{STREAM}")
        matrix[i] = [per_exp[f"Exp{j:03d}"] for j in range(len(test_stream))]
        per_class = {int(c): v for c, v in _by_last_component(metrics, f"Top1_ClassAcc_Stream/{STREAM}").items()}
        class_balanced[i] = np.mean(list(per_class.values()))
        seen = [c for classes in exp_classes[:i + 1] for c in classes]
        seen_class_balanced[i] = np.mean([per_class[c] for c in seen])
        progress(f"experience {i + 1}/{num_exps}: class-balanced accuracy {class_balanced[i]:.3f} "
                 f"(seen classes {seen_class_balanced[i]:.3f}), training {train_seconds:.1f} s")
        if after_experience is not None:
            after_experience(i)
    return RunResult(matrix, class_balanced, seen_class_balanced,
                     forgetting=float(metrics.get(f"StreamForgetting/{STREAM}", np.nan)),
                     bwt=float(metrics.get(f"StreamBWT/{STREAM}", np.nan)),
                     train_seconds=train_seconds)
