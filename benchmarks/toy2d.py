"""The main job: the seeds' 2D, 8-class, class-incremental stream for DKVB, a linear probe and an MLP.

Setting (../shared/reference): 4 stages x 2 classes, 100 training points per class per stage,
Gaussian clusters (std 0.035), 1000 full-batch steps per stage. Linear probe (Adam lr 1e-2) and MLP
2-32-8 (Adam lr 1e-3) are Avalanche ``Naive`` (minibatches sliced from in-memory tensors); DKVB has 20 codebooks x 20 keys behind random 2->2
projections, keys initialised by EMA on 100 uniform points of [0, 1]^2 for 1000 passes, values
starting at 0.001 * randn, values-only SGD (lr 0.3, no momentum) through the DKVB strategy.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from torch import nn  # noqa: E402

from avalanche_dkvb import DKVB, create_dkvb_model  # noqa: E402
from avalanche_dkvb.in_memory_batches import InMemoryBatchesPlugin  # noqa: E402
from avalanche_dkvb.data.toy2d import NUM_CLASSES, toy2d_benchmark, uniform_unit_square  # noqa: E402
from benchmarks.outputs import atomic_savefig  # noqa: E402

STEPS_PER_STAGE = 1000
FULL_BATCH = 200  # 2 classes x 100 points


def _dkvb(evaluator, seed: int):
    model = create_dkvb_model(2, NUM_CLASSES, num_codebooks=20, num_keys=20, key_dim=2,
                              value_init="normal", value_init_std=1e-3)
    return DKVB(model=model, train_mb_size=FULL_BATCH, train_epochs=STEPS_PER_STAGE, eval_mb_size=4096,
                evaluator=evaluator, init_data=uniform_unit_square(100, seed=seed),
                key_init_kwargs={"epochs": 1000, "batch_size": 100}, fast_path_threads=1)


def _naive(model: nn.Module, lr: float, evaluator):
    return Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=FULL_BATCH,
                 train_epochs=STEPS_PER_STAGE, eval_mb_size=4096, evaluator=evaluator,
                 plugins=[InMemoryBatchesPlugin()])


METHODS = {
    "dkvb": _dkvb,
    "linear": lambda evaluator, seed: _naive(nn.Linear(2, NUM_CLASSES), 1e-2, evaluator),
    "mlp": lambda evaluator, seed: _naive(
        nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)), 1e-3, evaluator),
}

GRID = 150


@torch.no_grad()
def predict_grid(model: nn.Module) -> np.ndarray:
    """Predicted class on a GRID x GRID lattice of [0, 1]^2 (row = y, column = x)."""
    axis = torch.linspace(0, 1, GRID)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    model.eval()
    return model(torch.stack([xx.flatten(), yy.flatten()], dim=1)).argmax(1).view(GRID, GRID).numpy()


def plot_decision_regions(method: str, seed: int, regions: list[np.ndarray], benchmark, path: Path) -> None:
    """One panel per stage: predicted class regions and the training points seen so far."""
    cmap = plt.get_cmap("tab10", NUM_CLASSES)
    fig, axes = plt.subplots(1, len(regions), figsize=(3.2 * len(regions), 3.4))
    for stage, (ax, region) in enumerate(zip(np.atleast_1d(axes), regions)):
        ax.imshow(region, origin="lower", extent=(0, 1, 0, 1), cmap=cmap, vmin=-0.5,
                  vmax=NUM_CLASSES - 0.5, alpha=0.45, interpolation="nearest")
        for exp in benchmark.train_stream[:stage + 1]:
            x, y = (torch.stack(t) for t in zip(*[(s[0], torch.as_tensor(s[1])) for s in exp.dataset]))
            ax.scatter(x[:, 0], x[:, 1], c=y, cmap=cmap, vmin=-0.5, vmax=NUM_CLASSES - 0.5, s=6,
                       edgecolors="k", linewidths=0.2)
        ax.set(title=f"after stage {stage + 1}", xlim=(0, 1), ylim=(0, 1), xticks=[], yticks=[])
    fig.suptitle(f"{method} (seed {seed}): decision regions")
    atomic_savefig(fig, path)
    plt.close(fig)
