"""Minibatches sliced from in-memory tensors, for strategies training on cached embeddings.

Avalanche's DataLoader fetches every sample through its dataset layers, which costs far more than a
step of a small model on an embedding. For data that already is tensors, the experience is
materialised once and each epoch is a shuffled sequence of index slices.
"""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader


class TensorBatches:
    """Shuffled minibatches ``[x, y, task_label]`` of a dataset of tensors, materialised once:
    x (N, ...), y (N,), t (N,). Iterating yields a fresh shuffle each time (torch's global RNG)."""

    def __init__(self, dataset, batch_size: int, shuffle: bool = True):
        x, y, t = (torch.cat(parts) for parts in zip(*DataLoader(dataset, batch_size=4096)))
        self.tensors = (x, y, t)
        self.batch_size, self.shuffle = batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.tensors[1]) // self.batch_size)

    def __iter__(self):
        n = len(self.tensors[1])
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield [tensor[idx] for tensor in self.tensors]


class InMemoryBatchesPlugin(SupervisedPlugin):
    """Replaces the strategy's training DataLoader with :class:`TensorBatches` of the experience's
    adapted dataset. Only for plugins and strategies that build their training data through the
    adapted dataset (Naive, EWC, LwF, SI, GDumb, Cumulative), not those that replace the loader
    themselves (Replay)."""

    def before_training_exp(self, strategy, **kwargs):
        strategy.dataloader = TensorBatches(strategy.adapted_dataset, strategy.train_mb_size,
                                            shuffle=kwargs.get("shuffle", True))
