"""Input checks shared by the modules: each error says what was wrong and what was expected."""

from __future__ import annotations

import numbers

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
