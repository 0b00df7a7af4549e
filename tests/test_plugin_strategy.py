"""DKVBPlugin and the DKVB strategy inside Avalanche: frozen keys, local value updates, masking after
training, frozen encoder, logging, optimizer restriction and refusal of non-local optimizers."""

from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.logging import CSVLogger
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_dkvb import DKVB, DKVBPlugin, check_local_optimizer, create_dkvb_model, ema_init_keys

KEY_INIT = {"epochs": 5, "batch_size": 64}
PATHS = [pytest.param("eager", id="fast"), pytest.param("off", id="generic")]  # "compiled": test_fast_path.py


def make_dkvb(model, evaluator, init_data=None, fast_path="eager", epochs=3, key_init_kwargs=KEY_INIT, **kwargs):
    return DKVB(model=model, train_mb_size=16, train_epochs=epochs, eval_mb_size=256, evaluator=evaluator,
                init_data=init_data, key_init_kwargs=key_init_kwargs, fast_path=fast_path, **kwargs)


def train_stream(strategy, stream, **kwargs):
    for exp in stream.train_stream:
        strategy.train(exp, **kwargs)


def initialised(model, init_data):
    """Keys initialised by EMA on ``init_data`` and frozen, as the plugin does."""
    ema_init_keys(model.bottleneck, init_data, generator=torch.Generator().manual_seed(0), **KEY_INIT)
    model.bottleneck.freeze_keys()
    return model


def stream_tensors(stream, which="test"):
    xs, ys = [], []
    for exp in getattr(stream, f"{which}_stream"):
        for x, y, *_ in torch.utils.data.DataLoader(exp.dataset, batch_size=1000):
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


# -- 3. keys (and heads) never move during continual training -----------------------------------------
@pytest.mark.parametrize("fast_path", PATHS)
def test_keys_and_projection_bit_identical_through_training(fast_path, make_model, quiet_evaluator,
                                                             init_data, toy_stream):
    model = make_model()
    random_keys = model.bottleneck.keys.clone()
    strategy = make_dkvb(model, quiet_evaluator(), init_data, fast_path=fast_path)
    strategy.train(toy_stream.train_stream[0])  # the plugin initialises and freezes the keys here
    assert bool(model.bottleneck.keys_frozen)
    assert not torch.equal(random_keys, model.bottleneck.keys)  # initialisation did happen
    keys, projection = model.bottleneck.keys.clone(), model.bottleneck.projection.clone()
    values = model.bottleneck.values.detach().clone()
    for exp in toy_stream.train_stream[1:]:
        strategy.train(exp)
        strategy.eval(toy_stream.test_stream[:1])
    assert torch.equal(keys, model.bottleneck.keys)
    assert torch.equal(projection, model.bottleneck.projection)
    assert not torch.equal(values, model.bottleneck.values.detach())  # training did happen


# -- 4. values of keys never selected stay bit-identical --------------------------------------------
@pytest.mark.parametrize("fast_path", PATHS)
def test_unselected_values_bit_identical(fast_path, make_model, quiet_evaluator, init_data, toy_stream):
    model = initialised(make_model(), init_data)
    before = model.bottleneck.values.detach().clone()
    strategy = make_dkvb(model, quiet_evaluator(), fast_path=fast_path)
    train_stream(strategy, toy_stream)
    unused = model.bottleneck.usage_counts == 0  # (C, K)
    assert unused.any() and (~unused).any()
    after = model.bottleneck.values.detach()
    assert torch.equal(after[unused], before[unused])
    assert (after[~unused] != before[~unused]).any(dim=-1).all()  # every selected key's value moved


def test_weight_decay_moves_unselected_values(make_model, quiet_evaluator, init_data, toy_stream):
    """Control: with a non-local optimizer (allowed explicitly) the unselected values do move, so
    the test above can detect it."""
    model = initialised(make_model(), init_data)
    before = model.bottleneck.values.detach().clone()
    opt = torch.optim.SGD([model.bottleneck.values], lr=0.3, weight_decay=0.1)
    with pytest.warns(UserWarning, match="fast path off"):
        strategy = make_dkvb(model, quiet_evaluator(), optimizer=opt, allow_nonlocal_optimizer=True, epochs=1)
        strategy.train(toy_stream.train_stream[0])
    unused = model.bottleneck.usage_counts == 0
    assert unused.any()
    assert not torch.equal(model.bottleneck.values.detach()[unused], before[unused])


# -- 5. masking of unused keys after training --------------------------------------------------------
@pytest.mark.parametrize("fast_path", PATHS)
def test_eval_uses_only_keys_used_in_training(fast_path, make_model, quiet_evaluator, init_data, toy_stream):
    model = make_model()
    strategy = make_dkvb(model, quiet_evaluator(), init_data, fast_path=fast_path, epochs=2)
    train_stream(strategy, toy_stream)
    bn = model.bottleneck
    # usage counts: every training sample selected one key per codebook in each of 2 epochs
    n_train = sum(len(exp.dataset) for exp in toy_stream.train_stream)
    assert bn.usage_counts.sum(1).tolist() == [2 * n_train] * bn.num_codebooks

    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 30), torch.linspace(0, 1, 30), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    model.eval()
    flat = bn.flat_indices(grid, only_used=True)
    assert (bn.usage_counts.view(-1)[flat] > 0).all()
    # unmasked search on the whole square does hit unused keys, so the masking matters here
    assert (bn.usage_counts.view(-1)[bn.flat_indices(grid, only_used=False)] == 0).any()

    # Behaviour of forward itself: unused keys get a huge value, used keys 0 -> eval logits all 0.
    with torch.no_grad():
        unused = (bn.usage_counts == 0).unsqueeze(-1)
        bn.values.copy_(torch.where(unused, torch.full_like(bn.values, 1e3), torch.zeros_like(bn.values)))
    assert torch.equal(model(grid), torch.zeros(len(grid), 8))
    model.train()
    assert model(grid).max() >= 1e3 / bn.num_codebooks  # training-mode lookup is not masked


# -- 7. frozen encoder through training ------------------------------------------------------------
@pytest.mark.parametrize("fast_path", PATHS)
def test_encoder_frozen_through_strategy(fast_path, quiet_evaluator, init_data, toy_stream):
    encoder = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model = create_dkvb_model(4, 8, num_codebooks=4, num_keys=16, key_dim=2, encoder=encoder)
    stats = copy.deepcopy(encoder.state_dict())
    modes = []
    encoder.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    strategy = make_dkvb(model, quiet_evaluator(), init_data, fast_path=fast_path, epochs=2)
    train_stream(strategy, toy_stream)
    strategy.eval(toy_stream.test_stream)
    assert modes and not any(modes)  # every encoder call ran in eval mode
    assert all(not m.training for m in encoder.modules())
    for name, value in encoder.state_dict().items():
        assert torch.equal(stats[name], value), name  # BatchNorm running stats and weights unchanged
    encoder_ids = {id(p) for p in encoder.parameters()}
    optimised = [p for g in strategy.optimizer.param_groups for p in g["params"]]
    assert optimised and not encoder_ids & {id(p) for p in optimised}
    assert all(not p.requires_grad for p in encoder.parameters())


# -- 9. plugin in real Avalanche strategies, with CSV logging ----------------------------------------
def rotation_encoder():
    """A 2->2 linear encoder with parameters and a fixed, well-conditioned map (a random one can
    nearly collapse the plane and merge classes, which is not DKVB's doing)."""
    encoder = nn.Linear(2, 2)
    with torch.no_grad():
        encoder.weight.copy_(torch.tensor([[1.0, 0.5], [-0.5, 1.0]]))
        encoder.bias.zero_()
    return encoder


# 8 codebooks of 16 keys in 2-d: with the authors' dead-key rule (the default) the weakest experience
# reaches 0.775 here, with the "reset" rule above 0.8; this test is about the plugin inside Avalanche.
RESET_KEY_INIT = dict(KEY_INIT, dead_key_rule="reset")


def _naive_with_plugin(model, evaluator, init_data):
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.3),
                 criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=5, eval_mb_size=256,
                 evaluator=evaluator, plugins=[DKVBPlugin(init_data=init_data, key_init_kwargs=RESET_KEY_INIT)])


@pytest.mark.parametrize("kind", ["naive_plugin", "dkvb"])
def test_plugin_in_avalanche_strategy_logs_csv(kind, tmp_path, init_data, toy_stream):
    encoder = rotation_encoder()  # has parameters, which must not be optimised
    model = create_dkvb_model(2, 8, num_codebooks=8, num_keys=16, key_dim=2, encoder=encoder)
    evaluator = EvaluationPlugin(accuracy_metrics(epoch=True, experience=True, stream=True),
                                 loggers=[CSVLogger(str(tmp_path))])
    if kind == "naive_plugin":
        strategy = _naive_with_plugin(model, evaluator, init_data)
    else:
        strategy = make_dkvb(model, evaluator, init_data, epochs=5, key_init_kwargs=RESET_KEY_INIT)
    encoder_weight = encoder.weight.detach().clone()
    for exp in toy_stream.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(toy_stream.test_stream)
        params = strategy.optimizer.param_groups[0]["params"]
        assert [id(p) for p in params] == [id(model.bottleneck.values)]
    assert torch.equal(encoder_weight, encoder.weight)
    assert bool(model.bottleneck.keys_frozen)
    final = metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert final > 0.9  # DKVB keeps the earlier classes

    with open(tmp_path / "eval_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 4  # 4 evaluations x 4 test experiences
    accuracies = [float(r["eval_accuracy"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    last = {int(r["eval_exp"]): float(r["eval_accuracy"]) for r in rows if int(r["training_exp"]) == 3}
    assert sorted(last) == [0, 1, 2, 3] and min(last.values()) > 0.8
    with open(tmp_path / "training_results.csv") as f:
        train_rows = list(csv.DictReader(f))
    assert len(train_rows) == 4 * 5  # one row per training epoch
    assert "training_accuracy" in train_rows[0]


@pytest.mark.parametrize("kind", ["naive_plugin", "dkvb"])
def test_plugin_without_init_data_warns_and_uses_first_experience(kind, make_model, quiet_evaluator, toy_stream):
    model = make_model()
    random_keys = model.bottleneck.keys.clone()
    strategy = (_naive_with_plugin(model, quiet_evaluator(), None) if kind == "naive_plugin"
                else make_dkvb(model, quiet_evaluator(), None, epochs=1))
    with pytest.warns(UserWarning, match="no init_data"):
        strategy.train(toy_stream.train_stream[0])
    assert bool(model.bottleneck.keys_frozen)
    assert not torch.equal(random_keys, model.bottleneck.keys)
    # the keys were fitted to the first experience: lower quantisation error there than random keys
    x0 = torch.cat([x for x, *_ in torch.utils.data.DataLoader(toy_stream.train_stream[0].dataset, 1000)])
    fresh = make_model()
    assert model.bottleneck.quantization_error(x0) < 0.5 * fresh.bottleneck.quantization_error(x0)
    keys = model.bottleneck.keys.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no second initialisation / warning
        warnings.filterwarnings("ignore", module="avalanche")
        strategy.train(toy_stream.train_stream[1])
    assert torch.equal(keys, model.bottleneck.keys)


def test_plugin_keeps_parametric_decoder_in_optimizer(quiet_evaluator, init_data, toy_stream):
    encoder = rotation_encoder()
    model = create_dkvb_model(2, 8, num_codebooks=4, num_keys=16, key_dim=2, value_dim=3, decoder="linear",
                              encoder=encoder)
    strategy = _naive_with_plugin(model, quiet_evaluator(), init_data)
    strategy.train_epochs = 1
    strategy.train(toy_stream.train_stream[0])
    params = {id(p) for p in strategy.optimizer.param_groups[0]["params"]}
    expected = {id(model.bottleneck.values), id(model.decoder.linear.weight), id(model.decoder.linear.bias)}
    assert params == expected


def test_plugin_and_strategy_need_a_dkvb_model(quiet_evaluator, toy_stream):
    with pytest.raises(TypeError, match="DKVBModel"):
        DKVB(model=nn.Linear(2, 8), evaluator=quiet_evaluator())
    net = nn.Linear(2, 8)
    strategy = Naive(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), train_epochs=1,
                     evaluator=quiet_evaluator(), plugins=[DKVBPlugin()])
    with pytest.raises(TypeError, match="DKVBModel"):
        strategy.train(toy_stream.train_stream[0])


# -- 12. non-local optimizers are refused, by name ---------------------------------------------------
BAD_OPTIMIZERS = [
    pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "momentum=0.9", id="momentum"),
    pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-4), "weight_decay=0.0001",
                 id="weight_decay"),
    pytest.param(lambda ps: torch.optim.Adam(ps, lr=0.01), "Adam", id="adam"),
]


@pytest.mark.parametrize("make_opt, named", BAD_OPTIMIZERS)
def test_check_local_optimizer_names_the_problem(make_opt, named):
    with pytest.raises(ValueError, match=named):
        check_local_optimizer(make_opt([nn.Parameter(torch.zeros(3))]))
    check_local_optimizer(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))  # plain SGD is fine


@pytest.mark.parametrize("make_opt, named", BAD_OPTIMIZERS)
def test_dkvb_refuses_nonlocal_optimizers_when_constructed(make_opt, named, make_model, quiet_evaluator, init_data):
    model = make_model()
    with pytest.raises(ValueError, match=named):
        make_dkvb(model, quiet_evaluator(), init_data, optimizer=make_opt(model.parameters()), epochs=1)


@pytest.mark.parametrize("make_opt, named", BAD_OPTIMIZERS)
def test_plugin_refuses_nonlocal_optimizers_before_key_initialisation(make_opt, named, make_model, quiet_evaluator,
                                                                     init_data, toy_stream):
    model = make_model()
    strategy = Naive(model=model, optimizer=make_opt(model.parameters()), train_epochs=1, evaluator=quiet_evaluator(),
                     plugins=[DKVBPlugin(init_data, key_init_kwargs=KEY_INIT)])
    keys, values = model.bottleneck.keys.clone(), model.bottleneck.values.detach().clone()
    with pytest.raises(ValueError, match=named):
        strategy.train(toy_stream.train_stream[0])
    assert not bool(model.bottleneck.keys_frozen) and torch.equal(keys, model.bottleneck.keys)  # no key init ran
    assert torch.equal(values, model.bottleneck.values.detach())  # refused before any step


@pytest.mark.parametrize("kind", ["naive_plugin", "dkvb"])
@pytest.mark.parametrize("make_opt, named", BAD_OPTIMIZERS)
def test_nonlocal_optimizers_accepted_when_allowed(make_opt, named, kind, make_model, quiet_evaluator,
                                                   init_data, toy_stream):
    model = make_model()
    opt = make_opt(model.parameters())
    if kind == "dkvb":
        strategy = make_dkvb(model, quiet_evaluator(), init_data, optimizer=opt, epochs=1,
                             allow_nonlocal_optimizer=True)
    else:
        strategy = Naive(model=model, optimizer=opt, train_epochs=1, evaluator=quiet_evaluator(),
                         plugins=[DKVBPlugin(init_data, key_init_kwargs=KEY_INIT, allow_nonlocal_optimizer=True)])
    values = model.bottleneck.values.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.train(toy_stream.train_stream[0])
    assert not torch.equal(values, model.bottleneck.values.detach())
