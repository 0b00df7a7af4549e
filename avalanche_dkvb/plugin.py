"""The Avalanche plugin: key initialisation, freezing, values-only optimisation."""

from __future__ import annotations

import inspect
import logging
import time
import warnings

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.dynamic_optimizers import update_optimizer
from torch.utils.data import DataLoader, Dataset

from avalanche_dkvb.key_init import KEY_INITIALISERS, init_keys
from avalanche_dkvb.model import DKVBModel
from avalanche_dkvb.validation import check_labels

log = logging.getLogger(__name__)


def _default_epochs(method: str) -> int | None:
    """The ``epochs`` default of the named key initialiser (None for an unknown name: init_keys
    then raises the error that names it)."""
    initialiser = KEY_INITIALISERS.get(method)
    return None if initialiser is None else inspect.signature(initialiser).parameters["epochs"].default


def check_local_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError if ``optimizer`` can move parameters that received no gradient.

    Only plain SGD (momentum 0, weight decay 0) leaves the values of unselected keys exactly
    unchanged; momentum, weight decay and Adam-style moments all move them.
    """
    reasons = []
    if not isinstance(optimizer, torch.optim.SGD):
        reasons.append(f"{type(optimizer).__name__} keeps per-parameter state (moments) that keeps "
                       "moving values after their gradient is zero")
    for i, group in enumerate(optimizer.param_groups):
        for option in ("momentum", "weight_decay"):
            if group.get(option, 0):
                reasons.append(f"param group {i} has {option}={group[option]}")
    if reasons:
        raise ValueError(
            "DKVB updates only the values of the keys an input selects, which needs an optimizer that "
            "leaves parameters with zero gradient unchanged: " + "; ".join(reasons) + ". Expected "
            "torch.optim.SGD with momentum=0 and weight_decay=0, or pass allow_nonlocal_optimizer=True "
            "to accept non-local updates."
        )


def optimise_trainable_parameters(strategy, reset_optimizer_state: bool = False) -> None:
    """Make ``strategy.optimizer`` optimise exactly the DKVB model's trainable parameters (the values,
    plus a parametric decoder's), through Avalanche's ``update_optimizer``: what the strategy's
    ``make_optimizer`` does for DKVB, and what the plugin applies inside any other strategy, whose
    ``make_optimizer`` puts every model parameter in."""
    strategy.optimized_param_id = update_optimizer(
        strategy.optimizer, strategy.model.trainable_parameters(), getattr(strategy, "optimized_param_id", None),
        reset_state=reset_optimizer_state, remove_params=True)


def experience_labels(dataset) -> torch.Tensor | None:
    """The labels (N,) of an Avalanche training dataset, with the dtype its items carry (a DataLoader
    batches them so), or None if it has no ``targets``."""
    targets = getattr(dataset, "targets", None)
    if targets is None or len(dataset) == 0:
        return None
    labels = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(list(targets))
    item_dtype = torch.as_tensor(dataset[0][1]).dtype  # e.g. int32 items in int64 targets
    return labels if labels.is_floating_point() else labels.to(item_dtype)


class DKVBPlugin(SupervisedPlugin):
    """Prepares a :class:`DKVBModel` for continual training inside any Avalanche strategy.

    At the start of each ``train()`` call: checks the model and that the optimizer is local, before
    any key initialisation. Before the first training experience: initialises the keys on
    ``init_data`` (unlabelled model inputs: a tensor (N, ...) or a dataset whose items are ``x`` or
    ``(x, ...)``; if ``None``, the first experience's inputs, with a warning: the authors' code uses
    the whole training set there, which a continual learner cannot see up front), freezes encoder,
    projection and keys, and resets the usage counters. Before every training experience: checks the
    labels are class indices the model has, and restricts the optimizer to the trainable parameters
    (:func:`optimise_trainable_parameters`).

    Keys are never re-initialised under trained values: a model with unfrozen keys but non-zero usage
    counts (trained without freezing, or loaded from such a state) is refused with what to do.
    """

    def __init__(self, init_data: torch.Tensor | Dataset | None = None, *, key_init: str = "ema",
                 key_init_kwargs: dict | None = None, allow_nonlocal_optimizer: bool = False,
                 embed_batch_size: int = 1024):
        super().__init__()
        if key_init not in KEY_INITIALISERS:
            raise ValueError(f"Unknown key initialisation {key_init!r}; expected one of {sorted(KEY_INITIALISERS)}.")
        self.init_data = init_data
        self.key_init = key_init
        self.key_init_kwargs = dict(key_init_kwargs or {})
        self.allow_nonlocal_optimizer = allow_nonlocal_optimizer
        self.embed_batch_size = embed_batch_size

    def before_training(self, strategy, **kwargs):
        if not isinstance(strategy.model, DKVBModel):
            raise TypeError(f"DKVBPlugin needs the strategy's model to be a DKVBModel, "
                            f"got {type(strategy.model).__name__}.")
        if not self.allow_nonlocal_optimizer:
            check_local_optimizer(strategy.optimizer)

    def before_training_exp(self, strategy, **kwargs):
        model = strategy.model  # may be a new object (GDumb resets it before each experience)
        labels = experience_labels(strategy.adapted_dataset)
        if labels is not None:
            check_labels(labels, model.num_classes, f"experience {strategy.experience.current_experience}",
                         "value_dim" if model.uses_mean_decoder else "num_classes")
        if not bool(model.bottleneck.keys_frozen):
            self._initialise_keys(model, strategy)
        optimise_trainable_parameters(strategy)

    def _initialise_keys(self, model: DKVBModel, strategy) -> None:
        if bool(model.bottleneck.usage_counts.any()):
            raise RuntimeError(
                "The model's keys are not frozen but it has been trained (its usage counts are not zero): "
                "initialising the keys now would invalidate its values. If these keys are the ones the values "
                "were trained with, call model.bottleneck.freeze_keys(reset_usage=False) before training; to "
                "start afresh, build a new model.")
        data = self.init_data
        if data is None:
            warnings.warn(
                "DKVBPlugin got no init_data: initialising the keys on the first experience's inputs. "
                "The paper initialises them on a different, unlabelled data set; pass init_data=...",
                stacklevel=2,
            )
            data = strategy.experience.dataset.eval()
        embeddings = self._embed(model, data, strategy.device)
        kwargs = dict(self.key_init_kwargs)
        epochs = kwargs.get("epochs", _default_epochs(self.key_init))
        start = time.perf_counter()
        every = max(1, epochs // 10)  # about ten progress lines per initialisation

        def report(epoch: int, error: float) -> None:
            if (epoch + 1) % every == 0 or epoch + 1 == epochs:
                log.info("key initialisation (%s) epoch %d/%d: quantisation error %.4g, %.0f s",
                         self.key_init, epoch + 1, epochs, error, time.perf_counter() - start)

        kwargs.setdefault("progress", report)
        init_keys(model.bottleneck, embeddings, self.key_init, **kwargs)
        model.bottleneck.freeze_keys()

    @torch.no_grad()
    def _embed(self, model: DKVBModel, data, device) -> torch.Tensor:
        """The encoder's embeddings (N, D) of ``data``, computed in batches."""
        if isinstance(data, torch.Tensor):
            batches = data.split(self.embed_batch_size)
        else:
            batches = (b[0] if isinstance(b, (tuple, list)) else b
                       for b in DataLoader(data, batch_size=self.embed_batch_size))
        return torch.cat([model.embed(b.to(device)) for b in batches])
