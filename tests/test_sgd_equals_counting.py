"""At the paper's settings SGD on DKVB's values degenerates to counting, and a large lr breaks that.

Each visit moves a value row by about lr / (batch * C), so the logits stay near zero, the softmax near
uniform, and every visit of class y adds (almost) the same vector, proportional to onehot(y) - 1/V
(label smoothing only scales it). So the trained values are c * (n_kc - n_k / V) for the per-key
class counts n_kc, and the predictions are those of the raw counts wherever the counts are not tied.
"""

from __future__ import annotations

import copy

import pytest
import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.training.plugins import EvaluationPlugin

from avalanche_dkvb import DKVB, CountValues, create_dkvb_model, init_keys

DIM, CLASSES = 32, 4


def clusters(per_class: int, seed: int):
    """Strongly overlapping class clusters (about 57 % accuracy), so that decisions are close calls."""
    centres = 0.25 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123))
    y = torch.arange(CLASSES).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), DIM, generator=torch.Generator().manual_seed(seed)), y


@pytest.fixture(scope="module")
def counted():
    """The paper's model (C 256, K 4096, d_key 14) with EMA keys on unlabelled noise, a 2 x 2-class
    stream, and the raw-count model trained on it."""
    train, test = clusters(100, seed=1), clusters(100, seed=2)

    def part(xy, classes):
        keep = torch.isin(xy[1], torch.tensor(classes))
        return xy[0][keep], xy[1][keep]

    groups = [[0, 1], [2, 3]]
    benchmark = tensors_benchmark([part(train, g) for g in groups], [part(test, g) for g in groups],
                                  task_labels=[0, 0])
    model = create_dkvb_model(DIM, CLASSES)
    init_keys(model.bottleneck, torch.randn(1024, DIM, generator=torch.Generator().manual_seed(3)), "ema",
              epochs=1, generator=torch.Generator().manual_seed(0))
    model.bottleneck.freeze_keys()
    counts = CountValues(model=copy.deepcopy(model), value_rule="counts", evaluator=EvaluationPlugin(loggers=[]))
    for experience in benchmark.train_stream:
        counts.train(experience)
    return model, benchmark, counts, test[0]


def train_sgd(model, benchmark, lr):
    """The DKVB strategy with its defaults (SGD on the values, batch 256, label smoothing 0.1, clip 1)
    except lr and 10 epochs instead of 2000 (eager fast path: the same values as the compiled one)."""
    model = copy.deepcopy(model)
    strategy = DKVB(model=model, lr=lr, train_epochs=10, fast_path="eager", evaluator=EvaluationPlugin(loggers=[]))
    for experience in benchmark.train_stream:
        strategy.train(experience)
    return model.eval()


def distance_from_counting(model, counts) -> float:
    """Relative residual of the values after the best fit c * (n_kc - n_k / V) to the counts."""
    n = counts.class_counts.double()
    direction = n - n.sum(-1, keepdim=True) / CLASSES
    values = model.bottleneck.values.detach().double()
    scale = (values * direction).sum() / direction.square().sum()
    return float((values - scale * direction).norm() / values.norm())


def agreement_where_counts_decide(model, counts, test_x) -> float:
    """Share of test inputs, among those whose summed counts have a unique top class, predicted alike."""
    counts.model.eval()
    with torch.no_grad():
        count_scores, sgd_pred = counts.model(test_x), model(test_x).argmax(1)
    top2 = count_scores.topk(2, dim=1).values
    decided = top2[:, 0] > top2[:, 1]
    assert decided.float().mean() > 0.9  # ties are rare, so the comparison covers most of the test set
    return float((sgd_pred == count_scores.argmax(1))[decided].float().mean())


def test_sgd_at_the_papers_lr_is_counting(counted):
    model, benchmark, counts, test_x = counted
    trained = train_sgd(model, benchmark, lr=0.3)
    assert distance_from_counting(trained, counts) < 1e-4
    assert agreement_where_counts_decide(trained, counts, test_x) == 1.0


def test_large_lr_breaks_the_equivalence(counted):
    model, benchmark, counts, test_x = counted
    trained = train_sgd(model, benchmark, lr=1e5)
    assert distance_from_counting(trained, counts) > 0.05
    assert agreement_where_counts_decide(trained, counts, test_x) < 0.9
