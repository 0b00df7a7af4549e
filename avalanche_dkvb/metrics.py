"""Avalanche metrics: DKVB's own diagnostics and class-incremental headline metrics.

Use them like Avalanche's metric factories:
``EvaluationPlugin(*dkvb_metrics(), *headline_metrics(), accuracy_metrics(...), loggers=[...])``.
Every value reaches every logger as a ``MetricValue``; the objects also keep what they measured
(``history``, ``rows``) so a program can read the numbers without parsing metric names.

Diagnostics (names ``DKVB/<name>/train_phase/train_stream``, one value after each training
experience, x = number of experiences trained), on the strategy's DKVB model (C codebooks x K keys):
- ``keys_used``: fraction of all keys selected so far, ``(usage_counts > 0).float().mean()``;
- ``keys_new``: fraction of all keys first selected in this experience;
- ``keys_overlap``: of the keys selected in this experience, the fraction already used before it;
- ``values_changed``: fraction of the C*K value rows that changed in this experience;
- ``value_norm``: mean L2 norm of the C*K value rows.

Headline metrics (after each evaluation of a stream; x = number of experiences trained):
- ``ClassBalancedAcc/eval_phase/<stream>``: mean of the per-class accuracies over every class in the stream;
- ``SeenClassesAcc/eval_phase/<stream>``: the same over the classes trained on so far;
- ``AccuracyMatrix/eval_phase/<stream>/ExpNNN``: accuracy on each evaluated experience; ``rows[i][j]``
  is the accuracy on experience j at the i-th evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
from avalanche.evaluation import PluginMetric
from avalanche.evaluation.metric_results import MetricValue

from avalanche_dkvb.model import DKVBModel


class BottleneckDiagnostic(PluginMetric[float]):
    """One DKVB diagnostic, computed after each training experience from the bottleneck's state
    before and after it; ``history`` holds every value so far."""

    name = ""

    def __init__(self):
        super().__init__()
        self.history: list[float] = []
        self._usage_before: torch.Tensor | None = None

    def result(self) -> float | None:
        return self.history[-1] if self.history else None

    def reset(self) -> None:
        self.history = []

    def before_training_exp(self, strategy):
        self._usage_before = self._model(strategy).bottleneck.usage_counts.clone()  # (C, K)

    def after_training_exp(self, strategy):
        value = float(self.compute(self._model(strategy), self._usage_before))
        self.history.append(value)
        return [MetricValue(self, f"DKVB/{self.name}/train_phase/train_stream", value,
                            strategy.clock.train_exp_counter)]

    @staticmethod
    def _model(strategy) -> DKVBModel:
        if not isinstance(strategy.model, DKVBModel):
            raise TypeError(f"DKVB metrics need a DKVBModel, got {type(strategy.model).__name__}.")
        return strategy.model

    def compute(self, model: DKVBModel, usage_before: torch.Tensor) -> float:
        raise NotImplementedError

    def __str__(self) -> str:
        return f"DKVB/{self.name}"


class KeysUsed(BottleneckDiagnostic):
    name = "keys_used"

    def compute(self, model, usage_before):
        return (model.bottleneck.usage_counts > 0).float().mean()


class KeysNew(BottleneckDiagnostic):
    name = "keys_new"

    def compute(self, model, usage_before):
        return ((model.bottleneck.usage_counts > 0) & (usage_before == 0)).float().mean()


class KeysOverlap(BottleneckDiagnostic):
    name = "keys_overlap"

    def compute(self, model, usage_before):
        selected = model.bottleneck.usage_counts > usage_before
        return (selected & (usage_before > 0)).sum() / selected.sum().clamp_min(1)


class ValuesChanged(BottleneckDiagnostic):
    name = "values_changed"

    def before_training_exp(self, strategy):
        super().before_training_exp(strategy)
        self._values_before = self._model(strategy).bottleneck.values.detach().clone()  # (C, K, V)

    def compute(self, model, usage_before):
        return (model.bottleneck.values.detach() != self._values_before).any(-1).float().mean()


class ValueNorm(BottleneckDiagnostic):
    name = "value_norm"

    def compute(self, model, usage_before):
        return model.bottleneck.values.detach().norm(dim=-1).mean()


DIAGNOSTICS = {cls.name: cls for cls in (KeysUsed, KeysNew, KeysOverlap, ValuesChanged, ValueNorm)}


def dkvb_metrics(*names: str) -> list[BottleneckDiagnostic]:
    """The named DKVB diagnostics (all of them by default), for an ``EvaluationPlugin``."""
    unknown = sorted(set(names) - set(DIAGNOSTICS))
    if unknown:
        raise ValueError(f"Unknown DKVB metric(s) {unknown}; expected some of {sorted(DIAGNOSTICS)}.")
    return [DIAGNOSTICS[name]() for name in (names or DIAGNOSTICS)]


class StreamAccuracies(PluginMetric[dict]):
    """Per-class and per-experience hit counts over one evaluation of a stream; subclasses turn them
    into their headline value after the evaluation."""

    def __init__(self):
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self._class_hits: dict[int, list[int]] = {}  # class -> [correct, total]
        self._exp_hits: dict[int, list[int]] = {}  # experience -> [correct, total]

    def before_eval(self, strategy):
        self.reset()

    def after_eval_iteration(self, strategy):
        correct = (strategy.mb_output.argmax(1) == strategy.mb_y).long()
        labels = strategy.mb_y
        totals = self._exp_hits.setdefault(strategy.experience.current_experience, [0, 0])
        totals[0] += int(correct.sum())
        totals[1] += len(labels)
        classes, inverse = torch.unique(labels, return_inverse=True)
        class_correct = torch.zeros(len(classes), dtype=torch.long).index_add_(0, inverse, correct)
        class_total = torch.bincount(inverse, minlength=len(classes))
        for c, k, n in zip(classes.tolist(), class_correct.tolist(), class_total.tolist()):
            entry = self._class_hits.setdefault(c, [0, 0])
            entry[0] += k
            entry[1] += n

    def per_class(self) -> dict[int, float]:
        return {c: k / n for c, (k, n) in sorted(self._class_hits.items())}

    def per_experience(self) -> dict[int, float]:
        return {e: k / n for e, (k, n) in sorted(self._exp_hits.items())}

    def result(self) -> dict:
        return self.per_class()

    @staticmethod
    def _stream(strategy) -> str:
        return strategy.experience.origin_stream.name


class MeanClassAccuracy(StreamAccuracies):
    """Mean of the per-class accuracies over :meth:`classes` of the evaluated stream, published as
    ``<name>/eval_phase/<stream>`` after each evaluation; ``history`` holds every value."""

    name = ""

    def __init__(self):
        super().__init__()
        self.history: list[float] = []

    def classes(self, per_class: dict[int, float]) -> list[int]:
        raise NotImplementedError

    def after_eval(self, strategy):
        per_class = self.per_class()
        accuracies = [per_class[c] for c in self.classes(per_class)]
        value = float(np.mean(accuracies)) if accuracies else float("nan")
        self.history.append(value)
        return [MetricValue(self, f"{self.name}/eval_phase/{self._stream(strategy)}", value,
                            strategy.clock.train_exp_counter)]

    def __str__(self) -> str:
        return self.name


class ClassBalancedAccuracy(MeanClassAccuracy):
    """Mean per-class accuracy over every class of the evaluated stream."""

    name = "ClassBalancedAcc"

    def classes(self, per_class):
        return list(per_class)


class SeenClassesAccuracy(MeanClassAccuracy):
    """Mean per-class accuracy over the classes trained on so far (``seen_classes``, collected from
    the training experiences' labels)."""

    name = "SeenClassesAcc"

    def __init__(self):
        super().__init__()
        self.seen_classes: set[int] = set()

    def after_training_exp(self, strategy):
        self.seen_classes.update(int(c) for c in strategy.experience.classes_in_this_experience)

    def classes(self, per_class):
        return [c for c in sorted(self.seen_classes) if c in per_class]


class AccuracyMatrix(StreamAccuracies):
    """One row per evaluation: the accuracy on each evaluated experience (``rows[i][j]``). With an
    evaluation of the whole test stream after each training experience, ``rows[i][j]`` is the accuracy
    on experience j after training on experience i, and :meth:`forgetting` / :meth:`bwt` are the usual
    averages (the same numbers as Avalanche's stream forgetting and BWT)."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[float]] = []

    def after_eval(self, strategy):
        per_exp = self.per_experience()
        self.rows.append([per_exp[e] for e in sorted(per_exp)])
        stream = self._stream(strategy)
        return [MetricValue(self, f"AccuracyMatrix/eval_phase/{stream}/Exp{e:03d}", v,
                            strategy.clock.train_exp_counter) for e, v in sorted(per_exp.items())]

    def forgetting(self) -> float:
        """Mean over experiences j < T-1 of (accuracy on j right after training on it - accuracy on j now)."""
        a = np.asarray(self.rows)
        last = len(a) - 1
        return float(np.mean([a[j, j] - a[last, j] for j in range(last)])) if last > 0 else float("nan")

    def bwt(self) -> float:
        return -self.forgetting()

    def __str__(self) -> str:
        return "AccuracyMatrix"


def headline_metrics() -> list[StreamAccuracies]:
    """Class-balanced accuracy, accuracy on the classes seen so far, and the accuracy matrix."""
    return [ClassBalancedAccuracy(), SeenClassesAccuracy(), AccuracyMatrix()]
