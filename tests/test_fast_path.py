"""The fast path (cached key indices + autograd-free SGD inside Avalanche's loop) equals the generic
Avalanche loop with every plugin it accepts, is actually taken when eligible, and steps aside (with a
warning naming the plugin or the reason) when it is not exact."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, cpu_usage_metrics, loss_metrics, timing_metrics
from avalanche.training import Naive, Replay
from avalanche.training.plugins import EvaluationPlugin, GDumbPlugin, LRSchedulerPlugin, ReplayPlugin
from torch import nn

from avalanche_dkvb import DKVB, DKVBPlugin, create_dkvb_model, ema_init_keys
from avalanche_dkvb.fast_path import RowsByContent, dataloader_order, gradient_norm_bound, plugin_blocker, row_dtype
from avalanche_dkvb.in_memory_batches import InMemoryReplayPlugin

KEY_INIT = {"epochs": 5, "batch_size": 64}


class FastPathProbe(SupervisedPlugin):
    """Records, after every training epoch, whether the strategy trained through the fast path."""

    dkvb_fast_path_exact = True  # it only observes

    def __init__(self):
        super().__init__()
        self.seen = []

    def after_training_epoch(self, strategy, **kwargs):
        self.seen.append(strategy.uses_fast_path)


def initialised(model, init_data):
    ema_init_keys(model.bottleneck, init_data, generator=torch.Generator().manual_seed(0), **KEY_INIT)
    model.bottleneck.freeze_keys()
    return model


def make_dkvb(model, evaluator, fast_path, plugins=(), epochs=3, **kwargs):
    return DKVB(model=model, train_mb_size=16, train_epochs=epochs, eval_mb_size=256, evaluator=evaluator,
                fast_path=fast_path, plugins=list(plugins), **kwargs)


def train_pair(make_plugins, make_model, init_data, toy_stream, epochs=3, fast_mode="eager", shuffle=False,
               **kwargs):
    """The same initialised model trained by DKVB on the fast path and with fast_path="off", each
    with fresh plugins from ``make_plugins(model)``, from the same seed; returns (fast, slow) strategies."""
    fast_model = initialised(make_model(), init_data)
    slow_model = copy.deepcopy(fast_model)
    fast = make_dkvb(fast_model, EvaluationPlugin(), fast_mode,
                     [FastPathProbe(), *make_plugins(fast_model)], epochs=epochs, **kwargs)
    slow = make_dkvb(slow_model, EvaluationPlugin(), "off", make_plugins(slow_model),
                     epochs=epochs, **kwargs)
    for strategy in (fast, slow):  # one after the other from the same seed: buffers draw random samples
        torch.manual_seed(0)
        for exp in toy_stream.train_stream:
            strategy.train(exp, shuffle=shuffle)
    return fast, slow


def assert_same_training(fast, slow):
    fast_bn, slow_bn = fast.model.bottleneck, slow.model.bottleneck
    assert torch.allclose(fast_bn.values, slow_bn.values, atol=1e-6, rtol=0)
    assert torch.equal(fast_bn.usage_counts, slow_bn.usage_counts)


# -- unit level --------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k, reduction", [(1, "sum"), (2, "mean"), (2, "sum"), (3, "sum")])
def test_gradient_norm_bound_that_lets_the_fast_path_skip_clipping(top_k, reduction):
    """The bound sqrt(2 C k) t / (C k) (t = k for "sum", 1 for "mean") used to decide that clipping never
    acts holds for autograd's gradient, even in the worst case where the whole batch selects the same keys."""
    C = 3
    model = create_dkvb_model(4, 6, num_codebooks=C, num_keys=5, key_dim=2, heads="random_projection",
                              top_k=top_k, top_k_reduction=reduction, value_init="normal", value_init_std=3.0)
    bound = gradient_norm_bound(model.bottleneck)
    assert bound == pytest.approx(math.sqrt(2.0 / (C * top_k)) * (top_k if reduction == "sum" else 1))
    for x in (torch.randn(64, 4), torch.randn(1, 4).expand(64, 4)):  # random / all identical inputs
        model.zero_grad()
        y = torch.zeros(64, dtype=torch.long)  # all the same class: gradients add up per key
        nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        norm = float(model.bottleneck.values.grad.norm())
        assert 0 < norm <= bound + 1e-6


def test_rows_by_content_equal_the_search_and_survive_collisions(make_model, init_data):
    model = initialised(make_model(), init_data)
    x = torch.rand(50, 2)
    lookup = RowsByContent([], model)
    expected = model.bottleneck.flat_indices(x)
    assert torch.equal(lookup.rows_of(x[:30]), expected[:30])
    assert torch.equal(lookup.rows_of(x), expected)  # 30 found, 20 computed
    lookup._weights.zero_()  # every input now hashes to 0: only the exact comparison tells them apart
    assert torch.equal(lookup.rows_of(x.flip(0)), expected.flip(0))


# -- the fast path equals the generic path through the strategy ------------------------------------
# with 4 codebooks and top-3 sums, clipping at 1.0 could act (bound 1.22): clip at 2 there
@pytest.mark.parametrize("mode, top_k, reduction, label_smoothing, clip", [
    ("eager", 1, "sum", 0.1, 1.0), ("eager", 3, "mean", 0.0, 1.0), ("eager", 3, "sum", 0.1, 2.0),
    ("compiled", 3, "sum", 0.1, 2.0),  # compiled: one case, each shape compiles
])
def test_fast_path_equals_generic_path(mode, top_k, reduction, label_smoothing, clip, make_model, init_data,
                                       toy_stream):
    def model():
        return make_model(top_k=top_k, top_k_reduction=reduction)
    fast, slow = train_pair(lambda model: [], model, init_data, toy_stream, fast_mode=mode,
                            label_smoothing=label_smoothing, clip_grad_norm=clip)
    assert fast.plugins[0].seen == [True] * 12  # 4 experiences x 3 epochs, all on the fast path
    assert not fast.uses_fast_path  # the cache is freed after each experience
    before = initialised(model(), init_data).bottleneck.values
    assert not torch.allclose(fast.model.bottleneck.values, before, atol=1e-3)  # they did train
    assert_same_training(fast, slow)


def test_epoch_metrics_equal_the_generic_loop(make_model, init_data, toy_stream):
    """Epoch-level training accuracy and loss, and minibatch-level ones, are the generic loop's values."""
    def evaluator():
        return EvaluationPlugin(accuracy_metrics(minibatch=True, epoch=True), loss_metrics(minibatch=True, epoch=True),
                                timing_metrics(epoch=True), cpu_usage_metrics(epoch=True))

    fast_model = initialised(make_model(), init_data)
    slow_model = copy.deepcopy(fast_model)
    fast = make_dkvb(fast_model, evaluator(), "eager", [FastPathProbe()])
    slow = make_dkvb(slow_model, evaluator(), "off")
    for exp in toy_stream.train_stream:
        fast.train(exp, shuffle=False)
        slow.train(exp, shuffle=False)
    assert fast.plugins[0].seen == [True] * 12
    fast_metrics, slow_metrics = fast.evaluator.get_all_metrics(), slow.evaluator.get_all_metrics()
    names = [n for n in slow_metrics if n.startswith(("Top1_Acc_Epoch", "Loss_Epoch", "Top1_Acc_MB", "Loss_MB"))]
    assert len(names) == 4
    for name in names:
        fast_values, slow_values = fast_metrics[name][1], slow_metrics[name][1]
        assert len(fast_values) == len(slow_values) > 0, name
        tolerance = 1e-6 if "Acc" in name else 1e-4
        assert max(abs(a - b) for a, b in zip(fast_values, slow_values)) <= tolerance, name
    assert all(v > 0 for v in fast_metrics["Time_Epoch/train_phase/train_stream/Task000"][1])
    assert len(fast_metrics["CPUUsage_Epoch/train_phase/train_stream/Task000"][1]) == 12  # too short to be > 0 always
    accuracies = fast_metrics["Top1_Acc_Epoch/train_phase/train_stream/Task000"][1]
    assert max(accuracies) > 0.5 and min(fast_metrics["Loss_Epoch/train_phase/train_stream/Task000"][1]) > 0


@pytest.mark.parametrize("replay_plugin", [ReplayPlugin, InMemoryReplayPlugin])
def test_replay_plugin_buffer_is_trained_on(replay_plugin, make_model, init_data, toy_stream):
    fast, slow = train_pair(lambda model: [replay_plugin(mem_size=40)], make_model, init_data, toy_stream)
    assert fast.plugins[0].seen == [True] * 12
    assert_same_training(fast, slow)
    # the buffer was trained on: without it the values end elsewhere (before the fix they were identical)
    plain, _ = train_pair(lambda model: [], make_model, init_data, toy_stream)
    assert not torch.allclose(fast.model.bottleneck.values, plain.model.bottleneck.values, atol=1e-3)


@pytest.mark.parametrize("shuffle", [False, True])
def test_dataloader_order_is_avalanches_default_loaders(shuffle, toy_stream):
    """dataloader_order draws what Avalanche's default training loader draws: same minibatches, and the
    global RNG left in the same state (so a replay buffer later picks the same samples)."""
    model = nn.Linear(2, 8)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     criterion=nn.CrossEntropyLoss(), train_mb_size=16)
    experience = toy_stream.train_stream[1]
    strategy.experience, strategy.adapted_dataset = experience, experience.dataset.train()
    strategy.make_train_dataloader(shuffle=shuffle)
    inputs = torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])
    torch.manual_seed(3)
    loader_batches = [x for epoch in range(2) for x, *_ in strategy.dataloader]
    after_loader = torch.rand(4)
    torch.manual_seed(3)
    orders = [dataloader_order(len(inputs), shuffle) for epoch in range(2)]
    ours = [inputs[order[i:i + 16]] if order is not None else inputs[i:i + 16]
            for order in orders for i in range(0, len(inputs), 16)]
    assert len(ours) == len(loader_batches) == 6
    assert all(torch.equal(a, b) for a, b in zip(ours, loader_batches))
    assert torch.equal(torch.rand(4), after_loader)


@pytest.mark.parametrize("make_plugins", [lambda model: [ReplayPlugin(mem_size=40)], lambda model: []],
                         ids=["replay", "plain"])
def test_shuffled_training_equals_the_standard_loop(make_plugins, make_model, init_data, toy_stream):
    """With shuffling and no re-seeding the fast path takes the loader's minibatches and leaves the RNG as
    the loader does, so a replay buffer keeps the same samples and the values end where they end off."""
    fast, slow = train_pair(make_plugins, make_model, init_data, toy_stream, shuffle=True)
    assert fast.plugins[0].seen == [True] * 12
    assert_same_training(fast, slow)


def test_gdumb_plugin_memory_is_trained_on(make_model, init_data, toy_stream):
    torch.manual_seed(0)
    fast, slow = train_pair(lambda model: [GDumbPlugin(mem_size=30)], make_model, init_data, toy_stream)
    assert fast.plugins[0].seen == [True] * 12
    assert_same_training(fast, slow)


@pytest.mark.parametrize("granularity", ["epoch", "iteration"])
def test_lr_scheduler_plugin(granularity, make_model, init_data, toy_stream):
    def plugins(model):
        optimizer = torch.optim.SGD([model.bottleneck.values], lr=0.3)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        plugins.optimizers.append(optimizer)
        return [LRSchedulerPlugin(scheduler, step_granularity=granularity, reset_scheduler=False, reset_lr=False)]

    plugins.optimizers = []

    fast_model = initialised(make_model(), init_data)
    slow_model = copy.deepcopy(fast_model)
    fast_plugins, slow_plugins = plugins(fast_model), plugins(slow_model)
    fast = make_dkvb(fast_model, EvaluationPlugin(), "eager", [FastPathProbe(), *fast_plugins],
                     optimizer=plugins.optimizers[0])
    slow = make_dkvb(slow_model, EvaluationPlugin(), "off", slow_plugins, optimizer=plugins.optimizers[1])
    for exp in toy_stream.train_stream:
        fast.train(exp, shuffle=False)
        slow.train(exp, shuffle=False)
    assert fast.plugins[0].seen == [True] * 12
    assert plugins.optimizers[0].param_groups[0]["lr"] < 0.3  # the schedule did act
    assert plugins.optimizers[0].param_groups[0]["lr"] == plugins.optimizers[1].param_groups[0]["lr"]
    assert_same_training(fast, slow)


class LossPenaltyPlugin(SupervisedPlugin):
    """Adds a penalty to the loss in before_backward, which the fast path's closed form would miss."""

    def before_backward(self, strategy, **kwargs):
        strategy.loss = strategy.loss + 0.5 * strategy.model.bottleneck.values.square().sum()


def test_custom_plugin_with_before_backward_steps_aside(make_model, init_data, toy_stream):
    with pytest.warns(UserWarning, match="fast path off.*LossPenaltyPlugin.*not known to be exact"):
        fast, slow = train_pair(lambda model: [LossPenaltyPlugin()], make_model, init_data, toy_stream)
    assert fast.plugins[0].seen == [False] * 12
    assert_same_training(fast, slow)


def test_plugins_declare_themselves_exact_or_not():
    class Observer(SupervisedPlugin):
        dkvb_fast_path_exact = True

    class Refuses(FastPathProbe):
        dkvb_fast_path_exact = False

    assert plugin_blocker(Observer(), None) is None
    assert "declares dkvb_fast_path_exact = False" in plugin_blocker(Refuses(), None)
    assert "not known to be exact" in plugin_blocker(LossPenaltyPlugin(), None)


def test_dkvb_with_replay_plugin_equals_dkvb_plugin_inside_avalanche_replay(make_model, init_data, toy_stream):
    """DKVB + ReplayPlugin on the fast path trains like DKVBPlugin inside Avalanche's own Replay
    strategy (the generic loop): same lr, clipping cannot act, same criterion."""
    fast_model = initialised(make_model(), init_data)
    replay_model = copy.deepcopy(fast_model)
    fast = make_dkvb(fast_model, EvaluationPlugin(), "eager",
                     [FastPathProbe(), ReplayPlugin(mem_size=40)], label_smoothing=0.1)
    replay = Replay(model=replay_model, optimizer=torch.optim.SGD(replay_model.parameters(), lr=0.3),
                    criterion=nn.CrossEntropyLoss(label_smoothing=0.1), mem_size=40, train_mb_size=16,
                    train_epochs=3, eval_mb_size=256, evaluator=EvaluationPlugin(), plugins=[DKVBPlugin()])
    for strategy in (fast, replay):
        torch.manual_seed(0)
        for exp in toy_stream.train_stream:
            strategy.train(exp, shuffle=False)
    assert fast.plugins[0].seen == [True] * 12
    assert_same_training(fast, replay)


class IterationHookPlugin(SupervisedPlugin):
    def after_update(self, strategy, **kwargs):
        pass


BLOCKERS = [
    pytest.param(dict(optimizer="adam", allow_nonlocal_optimizer=True), "not plain torch.optim.SGD", id="adam"),
    pytest.param(dict(optimizer="momentum", allow_nonlocal_optimizer=True), "momentum", id="momentum"),
    pytest.param(dict(decoder="linear"), "mean decoder", id="linear_decoder"),
    pytest.param(dict(decoder="mlp"), "mean decoder", id="mlp_decoder"),
    pytest.param(dict(clip_grad_norm=0.1), "gradient clipping", id="clip"),
    pytest.param(dict(criterion=nn.NLLLoss()), "CrossEntropyLoss", id="criterion"),
    pytest.param(dict(plugin=IterationHookPlugin()), "IterationHookPlugin", id="unknown_plugin"),
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
    probe = FastPathProbe()
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
    probe = FastPathProbe()
    strategy = make_dkvb(model, quiet_evaluator(), "eager", [probe], epochs=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fast path off.*")
        strategy.train(toy_stream.train_stream[0])
    assert probe.seen == [True, True]


def test_periodic_eval_per_epoch_keeps_fast_path_per_iteration_does_not(make_model, quiet_evaluator, init_data,
                                                                       toy_stream):
    model = initialised(make_model(), init_data)
    probe = FastPathProbe()
    strategy = make_dkvb(model, quiet_evaluator(), "eager", [probe], epochs=2, eval_every=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fast path off.*")
        strategy.train(toy_stream.train_stream[0], eval_streams=[toy_stream.test_stream[:1]])
    assert probe.seen == [True, True]
    assert model.training  # periodic evaluation switched the model back to training mode

    from avalanche.training.templates.base_sgd import PeriodicEval
    assert "every N iterations" in plugin_blocker(PeriodicEval(eval_every=5, peval_mode="iteration"), None)


def test_fast_path_threads_is_explicit(make_model, quiet_evaluator, init_data, toy_stream):
    model = initialised(make_model(), init_data)
    seen = []

    class ThreadProbe(FastPathProbe):
        def after_training_iteration(self, strategy, **kwargs):
            seen.append(torch.get_num_threads())

    torch.set_num_threads(2)
    make_dkvb(model, quiet_evaluator(), "eager", [ThreadProbe()], epochs=1).train(toy_stream.train_stream[0])
    assert set(seen) == {2} and torch.get_num_threads() == 2  # None: the process's setting is left alone
    seen.clear()
    make_dkvb(model, quiet_evaluator(), "eager", [ThreadProbe()], epochs=1,
              fast_path_threads=1).train(toy_stream.train_stream[1])
    assert set(seen) == {1} and torch.get_num_threads() == 2  # restored afterwards


def test_unknown_fast_path_mode_is_named(make_model, quiet_evaluator):
    with pytest.raises(ValueError, match=r"fast_path must be one of .*got True"):
        DKVB(model=make_model(), evaluator=quiet_evaluator(), fast_path=True)


def test_naive_with_dkvb_plugin_optimises_only_the_values(make_model, init_data, toy_stream):
    model = make_model()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3), train_epochs=1,
                     evaluator=EvaluationPlugin(), plugins=[DKVBPlugin(init_data, key_init_kwargs=KEY_INIT)])
    strategy.train(toy_stream.train_stream[0])
    assert [id(p) for p in strategy.optimizer.param_groups[0]["params"]] == [id(model.bottleneck.values)]
    assert list(strategy.optimized_param_id) == ["bottleneck.values"]


class StopAfterTwoIterations(SupervisedPlugin):
    """Stops training after the second iteration of each experience, mid-epoch."""

    dkvb_fast_path_exact = True

    def before_training_exp(self, strategy, **kwargs):
        self.iterations = 0

    def after_training_iteration(self, strategy, **kwargs):
        self.iterations += 1
        if self.iterations == 2:
            strategy.stop_training()


@pytest.mark.parametrize("replay", [False, True], ids=["own_loader", "replay_loader"])
def test_stopping_mid_epoch_counts_only_the_batches_trained_on(replay, make_model, init_data, toy_stream):
    plugins = (lambda model: [StopAfterTwoIterations(), ReplayPlugin(mem_size=8)]) if replay else \
        (lambda model: [StopAfterTwoIterations()])
    fast, slow = train_pair(plugins, make_model, init_data, toy_stream)
    assert fast.plugins[0].seen == [True] * 4  # Avalanche ends the experience after the stopped epoch
    batches = 16 + 3 * (16 + 8) if replay else 4 * 16  # 2 batches per experience; replay adds 8 per batch
    assert int(fast.model.bottleneck.usage_counts[0].sum()) == 2 * batches
    assert_same_training(fast, slow)


def test_avalanche_eval_plugin_example_metrics_and_loggers_agree(make_model, init_data, toy_stream, tmp_path):
    """The metric set of Avalanche's examples/eval_plugin.py with every logger attached: each curve on
    the fast path equals the generic loop's (timings and system usage excepted), none is missing."""
    import io

    from avalanche.evaluation.metrics import (bwt_metrics, confusion_matrix_metrics, cpu_usage_metrics,
                                              disk_usage_metrics, forgetting_metrics, ram_usage_metrics)
    from avalanche.logging import CSVLogger, InteractiveLogger, TensorboardLogger, TextLogger

    def evaluator(folder):
        return EvaluationPlugin(
            accuracy_metrics(minibatch=True, epoch=True, experience=True, stream=True),
            loss_metrics(minibatch=True, epoch=True, experience=True, stream=True),
            timing_metrics(epoch=True, epoch_running=True), cpu_usage_metrics(experience=True),
            forgetting_metrics(experience=True, stream=True), bwt_metrics(stream=True),
            confusion_matrix_metrics(num_classes=8, save_image=False, stream=True),
            disk_usage_metrics(epoch=True), ram_usage_metrics(every=0.5, epoch=True),
            loggers=[InteractiveLogger(), TextLogger(io.StringIO()), TensorboardLogger(folder), CSVLogger(folder)])

    curves = {}
    for fast_path in ("eager", "off"):
        model = initialised(make_model(), init_data)
        strategy = make_dkvb(model, evaluator(tmp_path / fast_path), fast_path, epochs=2)
        for exp in toy_stream.train_stream:
            strategy.train(exp, shuffle=False)
            strategy.eval(toy_stream.test_stream)
        curves[fast_path] = strategy.evaluator.get_all_metrics()
    assert curves["eager"].keys() == curves["off"].keys()
    compared = [name for name in curves["off"]
                if not name.startswith(("Time", "RunningTime", "CPU", "Disk", "MaxRAM", "ConfusionMatrix"))]
    assert len(compared) >= 15
    for name in compared:
        fast, slow = curves["eager"][name][1], curves["off"][name][1]
        assert len(fast) == len(slow) and max(abs(a - b) for a, b in zip(fast, slow)) < 1e-5, name


def test_row_indices_are_int32_exactly_while_int32_holds_every_row():
    assert row_dtype(256 * 4096) == torch.int32
    assert row_dtype(2**31 - 1) == torch.int32  # the last row index, 2**31 - 2, fits
    assert row_dtype(2**31) == torch.long


def test_early_stopping_per_epoch_keeps_fast_path_per_iteration_does_not(make_model, init_data, toy_stream):
    """Per iteration EarlyStoppingPlugin snapshots and restores the model mid-epoch, where the fast path's
    usage counts are not yet added: it must step aside (with a warning) and train as fast_path="off"."""
    from avalanche.training.plugins import EarlyStoppingPlugin

    def train(mode, peval_mode):
        model = initialised(make_model(), init_data)
        probe = FastPathProbe()
        stopper = EarlyStoppingPlugin(patience=1, val_stream_name="train_stream", peval_mode=peval_mode)
        strategy = make_dkvb(model, EvaluationPlugin(accuracy_metrics(stream=True)), mode, [probe, stopper],
                             epochs=6, eval_every=1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*EarlyStopping will not be triggered.*")
            strategy.train(toy_stream.train_stream[0], shuffle=False)
        return strategy, probe

    fast, probe = train("eager", "epoch")
    assert all(probe.seen) and len(probe.seen) > 1
    assert_same_training(fast, train("off", "epoch")[0])
    with pytest.warns(UserWarning, match="fast path off.*EarlyStoppingPlugin.*every iteration"):
        fast, probe = train("eager", "iteration")
    assert not any(probe.seen)
    assert_same_training(fast, train("off", "iteration")[0])


@pytest.mark.parametrize("loader", ["drop_last", "two_task_labels"])
def test_loaders_that_shape_their_batches_are_iterated_as_they_are(loader, make_model, init_data):
    """train(drop_last=True) drops the last partial batch; an experience with two task labels is loaded
    task-balanced (oversampling the smaller): the fast path trains on those batches, as the generic loop."""
    from avalanche.benchmarks import dataset_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 2, generator=g), torch.randint(0, 8, (40,), generator=g)
    tasks = torch.tensor([0] * 32 + [1] * 8) if loader == "two_task_labels" else torch.zeros(40, dtype=torch.long)
    experience = dataset_benchmark([tensor_dataset(x, y, task_labels=tasks)], [tensor_dataset(x, y)]).train_stream[0]
    options = {"drop_last": True} if loader == "drop_last" else {}
    strategies = []
    for mode in ("eager", "off"):
        probe = FastPathProbe()
        strategy = make_dkvb(initialised(make_model(), init_data), EvaluationPlugin(), mode, [probe], epochs=2)
        strategy.train(experience, shuffle=False, **options)
        strategies.append(strategy)
    fast, slow = strategies
    assert fast.plugins[0].seen == [True, True]
    # plain batches of 16 would be 3 an epoch; dropping the last leaves 2; balancing gives 8 + 8 a batch,
    # so task 0's 32 samples take 4 (task 1's 8 oversampled)
    assert fast.clock.train_exp_iterations == slow.clock.train_exp_iterations == 2 * (2 if loader == "drop_last" else 4)
    assert_same_training(fast, slow)


def test_training_transforms_are_applied_on_the_fast_path_as_in_the_generic_loop(make_model, init_data):
    """An experience with a random training transform (noise, like upstream's RandomCrop): the fast path
    iterates the real loader, so it trains on the transformed inputs, with the same random draws, as the
    generic loop (it used to train on the eval-mode inputs, silently)."""
    from avalanche.benchmarks import dataset_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 2, generator=g), torch.randint(0, 8, (40,), generator=g)
    noisy = tensor_dataset(x, y).replace_current_transform_group((lambda v: v + 0.3 * torch.randn_like(v), None))
    experience = dataset_benchmark([noisy], [tensor_dataset(x, y)]).train_stream[0]
    strategies = []
    for mode in ("eager", "off"):
        torch.manual_seed(1)
        probe = FastPathProbe()
        strategy = make_dkvb(initialised(make_model(), init_data), EvaluationPlugin(), mode, [probe], epochs=2)
        strategy.train(experience, shuffle=False)
        strategies.append(strategy)
    fast, slow = strategies
    assert fast.plugins[0].seen == [True, True]
    assert_same_training(fast, slow)
    from avalanche_dkvb.strategy import _has_training_transforms
    before = torch.random.get_rng_state()
    assert _has_training_transforms(noisy) and not _has_training_transforms(tensor_dataset(x, y))
    assert torch.equal(torch.random.get_rng_state(), before)  # the probe draws nothing the run would see


def test_optimizer_step_hooks_run_around_the_fast_update_as_in_the_generic_loop(make_model, init_data, toy_stream):
    """Step pre- and post-hooks see the values before and after each update on both paths (the fast
    path used to skip optimizer.step(), so hooks never ran and StepLR warned about the call order)."""
    def plugins(model):
        optimizer = torch.optim.SGD([model.bottleneck.values], lr=0.3)
        seen = []
        optimizer.register_step_pre_hook(lambda *_: seen.append(("pre", model.bottleneck.values.sum().item())))
        optimizer.register_step_post_hook(lambda *_: seen.append(("post", model.bottleneck.values.sum().item())))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        plugins.made.append((optimizer, seen))
        return [LRSchedulerPlugin(scheduler, step_granularity="iteration", reset_scheduler=False, reset_lr=False)]

    plugins.made = []
    fast_model = initialised(make_model(), init_data)
    slow_model = copy.deepcopy(fast_model)
    fast_plugins, slow_plugins = plugins(fast_model), plugins(slow_model)
    (fast_optimizer, fast_seen), (slow_optimizer, slow_seen) = plugins.made
    fast = make_dkvb(fast_model, EvaluationPlugin(), "eager", [FastPathProbe(), *fast_plugins],
                     optimizer=fast_optimizer)
    slow = make_dkvb(slow_model, EvaluationPlugin(), "off", slow_plugins, optimizer=slow_optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in toy_stream.train_stream:
            fast.train(exp, shuffle=False)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    for exp in toy_stream.train_stream:
        slow.train(exp, shuffle=False)
    assert all(fast.plugins[0].seen)
    assert len(fast_seen) == len(slow_seen) > 0
    assert [kind for kind, _ in fast_seen] == [kind for kind, _ in slow_seen]
    assert any(after != before for (_, before), (_, after) in zip(fast_seen[::2], fast_seen[1::2]))
    assert [total for _, total in fast_seen] == pytest.approx([total for _, total in slow_seen], abs=1e-5)
    assert_same_training(fast, slow)
