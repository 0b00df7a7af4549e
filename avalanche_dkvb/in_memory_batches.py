"""Minibatches sliced from in-memory tensors, for strategies training on cached embeddings.

Avalanche's DataLoader fetches every sample through its dataset layers, which costs far more than a
step of a small model on an embedding. For data that already is tensors, the experience is
materialised once and each epoch is a shuffled sequence of index slices.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import ReplayPlugin
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
            yield [tensor.index_select(0, idx) for tensor in self.tensors]


class InMemoryBatchesPlugin(SupervisedPlugin):
    """Replaces the strategy's training DataLoader with :class:`TensorBatches` of the experience's
    adapted dataset. Only for plugins and strategies that build their training data through the
    adapted dataset (Naive, EWC, LwF, SI, GDumb, Cumulative), not those that replace the loader
    themselves (Replay: use :class:`InMemoryReplayPlugin` instead)."""

    dkvb_fast_path_exact = True  # it only replaces the loader, which DKVB's fast path then iterates

    def before_training_exp(self, strategy, **kwargs):
        strategy.dataloader = TensorBatches(strategy.adapted_dataset, strategy.train_mb_size,
                                            shuffle=kwargs.get("shuffle", True))


class ReplayTensorBatches:
    """Each minibatch of ``data`` followed by the next minibatch of ``memory``, concatenated, as Avalanche's
    ``ReplayDataLoader`` builds them: an epoch is one pass over ``data``, and ``memory`` is cycled (reshuffled
    at every pass) so that every step sees a full memory minibatch where the buffer allows."""

    def __init__(self, data: TensorBatches, memory: TensorBatches):
        self.data, self.memory = data, memory

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        memory = _endless(self.memory)
        for batch in self.data:
            yield [torch.cat(parts) for parts in zip(batch, next(memory))]


def _endless(batches: TensorBatches) -> Iterator[list[torch.Tensor]]:
    while True:
        yield from batches


class InMemoryReplayPlugin(ReplayPlugin):
    """Avalanche's ``ReplayPlugin`` (the same buffer and storage policy, the same minibatches: the
    experience's ``batch_size`` samples then ``batch_size_mem`` buffer samples) with both parts sliced
    from in-memory tensors by :class:`ReplayTensorBatches` instead of fetched sample by sample. The draws
    come from torch's global RNG in another order than ``ReplayDataLoader``'s, so runs differ from
    ``ReplayPlugin``'s sample for sample, not in what a minibatch is made of.

    Only the default loader options: a task-balanced buffer loader or ``drop_last`` raise ``ValueError``.
    """

    dkvb_fast_path_exact = True  # as ReplayPlugin: DKVB's fast path iterates the loader it puts in place

    def __init__(self, mem_size: int = 200, batch_size: int | None = None, batch_size_mem: int | None = None,
                 task_balanced_dataloader: bool = False, storage_policy=None):
        if task_balanced_dataloader:
            raise ValueError("InMemoryReplayPlugin does not balance the buffer's minibatches by task "
                             "(task_balanced_dataloader=True); use ReplayPlugin for that")
        super().__init__(mem_size=mem_size, batch_size=batch_size, batch_size_mem=batch_size_mem,
                         storage_policy=storage_policy)

    def before_training_exp(self, strategy, num_workers: int = 0, shuffle: bool = True,
                            drop_last: bool = False, **kwargs):
        if drop_last:
            raise ValueError("InMemoryReplayPlugin keeps the last, smaller minibatch (drop_last=True was "
                             "given); use ReplayPlugin for that")
        data = TensorBatches(strategy.adapted_dataset, self.batch_size or strategy.train_mb_size, shuffle)
        if len(self.storage_policy.buffer) == 0:  # the first experience: nothing to replay yet
            strategy.dataloader = data
            return
        memory = TensorBatches(self.storage_policy.buffer, self.batch_size_mem or strategy.train_mb_size, shuffle)
        strategy.dataloader = ReplayTensorBatches(data, memory)
