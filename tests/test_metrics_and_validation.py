"""DKVB's Avalanche metrics (diagnostics and headline metrics) and the checks at the seam with
Avalanche: labels, key re-initialisation, too few key-initialisation samples."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from avalanche.evaluation.metrics import accuracy_metrics, class_accuracy_metrics, forgetting_metrics
from avalanche.logging import TextLogger
from avalanche.training.plugins import EvaluationPlugin
from torch.utils.data import TensorDataset

from avalanche_dkvb import DKVB, create_dkvb_model, ema_init_keys
from avalanche_dkvb.metrics import AccuracyMatrix, ClassBalancedAccuracy, dkvb_metrics, headline_metrics

KEY_INIT = {"epochs": 5, "batch_size": 64}
RESULTS = Path(__file__).resolve().parents[1] / "results"


def make_dkvb(model, evaluator, init_data=None, fast_path="eager", epochs=3):
    return DKVB(model=model, train_mb_size=16, train_epochs=epochs, eval_mb_size=256, evaluator=evaluator,
                init_data=init_data, key_init_kwargs=KEY_INIT, fast_path=fast_path)


# -- DKVB/ diagnostics -------------------------------------------------------------------------------
@pytest.mark.parametrize("fast_path", ["eager", "off"])
def test_dkvb_metrics_reach_the_loggers_and_equal_their_definitions(fast_path, make_model, init_data, toy_stream,
                                                                    tmp_path):
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log_file:
        metrics = dkvb_metrics()
        model = make_model()
        strategy = make_dkvb(model, EvaluationPlugin(*metrics, loggers=[TextLogger(log_file)]), init_data,
                             fast_path=fast_path)
        usage_history, value_history = [], [model.bottleneck.values.detach().clone()]
        for exp in toy_stream.train_stream:
            strategy.train(exp)
            usage_history.append(model.bottleneck.usage_counts.clone())
            value_history.append(model.bottleneck.values.detach().clone())
    by_name = {m.name: m.history for m in metrics}
    used = [(u > 0).float().mean().item() for u in usage_history]
    assert by_name["keys_used"] == pytest.approx(used)
    assert by_name["keys_used"][-1] == pytest.approx((model.bottleneck.usage_counts > 0).float().mean().item())
    before = [torch.zeros_like(usage_history[0])] + usage_history[:-1]
    new = [((u > 0) & (b == 0)).float().mean().item() for u, b in zip(usage_history, before)]
    assert by_name["keys_new"] == pytest.approx(new) and sum(new) == pytest.approx(used[-1])
    assert by_name["keys_overlap"][0] == 0.0 and all(0 <= v <= 1 for v in by_name["keys_overlap"])
    changed = [(a != b).any(-1).float().mean().item() for a, b in zip(value_history[1:], value_history[:-1])]
    assert by_name["values_changed"] == pytest.approx(changed) and all(v > 0 for v in changed)
    assert by_name["value_norm"][-1] == pytest.approx(model.bottleneck.values.detach().norm(dim=-1).mean().item())
    text = log_path.read_text()
    assert all(f"DKVB/{name}/train_phase/train_stream" in text for name in by_name)


def test_dkvb_metrics_refuse_unknown_names():
    with pytest.raises(ValueError, match="keys_used"):
        dkvb_metrics("keys_usd")


# -- headline metrics ------------------------------------------------------------------------------
def test_headline_metrics_equal_avalanches_class_accuracy_and_forgetting(make_model, init_data, toy_stream):
    headline = headline_metrics()
    evaluator = EvaluationPlugin(*headline, accuracy_metrics(experience=True), class_accuracy_metrics(stream=True),
                                 forgetting_metrics(stream=True))
    strategy = make_dkvb(make_model(), evaluator, init_data, epochs=2)
    for exp in toy_stream.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(toy_stream.test_stream)
    class_balanced, seen, matrix = headline
    per_class = [v for k, v in metrics.items() if k.startswith("Top1_ClassAcc_Stream/")]
    assert class_balanced.history[-1] == pytest.approx(np.mean(per_class))
    assert seen.history[-1] == pytest.approx(class_balanced.history[-1])  # every class seen at the end
    assert len(seen.history) == 4 and seen.history[0] > class_balanced.history[0]  # 2 of 8 classes seen first
    last_row = [metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"] for j in range(4)]
    assert matrix.rows[-1] == pytest.approx(last_row) and len(matrix.rows) == 4
    assert matrix.forgetting() == pytest.approx(metrics["StreamForgetting/eval_phase/test_stream"])


def test_forgetting_from_the_matrix_equals_avalanches_on_committed_runs():
    """The runner now computes forgetting from the accuracy matrix; on the committed Split-CIFAR10 runs
    (made with Avalanche's forgetting metric) both agree for every method and seed."""
    folder = RESULTS / "split_cifar10_jpeg_merged"
    results, matrices = pd.read_csv(folder / "results.csv"), pd.read_csv(folder / "accuracy_matrix.csv")
    checked = 0
    for (method, seed), rows in matrices.groupby(["method", "seed"]):
        metric = AccuracyMatrix()
        metric.rows = rows.pivot(index="after_experience", columns="on_experience", values="accuracy").values.tolist()
        expected = results[(results.method == method) & (results.seed == seed)].forgetting.item()
        assert metric.forgetting() == pytest.approx(expected, abs=1e-12)
        checked += 1
    assert checked == 36


def test_class_balanced_accuracy_weights_classes_equally():
    metric = ClassBalancedAccuracy()

    class Experience:
        current_experience = 0

    class Strategy:
        experience = Experience()
        mb_y = torch.tensor([0, 0, 0, 1])
        mb_output = torch.tensor([[1.0, 0.0]] * 4)  # always class 0: class 0 100 %, class 1 0 %

    metric.after_eval_iteration(Strategy())
    assert metric.per_class() == {0: 1.0, 1: 0.0}  # plain accuracy would be 0.75


# -- labels ------------------------------------------------------------------------------------------
def label_stream(labels):
    """A one-experience stream whose items carry ``labels`` as tensors of their dtype."""
    dataset = _make_taskaware_classification_dataset(TensorDataset(torch.rand(len(labels), 2), labels), targets=labels)
    return benchmark_from_datasets(train=[dataset], test=[dataset])


BAD_LABELS = [
    pytest.param(torch.tensor([0.0, 1.0, 2.5] * 4), TypeError, "int64.*float32", id="float"),
    pytest.param(torch.tensor([0, 1, 2] * 4, dtype=torch.int32), TypeError, "int64.*int32", id="int32"),
    pytest.param(torch.tensor([0, 1, 9] * 4), ValueError, r"\[0, value_dim=8\); got label 9", id="too_large"),
    pytest.param(torch.tensor([0, -1, 2] * 4), ValueError, r"\[0, value_dim=8\); got label -1", id="negative"),
]


@pytest.mark.parametrize("fast_path", ["eager", "off"])
@pytest.mark.parametrize("labels, error, message", BAD_LABELS)
def test_bad_labels_are_refused_before_key_initialisation(labels, error, message, fast_path, make_model,
                                                          init_data, quiet_evaluator):
    model = make_model()
    keys = model.bottleneck.keys.clone()
    strategy = make_dkvb(model, quiet_evaluator(), init_data, fast_path=fast_path)
    with pytest.raises(error, match=f"experience 0.*{message}"):
        strategy.train(label_stream(labels).train_stream[0])
    assert torch.equal(keys, model.bottleneck.keys)  # refused before the keys were initialised


# -- keys --------------------------------------------------------------------------------------------
def test_trained_model_with_unfrozen_keys_is_not_reinitialised(make_model, init_data, toy_stream, quiet_evaluator):
    model = make_model()
    make_dkvb(model, quiet_evaluator(), init_data).train(toy_stream.train_stream[0])
    state = model.state_dict()
    state["bottleneck.keys_frozen"] = torch.tensor(False)  # e.g. saved before freezing, trained later
    restored = make_model()
    restored.load_state_dict(state)
    keys = restored.bottleneck.keys.clone()
    strategy = make_dkvb(restored, quiet_evaluator(), init_data)
    with pytest.raises(RuntimeError, match=r"freeze_keys\(reset_usage=False\)"):
        strategy.train(toy_stream.train_stream[1])
    assert torch.equal(keys, restored.bottleneck.keys)
    restored.bottleneck.freeze_keys(reset_usage=False)  # what the message says to do
    strategy.train(toy_stream.train_stream[1])
    assert torch.equal(keys, restored.bottleneck.keys)


def test_fewer_key_initialisation_samples_than_keys_warn_with_both_numbers():
    model = create_dkvb_model(2, 3, num_codebooks=2, num_keys=64, key_dim=2)
    with pytest.warns(UserWarning, match="on 40 samples for 64 keys"):
        ema_init_keys(model.bottleneck, torch.rand(40, 2), epochs=1, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema_init_keys(model.bottleneck, torch.rand(64, 2), epochs=1, batch_size=16)
