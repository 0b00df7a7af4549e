"""The fast path (cached key indices + autograd-free SGD) equals the generic Avalanche loop, is
actually taken when eligible, and is refused (with a warning) when it is not."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_dkvb import DKVB, create_dkvb_model, ema_init_keys
from avalanche_dkvb.fast_path import CachedIndexTrainer

KEY_INIT = {"epochs": 5, "batch_size": 64}


class IndexTrainerProbe(SupervisedPlugin):
    """Records, after every training epoch, whether the strategy trained through the index cache."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def after_training_epoch(self, strategy, **kwargs):
        self.seen.append(strategy._index_trainer is not None)


def initialised(model, init_data):
    ema_init_keys(model.bottleneck, init_data, generator=torch.Generator().manual_seed(0), **KEY_INIT)
    model.bottleneck.freeze_keys()
    return model


def make_dkvb(model, evaluator, fast_path, probe, epochs=3, **kwargs):
    return DKVB(model=model, train_mb_size=16, train_epochs=epochs, eval_mb_size=256, evaluator=evaluator,
                fast_path=fast_path, plugins=[probe], **kwargs)


# -- CachedIndexTrainer against autograd, unit level -------------------------------------------------
@pytest.mark.parametrize("top_k, label_smoothing, compiled", [
    (1, 0.0, False), (1, 0.1, False), (3, 0.0, False), (3, 0.1, False),
    (3, 0.1, True),  # torch.compile'd step: one case only, each new shape compiles (seconds)
])
def test_index_trainer_epoch_equals_autograd_sgd(top_k, label_smoothing, compiled):
    torch.manual_seed(0)
    model = create_dkvb_model(6, 5, num_codebooks=4, num_keys=12, key_dim=3, top_k=top_k, value_init="normal",
                              value_init_std=0.5)
    model.bottleneck.freeze_keys()
    reference = copy.deepcopy(model)
    before = model.bottleneck.values.detach().clone()
    x, y = torch.randn(37, 6), torch.randint(5, (37,))
    lr, batch = 0.7, 8
    trainer = CachedIndexTrainer(model, TensorDataset(x, y), batch, "cpu", compiled=compiled)
    loss = trainer.run_epoch(lr, label_smoothing, shuffle=False)

    reference.train()
    opt = torch.optim.SGD(reference.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    losses = []
    for start in range(0, 37, batch):
        opt.zero_grad()
        batch_loss = criterion(reference(x[start:start + batch]), y[start:start + batch])
        batch_loss.backward()
        opt.step()
        losses.append(batch_loss.item() * len(y[start:start + batch]))
    assert torch.allclose(model.bottleneck.values, reference.bottleneck.values, atol=1e-6, rtol=0)
    assert not torch.allclose(model.bottleneck.values, before, atol=1e-3)  # it did train
    assert torch.equal(model.bottleneck.usage_counts, reference.bottleneck.usage_counts)
    assert loss == pytest.approx(sum(losses) / 37, rel=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradient_norm_bound_that_lets_the_fast_path_skip_clipping(top_k):
    """The bound sqrt(2 / (C k)) used to decide that clipping never acts holds for autograd's gradient,
    even in the worst case where the whole batch selects the same keys."""
    C = 3
    model = create_dkvb_model(4, 6, num_codebooks=C, num_keys=5, key_dim=2, heads="random_projection",
                              top_k=top_k, value_init="normal", value_init_std=3.0)
    bound = math.sqrt(2.0 / (C * top_k))
    for x in (torch.randn(64, 4), torch.randn(1, 4).expand(64, 4)):  # random / all identical inputs
        model.zero_grad()
        y = torch.zeros(64, dtype=torch.long)  # all the same class: gradients add up per key
        nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        norm = float(model.bottleneck.values.grad.norm())
        assert 0 < norm <= bound + 1e-6


# -- 10. the fast path equals the generic path through the strategy ------------------------------------
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_fast_path_equals_generic_path(mode, make_model, quiet_evaluator, init_data, toy_stream):
    fast_model = initialised(make_model(), init_data)
    slow_model = copy.deepcopy(fast_model)
    fast_probe, slow_probe = IndexTrainerProbe(), IndexTrainerProbe()
    fast = make_dkvb(fast_model, quiet_evaluator(), mode, fast_probe)
    slow = make_dkvb(slow_model, quiet_evaluator(), "off", slow_probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in toy_stream.train_stream:
            fast.train(exp, shuffle=False)
            slow.train(exp, shuffle=False)
    assert not [w for w in caught if "fast path off" in str(w.message)]
    assert fast_probe.seen == [True] * 12  # 4 experiences x 3 epochs, all through the index cache
    assert slow_probe.seen == [False] * 12
    assert fast._index_trainer is None  # the cache is freed after each experience

    before = initialised(make_model(), init_data).bottleneck.values
    assert not torch.allclose(fast_model.bottleneck.values, before, atol=1e-3)  # they did train
    assert torch.allclose(fast_model.bottleneck.values, slow_model.bottleneck.values, atol=1e-6, rtol=0)
    assert torch.equal(fast_model.bottleneck.usage_counts, slow_model.bottleneck.usage_counts)
    fast_model.eval()
    slow_model.eval()
    x = torch.rand(200, 2)
    assert torch.equal(fast_model(x).argmax(1), slow_model(x).argmax(1))


def test_fast_path_with_shuffle_trains_same_counts(make_model, quiet_evaluator, init_data, toy_stream):
    """With shuffling the order differs, but usage counts (a property of the data) must not."""
    fast_model = initialised(make_model(), init_data)
    slow_model = copy.deepcopy(fast_model)
    fast = make_dkvb(fast_model, quiet_evaluator(), "eager", IndexTrainerProbe())
    slow = make_dkvb(slow_model, quiet_evaluator(), "off", IndexTrainerProbe())
    for exp in toy_stream.train_stream:
        fast.train(exp)
        slow.train(exp)
    assert torch.equal(fast_model.bottleneck.usage_counts, slow_model.bottleneck.usage_counts)
    metrics_fast = fast.eval(toy_stream.test_stream)
    metrics_slow = slow.eval(toy_stream.test_stream)
    key = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    assert metrics_fast[key] > 0.9 and metrics_slow[key] > 0.9


class IterationHookPlugin(SupervisedPlugin):
    def after_update(self, strategy, **kwargs):
        pass


BLOCKERS = [
    pytest.param(dict(optimizer="adam", allow_nonlocal_optimizer=True), "not plain torch.optim.SGD", id="adam"),
    pytest.param(dict(optimizer="momentum", allow_nonlocal_optimizer=True), "momentum", id="momentum"),
    pytest.param(dict(decoder="linear"), "mean decoder", id="linear_decoder"),
    pytest.param(dict(clip_grad_norm=0.1), "gradient clipping", id="clip"),
    pytest.param(dict(criterion=nn.NLLLoss()), "CrossEntropyLoss", id="criterion"),
    pytest.param(dict(plugin=IterationHookPlugin()), "IterationHookPlugin", id="iteration_plugin"),
]


@pytest.mark.parametrize("options, reason", BLOCKERS)
def test_generic_path_taken_with_warning_when_needed(options, reason, make_model, quiet_evaluator, init_data,
                                                     toy_stream):
    options = dict(options)
    decoder = options.pop("decoder", "mean")
    model = make_model(decoder=decoder, value_dim=8 if decoder == "mean" else 3)
    model = initialised(model, init_data)
    opt_kind = options.pop("optimizer", None)
    if opt_kind == "adam":
        options["optimizer"] = torch.optim.Adam([model.bottleneck.values], lr=0.01)
    elif opt_kind == "momentum":
        options["optimizer"] = torch.optim.SGD([model.bottleneck.values], lr=0.1, momentum=0.5)
    probe = IndexTrainerProbe()
    plugins = [probe] + ([options.pop("plugin")] if "plugin" in options else [])
    strategy = DKVB(model=model, train_mb_size=16, train_epochs=2, evaluator=quiet_evaluator(),
                    plugins=plugins, fast_path="eager", **options)
    values = model.bottleneck.values.detach().clone()
    with pytest.warns(UserWarning, match=f"fast path off.*{reason}"):
        strategy.train(toy_stream.train_stream[0])
    assert probe.seen == [False, False]
    assert not torch.equal(values, model.bottleneck.values.detach())  # the generic loop trained


def test_fast_path_taken_with_default_clip_and_evaluation_plugin(make_model, quiet_evaluator, init_data,
                                                                 toy_stream):
    """Control for the blocker test: the defaults (clip 1.0, C=4, evaluator with metrics) keep the fast path."""
    model = initialised(make_model(), init_data)
    probe = IndexTrainerProbe()
    strategy = make_dkvb(model, quiet_evaluator(), "eager", probe, epochs=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fast path off.*")
        strategy.train(toy_stream.train_stream[0])
    assert probe.seen == [True, True]


def test_periodic_eval_per_epoch_keeps_fast_path(make_model, quiet_evaluator, init_data, toy_stream):
    model = initialised(make_model(), init_data)
    probe = IndexTrainerProbe()
    strategy = make_dkvb(model, quiet_evaluator(), "eager", probe, epochs=2, eval_every=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fast path off.*")
        strategy.train(toy_stream.train_stream[0], eval_streams=[toy_stream.test_stream[:1]])
    assert probe.seen == [True, True]
    assert model.training  # periodic evaluation switched the model back to training mode


def test_which_plugins_need_per_iteration_callbacks():
    from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval

    from avalanche_dkvb import DKVBPlugin
    from avalanche_dkvb.fast_path import _has_iteration_hooks

    class DuckTyped:  # a plugin not derived from Avalanche's base classes
        def after_training_epoch(self, strategy, **kwargs):
            pass

    class DuckTypedWithHook(DuckTyped):
        def before_backward(self, strategy, **kwargs):
            pass

    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 1)
    assert _has_iteration_hooks(IterationHookPlugin())
    assert _has_iteration_hooks(DuckTypedWithHook())
    assert _has_iteration_hooks(LRSchedulerPlugin(scheduler, step_granularity="iteration"))
    assert _has_iteration_hooks(PeriodicEval(eval_every=5, peval_mode="iteration"))
    assert not _has_iteration_hooks(PeriodicEval(eval_every=5, peval_mode="epoch"))
    assert not _has_iteration_hooks(EvaluationPlugin())
    assert not _has_iteration_hooks(Clock())
    assert not _has_iteration_hooks(DKVBPlugin())
    assert not _has_iteration_hooks(IndexTrainerProbe())
    assert not _has_iteration_hooks(DuckTyped())


def test_unknown_fast_path_mode_is_named(make_model, quiet_evaluator):
    with pytest.raises(ValueError, match=r"fast_path must be one of .*got True"):
        DKVB(model=make_model(), evaluator=quiet_evaluator(), fast_path=True)
