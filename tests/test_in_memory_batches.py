"""The in-memory loaders make the minibatches Avalanche's own loaders make: the same sizes, each epoch one
pass over the experience, and with replay the same split between experience and buffer samples."""

from __future__ import annotations

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive
from avalanche.training.plugins import ReplayPlugin
from torch import nn

from avalanche_dkvb.in_memory_batches import InMemoryBatchesPlugin, InMemoryReplayPlugin

BATCH, BATCH_MEM, MEM = 16, 12, 200  # a buffer large enough to keep every past sample (40 per experience)


class _RecordMinibatches(SupervisedPlugin):
    """Per training experience, per epoch, the minibatches' inputs as rows of floats."""

    def __init__(self):
        super().__init__()
        self.experiences: list[list[list[list[tuple]]]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.experiences.append([])

    def before_training_epoch(self, strategy, **kwargs):
        self.experiences[-1].append([])

    def before_forward(self, strategy, **kwargs):
        self.experiences[-1][-1].append([tuple(row.tolist()) for row in strategy.mb_x])


def _record(toy_stream, loader_plugin, experiences: int = 3) -> list:
    recorder = _RecordMinibatches()
    model = nn.Linear(2, 8)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=2,
                     plugins=[loader_plugin, recorder])
    for experience in toy_stream.train_stream[:experiences]:
        strategy.train(experience)
    return recorder.experiences


def _samples(dataset) -> set[tuple]:
    return {tuple(dataset[i][0].tolist()) for i in range(len(dataset))}


class _DefaultLoader(SupervisedPlugin):
    """Leaves Avalanche's DataLoader in place (the reference)."""


def test_tensor_batches_make_the_dataloaders_minibatches(toy_stream):
    ours, reference = _record(toy_stream, InMemoryBatchesPlugin()), _record(toy_stream, _DefaultLoader())
    for i, (our_epochs, reference_epochs) in enumerate(zip(ours, reference)):
        experience = _samples(toy_stream.train_stream[i].dataset)
        for our_batches, reference_batches in zip(our_epochs, reference_epochs):
            assert [len(b) for b in our_batches] == [len(b) for b in reference_batches] == [16, 16, 8]
            seen = [row for batch in our_batches for row in batch]
            assert len(seen) == len(set(seen)) and set(seen) == experience
        assert our_epochs[0] != our_epochs[1]  # reshuffled every epoch


def test_in_memory_replay_makes_replay_plugins_minibatches(toy_stream):
    ours = _record(toy_stream, InMemoryReplayPlugin(MEM, batch_size_mem=BATCH_MEM))
    reference = _record(toy_stream, ReplayPlugin(MEM, batch_size_mem=BATCH_MEM))
    for i, (our_epochs, reference_epochs) in enumerate(zip(ours, reference)):
        experience = _samples(toy_stream.train_stream[i].dataset)
        past = set().union(*(_samples(e.dataset) for e in toy_stream.train_stream[:i]))
        for our_batches, reference_batches in zip(our_epochs, reference_epochs):
            assert [len(b) for b in our_batches] == [len(b) for b in reference_batches]
            sizes = [16, 16, 8] if i == 0 else [16 + 12, 16 + 12, 8 + 12]
            assert [len(b) for b in our_batches] == sizes
            data = [row for batch in our_batches for row in batch[:len(batch) - (BATCH_MEM if i else 0)]]
            assert len(data) == len(set(data)) and set(data) == experience
            if i:
                memory = [row for batch in our_batches for row in batch[-BATCH_MEM:]]
                # 36 draws from the 40 (then 80) buffered samples, none twice within a pass over the buffer
                assert set(memory) <= past and len(set(memory)) == len(memory)


def test_in_memory_replay_cycles_a_small_buffer(toy_stream):
    """A buffer smaller than an epoch's memory draws is gone through again, reshuffled, as ReplayDataLoader
    oversamples it: 6 buffered samples in memory minibatches of 4 give 4, 2, then 4 of the next pass."""
    ours = _record(toy_stream, InMemoryReplayPlugin(6, batch_size_mem=4), experiences=2)
    reference = _record(toy_stream, ReplayPlugin(6, batch_size_mem=4), experiences=2)
    assert [[len(b) for b in epoch] for epoch in ours[1]] == [[len(b) for b in epoch] for epoch in reference[1]]
    buffer = set()
    for batches in ours[1]:
        assert [len(b) for b in batches] == [16 + 4, 16 + 2, 8 + 4]
        first_pass = batches[0][-4:] + batches[1][-2:]
        assert len(set(first_pass)) == 6 and set(batches[2][-4:]) <= set(first_pass)
        buffer |= set(first_pass)
    assert buffer <= _samples(toy_stream.train_stream[0].dataset) and len(buffer) == 6


def test_in_memory_replay_refuses_what_it_does_not_do(toy_stream):
    with pytest.raises(ValueError, match="task_balanced_dataloader"):
        InMemoryReplayPlugin(MEM, task_balanced_dataloader=True)
    model = nn.Linear(2, 8)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=BATCH, plugins=[InMemoryReplayPlugin(MEM)])
    with pytest.raises(ValueError, match="drop_last"):
        strategy.train(toy_stream.train_stream[0], drop_last=True)
