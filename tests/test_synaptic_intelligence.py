"""SI on a CPU: Avalanche's plugin aliases its snapshots (importances stay 0, SI == Naive); the
copying subclass computes the importances of Zenke et al. and its penalty holds the weights."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.training import Naive, SynapticIntelligence
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_dkvb.baselines import CopyingSynapticIntelligence

DIM, CLASSES, PER_CLASS, LR, EPOCHS = 8, 4, 30, 5.0, 300
SI_LAMBDA = 10.0  # small enough for the penalised full-batch SGD at this lr to stay stable


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    x = 2 * torch.randn(CLASSES, DIM, generator=g)[y] + torch.randn(len(y), DIM, generator=g)
    return nc_benchmark(TensorDataset(x, y), TensorDataset(x, y), n_experiences=2, task_labels=False,
                        fixed_class_order=list(range(CLASSES)))


def _train(strategy_cls, stream, **kwargs):
    """Full-batch SGD (batch order cannot matter); returns the strategy and the weights after each experience."""
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES)
    strategy = strategy_cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                            criterion=nn.CrossEntropyLoss(), train_mb_size=CLASSES * PER_CLASS,
                            train_epochs=EPOCHS, evaluator=EvaluationPlugin(), **kwargs)
    weights = []
    for experience in stream.train_stream:
        strategy.train(experience)
        weights.append(model.weight.detach().clone())
    return strategy, weights


def _si_plugin(strategy):
    return next(p for p in strategy.plugins if hasattr(p, "ewc_data"))


def test_avalanche_si_on_cpu_has_zero_importance_and_trains_like_naive(stream):
    si, si_weights = _train(SynapticIntelligence, stream, si_lambda=SI_LAMBDA)
    _, naive_weights = _train(Naive, stream)
    assert all((p.data == 0).all() for p in _si_plugin(si).ewc_data[1].values())
    assert torch.equal(si_weights[-1], naive_weights[-1])


def test_copying_si_matches_the_path_integral_and_its_penalty_holds_the_weights(stream):
    first_experience = stream.train_stream[0].dataset
    first, _ = _train(CopyingSynapticIntelligence, nc_benchmark(first_experience, first_experience, n_experiences=1,
                                                                 task_labels=False), si_lambda=SI_LAMBDA)

    # The same by hand: full-batch SGD from the same initialisation, omega = -sum_t g_t * step_t /
    # (total change^2 + eps), clipped at Avalanche's 0.001.
    torch.manual_seed(0)
    model = nn.Linear(DIM, CLASSES)
    x, y = (torch.stack(t) for t in zip(*[(s[0], torch.tensor(s[1])) for s in first_experience]))
    start, path = model.weight.detach().clone(), torch.zeros(CLASSES, DIM)
    for _ in range(EPOCHS):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = model.weight.detach().clone()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        path += model.weight.grad * (model.weight.detach() - before)
    omega = (-path / ((model.weight.detach() - start) ** 2 + 1e-7)).clamp(max=1e-3).flatten()
    assert (omega > 0).any()
    assert torch.allclose(_si_plugin(first).ewc_data[1]["weight"].data, omega, rtol=1e-4, atol=1e-9)

    # Over two experiences the penalty keeps the weights near the end of the first; Naive's move freely.
    _, si_weights = _train(CopyingSynapticIntelligence, stream, si_lambda=SI_LAMBDA)
    _, naive_weights = _train(Naive, stream)
    si_drift = (si_weights[1] - si_weights[0]).norm()
    naive_drift = (naive_weights[1] - naive_weights[0]).norm()
    assert si_drift < 0.75 * naive_drift  # measured: 0.48
