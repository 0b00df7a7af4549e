"""Input checks shared by the modules: each error says what was wrong and what was expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def check_positive_int(name: str, value) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError if ``tensor`` holds NaN or infinite entries, saying how many."""
    if tensor.is_floating_point():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise ValueError(
                f"{name} contain {int(bad.sum())} NaN or infinite value(s) out of {tensor.numel()}; "
                "expected finite numbers."
            )


def check_non_negative_int(name: str, value) -> None:
    """Raise TypeError unless ``value`` is an int (bools are refused), ValueError if it is < 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r} of type {type(value).__name__}.")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def _check_real(name: str, value, expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}.")


def check_positive_float(name: str, value) -> None:
    """Raise TypeError unless ``value`` is a real number, ValueError unless it is finite and > 0
    (e.g. a learning rate)."""
    _check_real(name, value, "a finite number > 0")
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def check_non_negative_float(name: str, value) -> None:
    """Raise TypeError unless ``value`` is a real number, ValueError unless it is finite and >= 0
    (e.g. a regularisation strength)."""
    _check_real(name, value, "a finite number >= 0")
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def check_seeds(name: str, seeds) -> list[int]:
    """Return ``seeds`` as a list after checking it is a non-empty sequence of non-negative ints
    without repeats; TypeError for a non-sequence or a non-int entry, ValueError otherwise."""
    expected = f"{name} must be a non-empty list of non-negative integers"
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"{expected}, got {seeds!r}.")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seeds):
        raise TypeError(f"{expected}, got {list(seeds)!r}.")
    if not seeds or min(seeds) < 0:
        raise ValueError(f"{expected}, got {list(seeds)!r}.")
    repeated = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if repeated:
        raise ValueError(f"{name} must not repeat a seed, got {list(seeds)!r} (repeated: {repeated}).")
    return list(seeds)


def check_divides(name: str, value, total: int, total_name: str) -> None:
    """Raise ValueError unless the positive int ``value`` divides ``total`` (e.g. experiences into
    classes), listing the values that would."""
    check_positive_int(name, value)
    if total % value:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise ValueError(f"{name} must divide {total_name} ({total}): one of {divisors}, got {value!r}.")


def check_labels(labels: torch.Tensor, num_classes: int, where: str, bound_name: str = "value_dim") -> None:
    """Raise TypeError unless ``labels`` (N,) are int64 (what nn.CrossEntropyLoss takes), ValueError
    unless every label is in [0, num_classes); ``where`` (e.g. "experience 2") and ``bound_name`` (the
    setting that fixes ``num_classes``) go into the message."""
    if labels.dtype != torch.long:
        raise TypeError(f"Labels in {where} must be int64 (torch.long) class indices in [0, {bound_name}={num_classes}), "
                        f"got dtype {labels.dtype}.")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"Labels in {where} must be in [0, {bound_name}={num_classes}); got label "
                         f"{int(labels[bad][0])} ({int(bad.sum())} of {labels.numel()} labels out of range).")
