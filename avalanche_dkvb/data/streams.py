"""Class-incremental Avalanche benchmarks over precomputed embeddings.

``make_class_incremental_benchmark`` splits the classes into ``n_experiences`` equal
groups along a class order and builds the benchmark with Avalanche's classic
``nc_benchmark`` (no task labels, original class ids kept). Experience ``e`` of
``benchmark.train_stream`` / ``benchmark.test_stream`` holds all train / test
samples of classes ``class_order[e * k:(e + 1) * k]``, ``k = n_classes // n_experiences``;
the order used is ``benchmark.classes_order``.
"""

from __future__ import annotations

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.scenarios.deprecated.new_classes.nc_scenario import NCScenario
from torch.utils.data import TensorDataset

__all__ = ["DEFAULT_EXPERIENCES", "class_order_for_seed", "make_class_incremental_benchmark"]

DEFAULT_EXPERIENCES = {"cifar10": 5, "cifar10_jpeg": 5, "cifar100": 10, "tiny_imagenet": 10}
"""Default number of experiences per image set (CIFAR-100 in 50 x 2 classes is also possible)."""

ArrayLike = np.ndarray | torch.Tensor


def class_order_for_seed(n_classes: int, seed: int) -> list[int]:
    """0..n_classes-1 for ``seed == 0``, otherwise a permutation determined by ``seed`` alone."""
    if seed == 0:
        return list(range(n_classes))
    return np.random.default_rng(seed).permutation(n_classes).tolist()


def make_class_incremental_benchmark(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    n_experiences: int,
    seed: int,
    class_order: list[int] | None = None,
) -> NCScenario:
    """Class-incremental benchmark over (N, ...) inputs and (N,) integer labels 0..C-1.

    Args:
        train_x, train_y: (N_train, ...) inputs, e.g. (N, D) embeddings, and labels.
        test_x, test_y: (N_test, ...) inputs and labels; same classes as train.
        n_experiences: number of experiences; must divide the number of classes C.
        seed: picks the class order (``class_order_for_seed``) when ``class_order`` is None.
        class_order: explicit class order, a permutation of 0..C-1.

    Returns:
        An Avalanche ``NCScenario``: ``train_stream`` / ``test_stream`` experiences
        yield ``(x, y, task_label=0)`` and expose ``classes_in_this_experience``;
        ``benchmark.classes_order`` is the class order used.
    """
    train_x, train_y = _as_tensors(train_x, train_y, "train")
    test_x, test_y = _as_tensors(test_x, test_y, "test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"train inputs have shape (N, {tuple(train_x.shape[1:])}) but test inputs (N, {tuple(test_x.shape[1:])})")
    n_classes = _check_labels(train_y, test_y)
    if not 1 <= n_experiences <= n_classes or n_classes % n_experiences:
        raise ValueError(
            f"n_experiences={n_experiences} must divide the number of classes ({n_classes}) "
            f"so that every experience has the same number of classes"
        )
    if class_order is None:
        class_order = class_order_for_seed(n_classes, seed)
    elif sorted(class_order) != list(range(n_classes)):
        raise ValueError(f"class_order must be a permutation of 0..{n_classes - 1}, got {list(class_order)}")
    return nc_benchmark(
        TensorDataset(train_x, train_y),
        TensorDataset(test_x, test_y),
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=[int(c) for c in class_order],
    )


def _as_tensors(x: ArrayLike, y: ArrayLike, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, ...) inputs and (N,) int64 labels as tensors, checking that they match."""
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.ndim != 1 or x.ndim < 1 or len(x) != len(y):
        raise ValueError(f"{name}: expected (N, ...) inputs and (N,) labels, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
    return x, y.long()


def _check_labels(train_y: torch.Tensor, test_y: torch.Tensor) -> int:
    """Number of classes C; train and test labels must each be exactly 0..C-1."""
    train_classes = torch.unique(train_y).tolist()
    n_classes = len(train_classes)
    if train_classes != list(range(n_classes)):
        raise ValueError(f"train labels must be 0..C-1 with every class present, got classes {train_classes}")
    test_classes = torch.unique(test_y).tolist()
    if test_classes != train_classes:
        raise ValueError(f"test labels must cover the same classes 0..{n_classes - 1} as train, got {test_classes}")
    return n_classes
