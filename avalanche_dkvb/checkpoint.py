"""Save and resume an Avalanche strategy between training experiences, in a safe format.

Avalanche's own ``save_checkpoint`` fails on this stack (``PicklingError: Can't pickle sentinel``)
and leaves a truncated file on which ``maybe_load_checkpoint`` then fails. These two functions do
the same job for the strategies of this project, after a finished experience (``train`` and
``eval``) of a plain Avalanche loop::

    for i, experience in enumerate(stream):
        if i < start:
            continue
        strategy.train(experience)
        strategy.eval(test_stream)
        save_training_state(path, strategy, {"next_experience": i + 1})

    # later, in a fresh process, on a strategy built exactly as before:
    start = load_training_state(path, strategy)["next_experience"]

The file holds the model's ``state_dict`` (a DKVB model's values, keys, usage counts and
``keys_frozen`` flag are among its buffers and parameters), the optimizer's state, the strategy's
between-experience state (EWC's saved parameters and importances, LwF's previous model, SI's
trajectories and anchors, CountValues' class counts), Avalanche's ``clock`` counters, the RNG
states (torch CPU and, where in use, CUDA; numpy; python ``random``), the history of the headline
metrics of :mod:`avalanche_dkvb.metrics` found in the evaluator (``AccuracyMatrix.rows``,
``ClassBalancedAccuracy.history``, ``SeenClassesAccuracy.history`` and ``.seen_classes``, every
``BottleneckDiagnostic.history``), and the caller's ``extra`` dict. It is written with ``torch.save``
through :func:`avalanche_dkvb.atomic_files.atomic_write` (a killed process leaves the previous
file) and read back with ``torch.load(weights_only=True)``: tensors, dicts, lists, strings and
numbers only, no pickled objects.

Strategies whose state between experiences cannot be saved this way are refused with a
:class:`CheckpointError` naming them (Replay's and GDumb's buffers and Cumulative's dataset are
datasets of the stream, not tensors), as are unknown strategies and plugins: a plugin holding no
state between experiences can declare ``checkpoint_stateless = True``. Other metrics of the
evaluator (Avalanche's accuracy, forgetting, BWT) are not saved: after a resume the values they
log are relative to the resumed process.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict

import numpy as np
import torch

from avalanche_dkvb.atomic_files import atomic_write

__all__ = ["CheckpointError", "FORMAT", "checkpoint_refusal", "describe_differences", "load_training_state",
           "read_extra", "save_training_state"]

FORMAT = "avalanche_dkvb.training_state/1"


class CheckpointError(ValueError):
    """A strategy that cannot be saved, or a checkpoint that is damaged or does not match."""


# -- what each strategy keeps between experiences -------------------------------------------------

def _param_data_dict(params: dict) -> dict:
    return {name: p.data.detach().clone() for name, p in params.items()}


def _to_param_data_dict(saved: dict) -> dict:
    from avalanche.training.utils import ParamData
    return {name: ParamData(name, init_tensor=tensor.clone(), device=tensor.device) for name, tensor in saved.items()}


def _ewc_plugin(strategy):
    from avalanche.training.plugins import EWCPlugin
    return next(p for p in strategy.plugins if isinstance(p, EWCPlugin))


def _save_ewc(strategy) -> dict:
    plugin = _ewc_plugin(strategy)
    return {"saved_params": {str(k): _param_data_dict(v) for k, v in plugin.saved_params.items()},
            "importances": {str(k): _param_data_dict(v) for k, v in plugin.importances.items()}}


def _load_ewc(strategy, state: dict) -> None:
    plugin = _ewc_plugin(strategy)
    restored = {name: defaultdict(dict, {int(k): _to_param_data_dict(v) for k, v in state[name].items()})
                for name in ("saved_params", "importances")}  # both read before either is set
    for name, value in restored.items():
        setattr(plugin, name, value)


def _lwf(strategy):
    from avalanche.training.plugins import LwFPlugin
    return next(p for p in strategy.plugins if isinstance(p, LwFPlugin)).lwf


def _save_lwf(strategy) -> dict:
    lwf = _lwf(strategy)
    return {"prev_model": None if lwf.prev_model is None else lwf.prev_model.state_dict(),
            "expcount": int(lwf.expcount),
            "prev_classes_by_task": {str(t): sorted(int(c) for c in cs) for t, cs in lwf.prev_classes_by_task.items()}}


def _load_lwf(strategy, state: dict) -> None:
    import copy
    lwf = _lwf(strategy)
    prev_model = None
    if state["prev_model"] is not None:
        prev_model = copy.deepcopy(strategy.model)
        prev_model.load_state_dict(state["prev_model"])
    classes = defaultdict(set, {int(t): set(cs) for t, cs in state["prev_classes_by_task"].items()})
    lwf.prev_model, lwf.expcount, lwf.prev_classes_by_task = prev_model, state["expcount"], classes


def _si_plugin(strategy):
    from avalanche.training.plugins import SynapticIntelligencePlugin
    return next(p for p in strategy.plugins if isinstance(p, SynapticIntelligencePlugin))


def _save_si(strategy) -> dict:
    plugin = _si_plugin(strategy)
    return {"ewc_data": [_param_data_dict(d) for d in plugin.ewc_data],
            "syn_data": {k: _param_data_dict(v) for k, v in plugin.syn_data.items()}}


def _load_si(strategy, state: dict) -> None:
    plugin = _si_plugin(strategy)
    plugin.ewc_data = tuple(_to_param_data_dict(d) for d in state["ewc_data"])
    plugin.syn_data = {k: _to_param_data_dict(v) for k, v in state["syn_data"].items()}


def _save_counts(strategy) -> dict:
    return strategy.count_state()


def _load_counts(strategy, state: dict) -> None:
    strategy.load_count_state(state)


def _nothing(strategy) -> dict:
    return {}


def _load_nothing(strategy, state: dict) -> None:
    pass


def _strategy_handlers() -> dict:
    """Strategy class -> (save, load) of its state outside the model and optimizer."""
    from avalanche.training import EWC, LwF, Naive

    from avalanche_dkvb.baselines import (BatchedStreamingLDA, CopyingSynapticIntelligence, NearestClassMean,
                                          RandomProjectionRidge)
    from avalanche_dkvb.count_values import CountValues
    from avalanche_dkvb.moment_values import MomentValues
    from avalanche_dkvb.strategy import DKVB
    plain = (_nothing, _load_nothing)  # everything in the model (closed-form sums are buffers)
    return {DKVB: plain, Naive: plain, NearestClassMean: plain, BatchedStreamingLDA: plain,
            RandomProjectionRidge: plain, EWC: (_save_ewc, _load_ewc), LwF: (_save_lwf, _load_lwf),
            CopyingSynapticIntelligence: (_save_si, _load_si), CountValues: (_save_counts, _load_counts),
            MomentValues: (_save_counts, _load_counts)}


REFUSED = {"Replay": "its replay buffer is a dataset of the stream's samples",
           "GDumb": "its class-balanced buffer is a dataset of the stream's samples",
           "Cumulative": "it keeps the concatenated dataset of every experience so far"}


def _known_plugin_types() -> tuple:
    from avalanche.training.plugins import EvaluationPlugin, EWCPlugin, LwFPlugin, SynapticIntelligencePlugin
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval

    from avalanche_dkvb.in_memory_batches import InMemoryBatchesPlugin
    from avalanche_dkvb.plugin import DKVBPlugin
    # EWC/LwF/SI plugins are saved by their strategy's handler; the others hold nothing between experiences
    return (Clock, PeriodicEval, EvaluationPlugin, EWCPlugin, LwFPlugin, SynapticIntelligencePlugin, InMemoryBatchesPlugin,
            DKVBPlugin)


def checkpoint_refusal(strategy) -> str | None:
    """Why ``strategy`` cannot be checkpointed between experiences (None if it can)."""
    name = type(strategy).__name__
    handlers = _strategy_handlers()
    if type(strategy) not in handlers:
        reason = REFUSED.get(name, "its state between experiences is not known to avalanche_dkvb.checkpoint")
        return f"cannot save the training state of strategy {name}: {reason}"
    known = _known_plugin_types()
    for plugin in strategy.plugins:
        if not isinstance(plugin, known) and not getattr(plugin, "checkpoint_stateless", False):
            return (f"cannot save the training state of strategy {name}: plugin {type(plugin).__name__} may hold "
                    f"state between experiences (set checkpoint_stateless = True on it if it does not)")
    return None


# -- metrics, RNG, clock ---------------------------------------------------------------------------

def _metric_state(metric) -> dict | None:
    from avalanche_dkvb.metrics import (AccuracyMatrix, BottleneckDiagnostic, ClassBalancedAccuracy,
                                        SeenClassesAccuracy)
    if isinstance(metric, AccuracyMatrix):
        return {"rows": [list(map(float, row)) for row in metric.rows]}
    if isinstance(metric, SeenClassesAccuracy):
        return {"history": list(map(float, metric.history)), "seen_classes": sorted(metric.seen_classes)}
    if isinstance(metric, ClassBalancedAccuracy):
        return {"history": list(map(float, metric.history))}
    if isinstance(metric, BottleneckDiagnostic):
        return {"history": list(map(float, metric.history))}
    return None


def _load_metric_state(metric, state: dict) -> None:
    if "rows" in state:
        metric.rows = [list(row) for row in state["rows"]]
    if "history" in state:
        metric.history = list(state["history"])
    if "seen_classes" in state:
        metric.seen_classes = set(state["seen_classes"])


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            # the fast path shuffles with the generator of the data's device
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda"):  # absent from older checkpoints; empty where CUDA was not in use
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def _metrics(strategy) -> list:
    evaluator = getattr(strategy, "evaluator", None)
    return list(getattr(evaluator, "metrics", []) or [])


SETTING_NAMES = ("value_rule", "smoothing", "distance_temperature", "moment_weight", "prior_strength")


def _settings(strategy) -> dict:
    """The hyperparameters the saved state depends on beyond its shapes: the bottleneck's top-k lookup,
    the decoder, the loss's label smoothing and the count or moment values' rule."""
    model = strategy.model
    bottleneck, decoder = getattr(model, "bottleneck", None), getattr(model, "decoder", None)
    criterion = getattr(strategy, "_criterion", None)
    settings = {name: getattr(strategy, name) for name in SETTING_NAMES if hasattr(strategy, name)}
    if bottleneck is not None:
        settings.update(top_k=int(bottleneck.top_k), top_k_reduction=str(bottleneck.top_k_reduction))
    if decoder is not None:
        settings["decoder"] = type(decoder).__name__
    if isinstance(getattr(criterion, "label_smoothing", None), float):
        settings["label_smoothing"] = criterion.label_smoothing
    return settings


def _fingerprint(strategy) -> dict:
    """What must match between the saving and the loading strategy."""
    return {"strategy": type(strategy).__name__,
            **{k: int(getattr(strategy, k)) for k in ("train_epochs", "train_mb_size", "eval_mb_size")
               if isinstance(getattr(strategy, k, None), int)},
            "model": type(strategy.model).__name__,
            "parameters": {k: list(v.shape) for k, v in strategy.model.state_dict().items()},
            "metrics": [type(m).__name__ for m in _metrics(strategy)],
            "settings": _settings(strategy)}


def _check_optimizer_state(optimizer, saved: dict | None) -> None:
    """ValueError unless ``saved`` (an optimizer ``state_dict``) has ``optimizer``'s parameter groups."""
    if optimizer is None or saved is None:
        return
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ValueError(f"the optimizer has parameter groups of {sizes} parameters, the checkpoint's "
                         f"{saved_sizes}")


# -- the API ---------------------------------------------------------------------------------------

def save_training_state(path: str | os.PathLike, strategy, extra: dict | None = None) -> None:
    """Write ``strategy``'s training state and ``extra`` (tensors, dicts, lists, strings, numbers)
    to ``path`` atomically; call it after a finished experience. Raises :class:`CheckpointError`
    for a strategy that cannot be saved (see :func:`checkpoint_refusal`)."""
    refusal = checkpoint_refusal(strategy)
    if refusal is not None:
        raise CheckpointError(refusal + ".")
    save, _ = _strategy_handlers()[type(strategy)]
    optimizer = getattr(strategy, "optimizer", None)
    state = {
        "format": FORMAT,
        "fingerprint": _fingerprint(strategy),
        "model": strategy.model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "optimizer_bound": getattr(strategy, "optimized_param_id", None) is not None,
        "strategy": save(strategy),
        "clock": {k: int(v) for k, v in vars(strategy.clock).items() if isinstance(v, int)},
        "metrics": [_metric_state(m) for m in _metrics(strategy)],
        "rng": _rng_state(),
        "extra": dict(extra or {}),
    }
    with atomic_write(path) as file:  # streamed to the temporary file: no copy of the state in memory
        torch.save(state, file)
        file.flush()
        try:  # refuse what could not be read back safely, before it replaces a good checkpoint
            torch.load(file.name, weights_only=True, mmap=True)  # mapped, not read into memory
        except Exception as error:
            raise CheckpointError(f"cannot save the training state of strategy {type(strategy).__name__}: "
                                  f"{_one_line(error)} (extra must hold tensors, dicts, lists, strings, "
                                  "numbers).") from None


def describe_differences(saved: dict, now: dict) -> str:
    """``"key: saved X, now Y; ..."`` for every key of either dict whose values differ (saved's keys
    first), each entry cut to 160 characters: the body of a "saved with other settings" refusal."""
    keys = list(saved) + [k for k in now if k not in saved]
    diffs = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    return "; ".join(d if len(d) < 160 else d[:157] + "..." for d in diffs)


def _read(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The state :func:`save_training_state` wrote to ``path`` (memory-mapped with ``mmap``: cheap to
    look into); CheckpointError naming the file if it is missing, damaged or of another format."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint.") from None
    except Exception as error:
        raise CheckpointError(f"{path}: damaged or not a training-state checkpoint ({_one_line(error)}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a training-state checkpoint of format {FORMAT}.")
    return state


def read_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` dict saved in the checkpoint at ``path``, read without restoring anything (the
    file is memory-mapped, so this is cheap even for a large checkpoint); CheckpointError naming the
    file if it is missing, damaged or of another format."""
    return _read(path, mmap=True)["extra"]


def load_training_state(path: str | os.PathLike, strategy) -> dict:
    """Restore into ``strategy`` (built exactly as the saved one, not yet trained) the state that
    :func:`save_training_state` wrote to ``path``, set the RNG states, and return its ``extra``.
    A damaged file or one saved from other settings (shapes, sizes, top-k, decoder, label smoothing,
    value rule) raises :class:`CheckpointError` naming the file, before anything is changed."""
    refusal = checkpoint_refusal(strategy)
    if refusal is not None:
        raise CheckpointError(refusal + ".")
    state = _read(path)
    expected, found = _fingerprint(strategy), state["fingerprint"]
    if "settings" not in found:  # saved before settings were recorded: compare what it holds
        expected.pop("settings")
    if found != expected:
        raise CheckpointError(f"{path}: saved with other settings ({describe_differences(found, expected)}).")
    _, load = _strategy_handlers()[type(strategy)]
    try:  # what can refuse the checkpoint runs first: the optimizer's groups, the strategy's own state
        optimizer = getattr(strategy, "optimizer", None)
        if state["optimizer_bound"] and getattr(strategy, "optimized_param_id", None) is None:
            strategy.make_optimizer(reset_optimizer_state=True)  # as Avalanche's first experience does
        if optimizer is not None:
            _check_optimizer_state(strategy.optimizer, state["optimizer"])
        load(strategy, state["strategy"])  # each handler checks its state before it assigns any of it
        strategy.model.load_state_dict(state["model"])
        if optimizer is not None and state["optimizer"] is not None:
            strategy.optimizer.load_state_dict(state["optimizer"])
        for k, v in state["clock"].items():
            setattr(strategy.clock, k, v)
        for metric, metric_state in zip(_metrics(strategy), state["metrics"]):
            if metric_state is not None:
                _load_metric_state(metric, metric_state)
        _set_rng_state(state["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: does not match this strategy ({_one_line(error)}).") from None
    return state["extra"]


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]
