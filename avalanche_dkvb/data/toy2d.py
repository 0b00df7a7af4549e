"""The seeds' 2D, 8-class, class-incremental stream (4 stages x 2 classes of Gaussian clusters)."""

from __future__ import annotations

import torch

from avalanche_dkvb.data.streams import make_class_incremental_benchmark

# stage -> ((class, centre), (class, centre))
STAGES = (
    ((0, (0.25, 0.25)), (4, (0.75, 0.50))),
    ((1, (0.75, 0.25)), (5, (0.50, 0.75))),
    ((2, (0.75, 0.75)), (6, (0.25, 0.50))),
    ((3, (0.25, 0.75)), (7, (0.50, 0.25))),
)
NUM_CLASSES = 8
CLUSTER_STD = 0.035


def sample_stage(stage: int, per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` points of each class of ``stage``: x (2*per_class, 2), y (2*per_class,)."""
    xs, ys = [], []
    for label, centre in STAGES[stage]:
        xs.append(torch.tensor(centre) + CLUSTER_STD * torch.randn(per_class, 2, generator=generator))
        ys.append(torch.full((per_class,), label))
    return torch.cat(xs), torch.cat(ys)


def toy2d_benchmark(seed: int = 0, train_per_class: int = 100, test_per_class: int = 100):
    """An Avalanche class-incremental benchmark of 4 experiences (the seeds' stages, in order)."""
    generator = torch.Generator().manual_seed(seed)
    train, test = ([sample_stage(stage, per_class, generator) for stage in range(len(STAGES))]
                   for per_class in (train_per_class, test_per_class))
    (train_x, train_y), (test_x, test_y) = (map(torch.cat, zip(*split)) for split in (train, test))
    class_order = [label for stage in STAGES for label, _ in stage]
    return make_class_incremental_benchmark(train_x, train_y, test_x, test_y, n_experiences=len(STAGES),
                                            seed=seed, class_order=class_order)


def uniform_unit_square(num_points: int, seed: int = 0) -> torch.Tensor:
    """Unlabelled key-initialisation data: uniform samples of [0, 1]^2, (num_points, 2)."""
    return torch.rand(num_points, 2, generator=torch.Generator().manual_seed(seed))
