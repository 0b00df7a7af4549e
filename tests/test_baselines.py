"""Tests for the closed-form baselines (NCM, random-projection ridge)."""

import io

import pytest
import torch
from torch.utils.data import TensorDataset

from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
from avalanche.logging import InteractiveLogger, TextLogger
from avalanche.training.plugins import EvaluationPlugin

from avalanche_dkvb.baselines import (
    RIDGE_GRID,
    NearestClassMean,
    NearestClassMeanClassifier,
    RandomProjectionRidge,
    RandomProjectionRidgeClassifier,
)

torch.set_num_threads(1)

NUM_CLASSES, DIM, PER_CLASS = 6, 16, 40
CLASS_ORDER = [3, 0, 5, 1, 4, 2]  # experiences: {3, 0}, {5, 1}, {4, 2}
STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


def blobs(seed, per_class=PER_CLASS, spread=0.5):
    """Separable Gaussian blobs: (N, DIM) float32, (N,) int64 labels."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = centres[y] + spread * torch.randn(len(y), DIM, generator=g)
    return x, y


@pytest.fixture(scope="module")
def data():
    return blobs(1), blobs(2, per_class=20)


@pytest.fixture(scope="module")
def benchmark(data):
    (x, y), (xt, yt) = data
    return nc_benchmark(
        TensorDataset(x, y), TensorDataset(xt, yt), n_experiences=3,
        task_labels=False, fixed_class_order=CLASS_ORDER,
    )


def evaluator():
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[TextLogger(io.StringIO())],
    )


def ncm(**kw):
    return NearestClassMean(
        in_features=DIM, num_classes=NUM_CLASSES, train_mb_size=16, evaluator=evaluator, **kw
    )


def ridge(**kw):
    return RandomProjectionRidge(
        in_features=DIM, num_classes=NUM_CLASSES, train_mb_size=16, evaluator=evaluator, **kw
    )


def predict(strategy, x):
    return strategy.model(x).argmax(1)


def run_stream(strategy, benchmark):
    """Train on each experience and evaluate on the whole test stream after
    each; returns the last metrics dict."""
    for exp in benchmark.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(benchmark.test_stream)
    return metrics


# ---------------------------------------------------------------- NCM


def test_ncm_means_are_exact_class_means(benchmark, data):
    (x, y), _ = data
    strategy = ncm()
    for exp in benchmark.train_stream:
        strategy.train(exp)
    true = torch.stack([x[y == c].double().mean(0) for c in range(NUM_CLASSES)])
    torch.testing.assert_close(strategy.model.means, true, rtol=0, atol=1e-12)
    assert strategy.model.counts.tolist() == [PER_CLASS] * NUM_CLASSES


@pytest.mark.parametrize("cosine", [False, True])
def test_ncm_scores_are_brute_force_distances(benchmark, data, cosine):
    (x, y), (xt, _) = data
    strategy = ncm(cosine=cosine)
    for exp in benchmark.train_stream:
        strategy.train(exp)
    means = torch.stack([x[y == c].double().mean(0) for c in range(NUM_CLASSES)])
    xt64 = xt.double()
    if cosine:
        expected = torch.nn.functional.cosine_similarity(xt64[:, None], means[None], dim=2)
    else:
        expected = -torch.stack([(xt64 - m).norm(dim=1) for m in means], 1)
    scores = strategy.model(xt)
    assert scores.dtype == xt.dtype
    torch.testing.assert_close(scores, expected.float())
    assert torch.equal(predict(strategy, xt), expected.argmax(1))


def test_ncm_never_predicts_unseen_classes(benchmark, data):
    _, (xt, _) = data
    strategy = ncm()
    seen = set()
    for exp in benchmark.train_stream:
        strategy.train(exp)
        seen |= set(exp.classes_in_this_experience)
        logits = strategy.model(xt)
        assert set(logits.argmax(1).tolist()) <= seen
        unseen = [c for c in range(NUM_CLASSES) if c not in seen]
        assert torch.all(logits[:, unseen] == float("-inf"))
        assert logits.shape == (len(xt), NUM_CLASSES)


def test_ncm_without_data_scores_uniformly():
    model = NearestClassMeanClassifier(DIM, NUM_CLASSES)
    assert torch.equal(model(torch.randn(3, DIM)), torch.zeros(3, NUM_CLASSES))


def test_ncm_rejects_bad_batches():
    model = NearestClassMeanClassifier(DIM, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"shape \(N, 16\)"):
        model.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        model.update(torch.randn(2, DIM), torch.tensor([0, 6]))


# ---------------------------------------------------------------- ridge


def closed_form(x, y, lam):
    """Reference ridge readout (D, C) on (x, y) with one-hot targets."""
    x = x.double()
    onehot = torch.nn.functional.one_hot(y, NUM_CLASSES).double()
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype), x.T @ onehot)


def test_ridge_without_projection_equals_closed_form(benchmark, data):
    (x, y), (xt, _) = data
    strategy = ridge(projection_dim=0, ridge=1e-2)
    seen = torch.zeros(len(y), dtype=torch.bool)
    for exp in benchmark.train_stream:
        strategy.train(exp)
        seen |= torch.isin(y, torch.tensor(exp.classes_in_this_experience))
        reference = closed_form(x[seen], y[seen], 1e-2)
        torch.testing.assert_close(strategy.model.readout, reference, rtol=1e-9, atol=1e-9)
    expected = (xt.double() @ reference).argmax(1)
    assert torch.equal(predict(strategy, xt), expected)


def test_ridge_accumulation_is_order_independent(data):
    (x, y), (xt, _) = data
    experiences = [torch.isin(y, torch.tensor(CLASS_ORDER[i : i + 2])) for i in (0, 2, 4)]
    incremental = RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 64, ridge=1.0, seed=7)
    for mask in reversed(experiences):
        incremental.update(x[mask], y[mask])
        incremental.fit()
    joint = RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 64, ridge=1.0, seed=7)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    joint.update(x[perm], y[perm])
    joint.fit()
    torch.testing.assert_close(incremental.gram, joint.gram, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(incremental.readout, joint.readout, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(incremental(xt), joint(xt))


def test_ridge_projection_features_are_seeded_relu():
    a = RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 32, seed=5)
    b = RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 32, seed=5)
    x = torch.randn(4, DIM)
    assert torch.equal(a.projection, b.projection)
    torch.testing.assert_close(a.features(x), torch.relu(x.double() @ a.projection))
    assert a.features(x).shape == (4, 32)


def test_ridge_automatic_lambda_uses_holdout_of_seen_data(data):
    (x, y), _ = data
    model = RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 0, holdout_every=4)
    model.update(x, y)
    held = torch.arange(len(y)) % 4 == 0
    torch.testing.assert_close(model.holdout_gram, x[held].double().T @ x[held].double())
    model.fit()
    # brute force: fit on the non-held samples, score MSE on the held ones
    errors = []
    for lam in RIDGE_GRID:
        readout = closed_form(x[~held], y[~held], lam)
        target = torch.nn.functional.one_hot(y[held], NUM_CLASSES).double()
        errors.append(((x[held].double() @ readout - target) ** 2).sum())
    assert float(model.ridge) == RIDGE_GRID[int(torch.stack(errors).argmin())]
    torch.testing.assert_close(model.readout, closed_form(x, y, float(model.ridge)))


def test_ridge_automatic_lambda_ties_go_to_strongest(data):
    (x, y), _ = data
    model = RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 0)
    model.update(x[:1], y[:1])  # the only sample is held out: every lambda scores the same
    model.fit()
    assert float(model.ridge) == max(RIDGE_GRID)


def test_ridge_never_predicts_unseen_classes(benchmark, data):
    _, (xt, _) = data
    strategy = ridge(projection_dim=256)
    seen = set()
    for exp in benchmark.train_stream:
        strategy.train(exp)
        seen |= set(exp.classes_in_this_experience)
        logits = strategy.model(xt)
        assert set(logits.argmax(1).tolist()) <= seen
        unseen = [c for c in range(NUM_CLASSES) if c not in seen]
        assert torch.all(logits[:, unseen] == float("-inf"))


def test_ridge_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ridge must be > 0"):
        RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 0, ridge=0.0)
    with pytest.raises(RuntimeError, match="needs data"):
        RandomProjectionRidgeClassifier(DIM, NUM_CLASSES, 0, ridge=1.0).fit()


# ---------------------------------------------------------------- both, in Avalanche


@pytest.mark.parametrize(
    "make", [ncm, lambda: ncm(cosine=True), lambda: ridge(projection_dim=256)],
    ids=["ncm", "ncm-cosine", "ridge"],
)
def test_strategies_learn_without_forgetting(benchmark, make):
    strategy = make()
    metrics = run_stream(strategy, benchmark)
    assert metrics[STREAM_ACC] > 0.9
    forgetting = [v for k, v in metrics.items() if "Forgetting" in k]
    assert len(forgetting) == 3 and max(forgetting) <= 1e-9  # stream + 2 experiences
    for i in range(3):
        assert metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{i:03d}"] > 0.9


@pytest.mark.parametrize(
    "make", [ncm, lambda: ridge(projection_dim=64, ridge=1.0)], ids=["ncm", "ridge"]
)
def test_fit_does_not_depend_on_epochs_or_batch_size(benchmark, make):
    one = make()
    many = make()
    many.train_epochs, many.train_mb_size = 3, 7
    for exp in benchmark.train_stream:
        one.train(exp)
        many.train(exp)
    reference = one.model.state_dict()
    for name, value in many.model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-10, atol=1e-10, msg=name)


def test_strategies_run_with_interactive_logger_and_default_evaluator(benchmark, capsys):
    plugin = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        loggers=[InteractiveLogger()],
    )
    strategy = NearestClassMean(in_features=DIM, num_classes=NUM_CLASSES, evaluator=plugin)
    metrics = run_stream(strategy, benchmark)
    assert STREAM_ACC in metrics
    assert "Top1_Acc_Stream" in capsys.readouterr().out
    # default evaluator (train epoch accuracy/loss too) must not break either
    strategy = RandomProjectionRidge(in_features=DIM, num_classes=NUM_CLASSES, projection_dim=32)
    assert STREAM_ACC in run_stream(strategy, benchmark)
