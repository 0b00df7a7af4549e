"""Tests for the batched Deep Streaming LDA baseline (BatchedStreamingLDA)."""

import numpy as np
import pytest
import torch
from torch import nn

from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import StreamingLDA
from avalanche.training.plugins import EvaluationPlugin

from avalanche_dkvb.baselines import BatchedStreamingLDA, BatchedStreamingLDAClassifier
from avalanche_dkvb.data.streams import make_class_incremental_benchmark

torch.set_num_threads(1)

NUM_CLASSES, DIM, N_EXP, SEED = 6, 12, 3, 1
STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
pytestmark = pytest.mark.filterwarnings("ignore:No loggers specified")


def blobs(seed, per_class, spread):
    """Gaussian blobs around fixed centres: (N, DIM) float32, (N,) int64."""
    centres = 3 * torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    x = centres[y] + spread * torch.randn(len(y), DIM, generator=torch.Generator().manual_seed(seed))
    return x, y


def stream(spread=1.0):
    (x, y), (xt, yt) = blobs(1, 50, spread), blobs(2, 20, spread)
    return make_class_incremental_benchmark(x, y, xt, yt, N_EXP, SEED), xt, yt


def quiet():
    return EvaluationPlugin(loggers=[])


def ours(mb=64, **kw):
    return BatchedStreamingLDA(
        input_size=DIM, num_classes=NUM_CLASSES, train_mb_size=mb, evaluator=quiet(), **kw
    )


def seen_after(benchmark, k):
    """Sorted classes of the first k experiences."""
    return sorted(c for e in benchmark.train_stream[:k] for c in e.classes_in_this_experience)


def reference_slda(xs, ys, shrinkage=1e-4):
    """Brute-force float64 numpy transcription of Avalanche's per-sample
    ``StreamingLDA.fit`` + ``predict``; returns (means, Sigma, W, c)."""
    mu = np.zeros((NUM_CLASSES, DIM))
    count = np.zeros(NUM_CLASSES)
    sigma = np.ones((DIM, DIM))
    for n, (x, y) in enumerate(zip(xs, ys)):
        d = x - mu[y]
        sigma = (n * sigma + np.outer(d, d) * n / (n + 1)) / (n + 1)
        mu[y] += (x - mu[y]) / (count[y] + 1)
        count[y] += 1
    lam = np.linalg.pinv((1 - shrinkage) * sigma + shrinkage * np.eye(DIM))
    w = lam @ mu.T
    return mu, sigma, w, 0.5 * (mu.T * w).sum(0)


def stream_order(benchmark, k):
    """The (x, y) samples of the first k experiences in training order
    (shuffle=False)."""
    xs, ys = [], []
    for exp in benchmark.train_stream[:k]:
        for x, y, _ in exp.dataset:
            xs.append(x.double().numpy())
            ys.append(int(y))
    return np.stack(xs), np.array(ys)


@pytest.mark.parametrize("shrinkage, streaming", [(1e-4, True), (0.3, False)])
def test_matches_avalanche_streaming_lda(shrinkage, streaming):
    benchmark, xt, _ = stream()
    avalanche = StreamingLDA(
        slda_model=nn.Identity(), criterion=nn.CrossEntropyLoss(), input_size=DIM,
        num_classes=NUM_CLASSES, shrinkage_param=shrinkage, streaming_update_sigma=streaming,
        train_mb_size=7, eval_mb_size=64, evaluator=quiet(),
    )
    strategy = ours(shrinkage_param=shrinkage, streaming_update_sigma=streaming)
    for k, exp in enumerate(benchmark.train_stream, 1):
        avalanche.train(exp, shuffle=False)
        strategy.train(exp, shuffle=False)
        model = strategy.model
        torch.testing.assert_close(model.means, avalanche.muK.double(), rtol=0, atol=1e-5)
        assert torch.equal(model.counts, avalanche.cK.long())
        assert int(model.num_updates) == avalanche.num_updates
        torch.testing.assert_close(model.covariance, avalanche.Sigma.double(), rtol=0, atol=1e-5)
        seen = seen_after(benchmark, k)
        expected = avalanche.predict(xt).double()[:, seen]
        scores = model(xt.double())
        torch.testing.assert_close(model.precision, avalanche.Lambda.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores[:, seen], expected, rtol=1e-5, atol=1e-4)
        predicted = torch.tensor(seen)[expected.argmax(1)]
        assert torch.equal(model(xt).argmax(1), predicted)


def test_matches_bruteforce_per_sample_recursion_in_float64():
    benchmark, xt, _ = stream()
    strategy = ours(mb=32)
    for k, exp in enumerate(benchmark.train_stream, 1):
        strategy.train(exp, shuffle=False)
        mu, sigma, w, c = reference_slda(*stream_order(benchmark, k))
        model = strategy.model
        np.testing.assert_allclose(model.means.numpy(), mu, rtol=0, atol=1e-12)
        np.testing.assert_allclose(model.covariance.numpy(), sigma, rtol=0, atol=1e-12)
        seen = seen_after(benchmark, k)
        expected = (xt.double().numpy() @ w - c)[:, seen]
        np.testing.assert_allclose(model(xt.double())[:, seen].numpy(), expected, rtol=1e-9, atol=1e-9)


def test_statistics_do_not_depend_on_batch_size():
    benchmark, xt, _ = stream()
    one, big = ours(mb=1), ours(mb=64)
    for exp in benchmark.train_stream:
        one.train(exp, shuffle=False)
        big.train(exp, shuffle=False)
    for name in ("sums", "counts", "scatter", "num_updates"):
        torch.testing.assert_close(
            getattr(one.model, name), getattr(big.model, name), rtol=1e-12, atol=1e-10
        )
    torch.testing.assert_close(one.model(xt.double()), big.model(xt.double()), rtol=1e-9, atol=1e-9)


def test_batches_with_repeated_labels_match_sample_by_sample_updates():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)  # many repeats of each label per batch
    split = BatchedStreamingLDAClassifier(DIM, NUM_CLASSES)
    single = BatchedStreamingLDAClassifier(DIM, NUM_CLASSES)
    for chunk in (slice(0, 3), slice(3, 25), slice(25, 40)):
        split.update(x[chunk], y[chunk])
    for i in range(40):
        single.update(x[i : i + 1], y[i : i + 1])
    torch.testing.assert_close(split.scatter, single.scatter, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.sums, single.sums, rtol=1e-12, atol=1e-12)


def test_never_predicts_unseen_classes():
    benchmark, xt, _ = stream(spread=3.0)  # overlapping blobs: unseen classes would be tempting
    strategy = ours()
    assert torch.equal(strategy.model(xt), torch.zeros(len(xt), NUM_CLASSES))
    for k, exp in enumerate(benchmark.train_stream, 1):
        strategy.train(exp)
        seen = seen_after(benchmark, k)
        unseen = [c for c in range(NUM_CLASSES) if c not in seen]
        scores = strategy.model(xt)
        assert scores.shape == (len(xt), NUM_CLASSES) and scores.dtype == xt.dtype
        assert set(scores.argmax(1).tolist()) <= set(seen)
        assert torch.all(scores[:, unseen] == float("-inf"))
        assert torch.isfinite(scores[:, seen]).all()


def test_accuracy_on_separable_blobs_with_evaluation_plugin():
    benchmark, xt, yt = stream(spread=0.5)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    strategy = BatchedStreamingLDA(
        input_size=DIM, num_classes=NUM_CLASSES, train_mb_size=16, eval_mb_size=32,
        evaluator=evaluator, eval_every=-1,
    )
    for exp in benchmark.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(benchmark.test_stream)
    assert metrics[STREAM_ACC] > 0.9
    for e in range(N_EXP):
        assert metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{e:03d}"] > 0.9
    assert (strategy.model(xt).argmax(1) == yt).float().mean() > 0.9


def test_state_dict_round_trip_and_cache_invalidation():
    benchmark, xt, _ = stream()
    strategy = ours()
    strategy.train(benchmark.train_stream[0])
    state = {k: v.clone() for k, v in strategy.model.state_dict().items()}
    fresh = BatchedStreamingLDAClassifier(DIM, NUM_CLASSES)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(xt), strategy.model(xt))
    # same number of updates, other statistics: the cached readout must go
    other = BatchedStreamingLDAClassifier(DIM, NUM_CLASSES)
    x, y = blobs(7, 50, 1.0)
    other.update(2 * x[: int(state["num_updates"])], y[: int(state["num_updates"])])
    other_scores = other(xt)
    assert not torch.allclose(other_scores, fresh(xt))
    fresh.load_state_dict(other.state_dict())
    torch.testing.assert_close(fresh(xt), other_scores)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="shrinkage_param"):
        BatchedStreamingLDAClassifier(DIM, NUM_CLASSES, shrinkage_param=1.5)
    model = BatchedStreamingLDAClassifier(DIM, NUM_CLASSES)
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        model.update(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        model.update(torch.randn(2, DIM), torch.tensor([0, 6]))
