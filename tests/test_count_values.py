"""CountValues: DKVB with per-key class counts. Order invariance, exact class unlearning, locality,
key initialisation before labelled data, usage counting for the eval-time masking, input errors."""

from __future__ import annotations

import copy

import pytest
import torch
from avalanche.benchmarks import tensors_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin

from avalanche_dkvb import CountValues, MomentValues, create_dkvb_model, init_keys, values_from_counts

DIM, CLASSES = 16, 4
KEY_INIT = {"epochs": 2, "batch_size": 64}


def clusters(per_class: int, seed: int):
    """Overlapping Gaussian class clusters: (CLASSES * per_class, DIM) inputs, int64 labels."""
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(123))
    y = torch.arange(CLASSES).repeat_interleave(per_class)
    return centres[y] + torch.randn(len(y), DIM, generator=torch.Generator().manual_seed(seed)), y


@pytest.fixture(scope="module")
def data():
    return (*clusters(40, seed=1), *clusters(20, seed=2))


def stream(data, class_order=(0, 1, 2, 3), without_class=None):
    """Two experiences of two classes each, in ``class_order``; ``without_class``: its training samples
    are dropped (the stream a model trained without that class would have seen)."""
    train_x, train_y, test_x, test_y = data
    groups = [class_order[:2], class_order[2:]]

    def part(x, y, classes, drop=None):
        keep = torch.isin(y, torch.tensor(classes)) & (y != drop if drop is not None else True)
        return x[keep], y[keep]

    return tensors_benchmark(train_tensors=[part(train_x, train_y, g, without_class) for g in groups],
                             test_tensors=[part(test_x, test_y, g) for g in groups], task_labels=[0, 0])


def unlabelled():
    return torch.randn(300, DIM, generator=torch.Generator().manual_seed(5))


def frozen_model(top_k=1):
    """A small model (8 codebooks x 32 keys of size 4), keys by EMA on unlabelled noise, frozen."""
    model = create_dkvb_model(DIM, CLASSES, num_codebooks=8, num_keys=32, key_dim=4, top_k=top_k,
                              generator=torch.Generator().manual_seed(0))
    init_keys(model.bottleneck, unlabelled(), "ema", generator=torch.Generator().manual_seed(0), **KEY_INIT)
    model.bottleneck.freeze_keys()
    return model


def counting(model, **kwargs):
    kwargs.setdefault("evaluator", EvaluationPlugin(loggers=[]))
    return CountValues(model=model, **kwargs)


def train_all(strategy, benchmark, experiences=None):
    for i in experiences or range(len(benchmark.train_stream)):
        strategy.train(benchmark.train_stream[i])
    return strategy


def predictions(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).argmax(1)


def test_values_from_counts_rules():
    counts = torch.tensor([[0, 0, 0], [3, 1, 0]], dtype=torch.int32)
    log_post = values_from_counts(counts, "log_posterior", smoothing=1.0)
    assert torch.equal(log_post[0], torch.zeros(3))  # an unvisited key is neutral
    expected = torch.log(3 * torch.tensor([4.0, 2.0, 1.0]) / 7)
    torch.testing.assert_close(log_post[1], expected)
    post = values_from_counts(counts, "posterior", smoothing=0.5)
    torch.testing.assert_close(post[1], 3 * torch.tensor([3.5, 1.5, 0.5]) / 5.5 - 1)
    assert torch.equal(values_from_counts(counts, "counts"), counts.float())
    with pytest.raises(ValueError, match="rule must be one of"):
        values_from_counts(counts, "softmax")


@pytest.mark.parametrize("top_k", [1, 3])
def test_same_model_whatever_the_order(data, top_k):
    base = frozen_model(top_k)
    torch.manual_seed(0)
    forward = train_all(counting(copy.deepcopy(base), train_mb_size=16), stream(data))
    torch.manual_seed(1)  # another shuffle, another batch size, experiences in the opposite order
    backward = train_all(counting(copy.deepcopy(base), train_mb_size=7), stream(data, (2, 3, 0, 1)))
    assert forward.class_counts.sum() == 160 * 8 * top_k
    assert torch.equal(forward.class_counts, backward.class_counts)
    assert torch.equal(forward.model.bottleneck.values, backward.model.bottleneck.values)
    assert torch.equal(forward.model.bottleneck.usage_counts, backward.model.bottleneck.usage_counts)
    test_x = data[2]
    assert torch.equal(forward.model(test_x), backward.model(test_x))  # eval mode: masked lookup


def test_forget_classes_equals_training_without_them(data):
    base = frozen_model()
    full = train_all(counting(copy.deepcopy(base)), stream(data))
    full.forget_classes([1])
    without = train_all(counting(copy.deepcopy(base)), stream(data, without_class=1))
    assert int(full.class_counts[..., 1].sum()) == 0
    assert torch.equal(full.class_counts, without.class_counts)
    assert torch.equal(full.model.bottleneck.usage_counts, without.model.bottleneck.usage_counts)
    assert torch.equal(full.model.bottleneck.values, without.model.bottleneck.values)
    test_x, test_y = data[2], data[3]
    assert torch.equal(predictions(full.model, test_x), predictions(without.model, test_x))
    assert not (predictions(full.model, test_x) == 1).any()  # nothing left votes for the class


def test_forget_classes_refuses_bad_classes(data):
    strategy = train_all(counting(frozen_model()), stream(data))
    with pytest.raises(TypeError, match="integers"):
        strategy.forget_classes([1.0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        strategy.forget_classes([4])


def test_counts_rows_it_selects_only_and_matches_usage(data):
    model = frozen_model()
    strategy = counting(model)
    benchmark = stream(data)
    strategy.train(benchmark.train_stream[0])
    before = model.bottleneck.values.detach().clone()
    strategy.train(benchmark.train_stream[1])
    x = data[0][data[1] >= 2]  # the second experience's inputs
    selected = torch.zeros(8 * 32, dtype=torch.bool)
    selected[model.bottleneck.flat_indices(x).flatten()] = True
    changed = (model.bottleneck.values.detach() != before).any(-1).flatten()
    assert changed.any()
    assert not (changed & ~selected).any()  # no row outside the selected ones moved
    assert torch.equal(model.bottleneck.usage_counts, strategy.class_counts.sum(-1).long())


def test_initialises_keys_on_init_data_then_freezes(data):
    model = create_dkvb_model(DIM, CLASSES, num_codebooks=8, num_keys=32, key_dim=4, value_init="normal")
    random_keys = model.bottleneck.keys.clone()
    strategy = counting(model, init_data=unlabelled(), key_init_kwargs=KEY_INIT)
    strategy.train(stream(data).train_stream[0])
    assert bool(model.bottleneck.keys_frozen) and not torch.equal(random_keys, model.bottleneck.keys)
    unused = strategy.class_counts.sum(-1) == 0
    assert torch.equal(model.bottleneck.values.detach()[unused], torch.zeros(int(unused.sum()), CLASSES))


def test_any_evaluation_plugin_and_learns(data):
    evaluator = EvaluationPlugin(accuracy_metrics(minibatch=True, epoch=True, stream=True), loggers=[])
    strategy = counting(frozen_model(), evaluator=evaluator)
    benchmark = stream(data)
    train_all(strategy, benchmark)
    metrics = strategy.eval(benchmark.test_stream)
    assert metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"] > 0.6  # chance is 0.25
    assert strategy.train_epochs == 1


def test_bad_inputs_give_clear_errors(data):
    with pytest.raises(TypeError, match="DKVBModel"):
        CountValues(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mean decoder"):
        CountValues(model=create_dkvb_model(DIM, CLASSES, num_codebooks=4, num_keys=8, decoder="linear"),
                    init_data=unlabelled())
    with pytest.raises(ValueError, match="init_data"):
        CountValues(model=create_dkvb_model(DIM, CLASSES, num_codebooks=4, num_keys=8))
    with pytest.raises(ValueError, match="value_rule"):
        counting(frozen_model(), value_rule="softmax")
    for smoothing in (0.0, -1.0, float("inf"), float("nan")):  # inf passed before: NaN values after training
        with pytest.raises(ValueError, match="smoothing must be a finite number > 0"):
            counting(frozen_model(), smoothing=smoothing)
        with pytest.raises(ValueError, match="smoothing must be a finite number > 0"):
            values_from_counts(torch.tensor([[0, 0, 0], [2, 0, 0]]), smoothing=smoothing)
    assert torch.equal(values_from_counts(torch.tensor([[2, 0]]), "counts", smoothing=0.0), torch.tensor([[2.0, 0.0]]))
    strategy = counting(frozen_model())
    x = data[0][:4]
    selection = strategy._select(x, only_used=False)
    with pytest.raises(TypeError, match="integer tensor"):
        strategy._absorb(selection, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        strategy._absorb(selection, torch.tensor([0, 1, 2, 4]))


def strategy_predictions(strategy, x):
    """Predictions through the strategy's own forward (eval mode), which applies the key weights."""
    strategy.model.eval()
    strategy.is_training = False
    with torch.no_grad():
        strategy.mbatch = (x, torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.long))
        return strategy.forward().argmax(1)


def test_distance_weighted_top_k_is_order_invariant_and_unlearns_exactly(data):
    base = frozen_model(top_k=3)
    torch.manual_seed(0)
    forward = train_all(counting(copy.deepcopy(base), distance_temperature=0.5, train_mb_size=16), stream(data))
    torch.manual_seed(1)
    backward = train_all(counting(copy.deepcopy(base), distance_temperature=0.5, train_mb_size=7),
                         stream(data, (2, 3, 0, 1)))
    assert forward.class_weights.dtype == torch.float64
    torch.testing.assert_close(forward.class_weights.sum(), torch.tensor(160.0 * 8 * 3, dtype=torch.float64))
    # the weights come from float32 heads whose rounding depends on the minibatch size (16 against 7: BLAS
    # takes other kernels), so the float64 sums agree to that rounding, not to float64's
    torch.testing.assert_close(forward.class_weights, backward.class_weights, rtol=0, atol=1e-5)
    assert torch.equal(forward.class_counts, backward.class_counts)  # selections: the uniform table
    torch.testing.assert_close(forward.model.bottleneck.values, backward.model.bottleneck.values, rtol=0, atol=1e-6)

    forward.forget_classes([2])
    without = train_all(counting(copy.deepcopy(base), distance_temperature=0.5), stream(data, without_class=2))
    torch.testing.assert_close(forward.class_weights, without.class_weights, rtol=0, atol=1e-9)
    assert torch.equal(forward.model.bottleneck.usage_counts, without.model.bottleneck.usage_counts)
    torch.testing.assert_close(forward.model.bottleneck.values, without.model.bottleneck.values, rtol=0, atol=1e-6)


def test_distance_weights_change_counting_and_prediction(data):
    base = frozen_model(top_k=3)
    uniform = train_all(counting(copy.deepcopy(base)), stream(data))
    weighted = train_all(counting(copy.deepcopy(base), distance_temperature=0.05), stream(data))
    assert not torch.allclose(uniform.class_counts.double(), weighted.class_weights)
    # at a very high temperature the weights are uniform: the same values as uniform top-k
    flat = train_all(counting(copy.deepcopy(base), distance_temperature=1e9), stream(data))
    torch.testing.assert_close(flat.class_weights, uniform.class_counts.double())
    test_x = data[2]
    assert torch.equal(strategy_predictions(flat, test_x), strategy_predictions(uniform, test_x))
    assert torch.equal(strategy_predictions(uniform, test_x), predictions(uniform.model, test_x))
    with pytest.raises(ValueError, match="distance_temperature"):
        counting(frozen_model(), distance_temperature=0.0)


def moments(model, **kwargs):
    kwargs.setdefault("evaluator", EvaluationPlugin(loggers=[]))
    kwargs.setdefault("head_variance", 0.5)
    return MomentValues(model=model, **kwargs)


def test_moment_values_are_order_invariant_local_and_unlearn_exactly(data):
    base = frozen_model(top_k=2)
    torch.manual_seed(0)
    forward = train_all(moments(copy.deepcopy(base), train_mb_size=16), stream(data))
    torch.manual_seed(1)
    backward = train_all(moments(copy.deepcopy(base), train_mb_size=7), stream(data, (2, 3, 0, 1)))
    # the heads are float32 matrix products whose rounding depends on the batch size (BLAS takes another
    # kernel for the last minibatches of 3 rows), so the sums agree to the heads' float32 rounding
    torch.testing.assert_close(forward.class_head_sums, backward.class_head_sums, rtol=0, atol=1e-5)
    test_x = data[2]
    torch.testing.assert_close(forward.logits(test_x), backward.logits(test_x), rtol=0, atol=1e-5)
    # a class never seen in a cell sits at the key: the sums hold exactly the selecting heads
    heads = base.bottleneck.project(data[0])
    rows = base.bottleneck.flat_indices(data[0])  # (N, C*k)
    expected = torch.zeros_like(forward.class_head_sums).view(-1, 4)
    cells = (rows * CLASSES + data[1].unsqueeze(1)).flatten()
    expected.index_add_(0, cells, heads.repeat_interleave(2, dim=1).flatten(0, 1).double())
    torch.testing.assert_close(forward.class_head_sums.view(-1, 4), expected, rtol=0, atol=1e-9)

    forward.forget_classes([0])
    without = train_all(moments(copy.deepcopy(base)), stream(data, without_class=0))
    torch.testing.assert_close(forward.class_head_sums, without.class_head_sums, rtol=0, atol=1e-9)
    torch.testing.assert_close(forward.logits(test_x), without.logits(test_x), rtol=0, atol=1e-5)


def test_moment_weight_zero_predicts_as_count_values(data):
    base = frozen_model()
    counts = train_all(counting(copy.deepcopy(base)), stream(data))
    zero = train_all(moments(copy.deepcopy(base), moment_weight=0.0), stream(data))
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    weighted = train_all(moments(copy.deepcopy(base), moment_weight=3.0, evaluator=evaluator), stream(data))
    test_x, test_y = data[2], data[3]
    assert torch.equal(zero.logits(test_x), counts.logits(test_x))
    assert not torch.allclose(weighted.logits(test_x), counts.logits(test_x))
    metrics = weighted.eval(stream(data).test_stream)  # Avalanche's eval goes through the same scores
    accuracy = (weighted.logits(test_x).argmax(1) == test_y).float().mean().item()
    assert metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"] == pytest.approx(accuracy)


def test_moment_values_measure_head_variance_on_init_data_and_refuse_bad_options(data):
    model = create_dkvb_model(DIM, CLASSES, num_codebooks=8, num_keys=32, key_dim=4)
    strategy = MomentValues(model=model, init_data=unlabelled(), key_init_kwargs=KEY_INIT,
                            evaluator=EvaluationPlugin(loggers=[]))
    strategy.train(stream(data).train_stream[0])
    expected = float(model.bottleneck.quantization_error(unlabelled())) / 4
    assert strategy.head_variance == pytest.approx(expected)
    with pytest.raises(ValueError, match="head_variance"):
        MomentValues(model=frozen_model())
    with pytest.raises(ValueError, match="uniform top-k"):
        moments(frozen_model(), distance_temperature=1.0)
    with pytest.raises(ValueError, match="moment_weight"):
        moments(frozen_model(), moment_weight=-1.0)


# -- fast moment scores against the per-row reference -------------------------------------------------------

MANY = 7  # classes of the moment-score stream


def reference_moment_logits(strategy, selection):
    """The per-row moment scores (the original ``MomentValues._row_scores``: (b, C*k, V, d) float64 means
    per sample), averaged over each codebook's k rows and then over the codebooks (the mean decoder)."""
    bottleneck = strategy.model.bottleneck
    V, d, C, k = bottleneck.value_dim, bottleneck.key_dim, bottleneck.num_codebooks, bottleneck.top_k
    values = bottleneck.values.detach().view(-1, V)[selection.rows]  # (B, C*k, V)
    heads = selection.heads.repeat_interleave(k, dim=1).double()  # (B, C*k, d)
    sums = strategy.class_head_sums.view(-1, V, d)
    counts = strategy.class_counts.view(-1, V)
    keys = bottleneck.keys.view(-1, d)
    scale = strategy.moment_weight / (2 * strategy.head_variance)
    penalties = []
    for rows, h in zip(selection.rows.split(16), heads.split(16)):
        means = (sums[rows] + strategy.prior_strength * keys[rows].double().unsqueeze(2)) \
            / (counts[rows].double() + strategy.prior_strength).unsqueeze(-1)  # (b, C*k, V, d)
        penalties.append(scale * (h.unsqueeze(2) - means).square().sum(-1))  # (b, C*k, V)
    scores = values - torch.cat(penalties).to(values.dtype)
    return scores.view(scores.shape[0], C, k, V).mean(2).mean(1)


def assert_same_scores(fast, reference):
    """Equal to 1e-6 relative, relative to the largest logit (near-zero logits of a difference of terms
    have no relative precision of their own)."""
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


def many_class_data():
    centres = 1.5 * torch.randn(MANY, DIM, generator=torch.Generator().manual_seed(321))

    def draw(per_class, seed):
        y = torch.arange(MANY).repeat_interleave(per_class)
        return centres[y] + torch.randn(len(y), DIM, generator=torch.Generator().manual_seed(seed)), y

    return (*draw(30, seed=11), *draw(10, seed=12))


def many_class_stream(data):
    """Three experiences: classes (0, 1, 2), (3, 4), (5, 6)."""
    train_x, train_y, test_x, test_y = data
    groups = [(0, 1, 2), (3, 4), (5, 6)]

    def part(x, y, classes):
        keep = torch.isin(y, torch.tensor(classes))
        return x[keep], y[keep]

    return tensors_benchmark(train_tensors=[part(train_x, train_y, g) for g in groups],
                             test_tensors=[part(test_x, test_y, g) for g in groups], task_labels=[0, 0, 0])


def many_class_model(top_k):
    model = create_dkvb_model(DIM, MANY, num_codebooks=8, num_keys=32, key_dim=4, top_k=top_k,
                              generator=torch.Generator().manual_seed(0))
    init_keys(model.bottleneck, unlabelled(), "ema", generator=torch.Generator().manual_seed(0), **KEY_INIT)
    model.bottleneck.freeze_keys()
    return model


class TrainingOutputsAgainstReference(SupervisedPlugin):
    """Checks every training minibatch's output (before its counts are added) against the reference."""

    def __init__(self):
        super().__init__()
        self.checked = 0

    def after_forward(self, strategy, *args, **kwargs):
        selection = strategy._select(strategy.mb_x, only_used=False)
        assert_same_scores(strategy.mb_output, reference_moment_logits(strategy, selection))
        self.checked += 1


def check_against_reference(strategy, x):
    """Fast logits equal the reference for the training lookup and the evaluation (used keys) lookup."""
    for only_used in (False, True):
        selection = strategy._select(x, only_used=only_used)
        assert_same_scores(strategy._logits(selection), reference_moment_logits(strategy, selection))
    return strategy.logits(x)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moment_fast_logits_equal_reference_through_stream_forget_and_checkpoint(top_k):
    data = many_class_data()
    benchmark = many_class_stream(data)
    test_x = data[2]
    checker = TrainingOutputsAgainstReference()
    torch.manual_seed(0)
    strategy = moments(many_class_model(top_k), train_mb_size=16, moment_weight=2.0, plugins=[checker])
    check_against_reference(strategy, test_x)  # before any label: every class sits at the key
    for experience in benchmark.train_stream:
        strategy.train(experience)
        check_against_reference(strategy, test_x)
    assert checker.checked == 6 + 4 + 4  # every minibatch of the 90, 60, 60 samples, 16 a batch
    # the table was kept up to date cell by cell, not rebuilt: it equals a rebuild from the statistics
    kept = strategy.moment_table.clone()
    strategy.moment_table = None
    check_against_reference(strategy, test_x)
    torch.testing.assert_close(kept, strategy.moment_table, rtol=0, atol=0)

    strategy.forget_classes([1, 5])
    logits = check_against_reference(strategy, test_x)
    assert not (logits.argmax(1) == 1).all()

    fresh = moments(copy.deepcopy(strategy.model), moment_weight=2.0)
    fresh.logits(test_x)  # builds its table from zero statistics, which the checkpoint must replace
    fresh.load_count_state(copy.deepcopy(strategy.count_state()))
    torch.testing.assert_close(check_against_reference(fresh, test_x), logits, rtol=0, atol=0)


def test_moment_fast_logits_sum_repeated_rows():
    """A codebook with fewer used keys than k repeats its nearest used key: a row selected twice counts
    twice, in the fast scores as in the reference."""
    data = many_class_data()
    strategy = moments(many_class_model(top_k=3), moment_weight=1.5)
    strategy.train(many_class_stream(data).train_stream[0])
    selection = strategy._select(data[2], only_used=False)
    rows = selection.rows.view(len(data[2]), 8, 3).clone()
    rows[:, ::2, 2] = rows[:, ::2, 0]  # every other codebook: its first row twice
    repeated = selection._replace(rows=rows.flatten(1))
    assert_same_scores(strategy._logits(repeated), reference_moment_logits(strategy, repeated))
    assert not torch.allclose(strategy._logits(repeated), strategy._logits(selection))
