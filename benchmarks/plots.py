"""Plots of a run's results: accuracy after each experience per method, and final accuracy matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import pandas as pd  # noqa: E402

from benchmarks.outputs import atomic_savefig  # noqa: E402


def _seen_accuracy(matrix: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over the test experiences seen so far, per (method, seed, after_experience)."""
    seen = matrix[matrix.on_experience <= matrix.after_experience]
    return seen.groupby(["method", "seed", "after_experience"], sort=False).accuracy.mean().reset_index()


def plot_accuracy_curves(writer, path: Path) -> None:
    """Accuracy on the experiences seen so far after each experience: mean over seeds, +- std."""
    curves = _seen_accuracy(pd.DataFrame(writer.matrix_rows))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors  # distinct colours for up to 20 methods
    for i, (method, group) in enumerate(curves.groupby("method", sort=False)):
        stats = group.groupby("after_experience").accuracy.agg(["mean", "std"]).fillna(0.0)
        x = stats.index.to_numpy() + 1
        colour = colours[(2 * i) % 20 + (2 * i) // 20]
        ax.plot(x, 100 * stats["mean"], marker="o", label=method, color=colour)
        ax.fill_between(x, 100 * (stats["mean"] - stats["std"]), 100 * (stats["mean"] + stats["std"]),
                        color=colour, alpha=0.15)
    ax.set(xlabel="after experience", ylabel="accuracy on seen experiences (%)", ylim=(0, 100))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_final_matrices(writer, path: Path) -> None:
    """Each method's accuracy matrix (after experience i, on experience j), mean over seeds."""
    matrix = pd.DataFrame(writer.matrix_rows)
    methods = list(dict.fromkeys(matrix.method))
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        mean = matrix[matrix.method == method].pivot_table(
            index="after_experience", columns="on_experience", values="accuracy", aggfunc="mean")
        ax.imshow(100 * mean.to_numpy(), vmin=0, vmax=100, cmap="viridis")
        ax.set(title=method, xlabel="on experience", ylabel="after experience")
        ax.set_xticks(np.arange(mean.shape[1]))
        ax.set_yticks(np.arange(mean.shape[0]))
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)


def plot_key_diagnostics(diagnostics: dict[str, list[float]], title: str, path: Path) -> None:
    """DKVB's diagnostics (``avalanche_dkvb.metrics``) after each experience: the key fractions on one
    axis, the mean value norm on its own."""
    fig, (keys_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, values in diagnostics.items():
        ax = norm_ax if name == "value_norm" else keys_ax
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    keys_ax.set(xlabel="experiences trained", ylabel="fraction", ylim=(0, 1.02), title="keys and value rows")
    norm_ax.set(xlabel="experiences trained", ylabel="mean L2 norm", title="value rows")
    for ax in (keys_ax, norm_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: DKVB diagnostics")
    atomic_savefig(fig, path)
    plt.close(fig)
