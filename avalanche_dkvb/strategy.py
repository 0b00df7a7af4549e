"""The DKVB strategy: Avalanche's SupervisedTemplate with the paper's defaults and the fast path."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from avalanche_dkvb.fast_path import CachedIndexTrainer, fast_path_blocker
from avalanche_dkvb.model import DKVBModel
from avalanche_dkvb.plugin import DKVBPlugin

FAST_PATH_MODES = ("compiled", "eager", "off")


class DKVB(SupervisedTemplate):
    """Discrete Key-Value Bottleneck training, used like Avalanche's Naive/EWC/Replay.

    Defaults are the authors' CIFAR class-incremental protocol: SGD lr 0.3 on the values only,
    batch 256, 2000 epochs per experience, gradient-norm clip 1.0, cross-entropy with label
    smoothing 0.1. A :class:`DKVBPlugin` is added (unless one is passed) to initialise the keys on
    ``init_data`` and freeze them before the first experience.

    With ``fast_path="compiled"`` (default) or ``"eager"`` and an eligible setup (mean decoder, plain SGD, plain
    cross-entropy, no plugin needing per-iteration callbacks) each experience's key indices are
    computed once and every epoch is a sequence of gather + sparse value updates (see
    :mod:`avalanche_dkvb.fast_path`). Epoch and experience callbacks still fire; per-iteration
    callbacks (training-minibatch metrics) do not. Indices are computed on the experience without
    training augmentations (the paper embeds each image once); pass ``fast_path="off"`` to train
    with augmentations. With ``fast_path="off"``, or an ineligible setup (with a warning naming the
    reason), the standard Avalanche loop runs.
    """

    def __init__(
        self,
        *,
        model: DKVBModel,
        optimizer: torch.optim.Optimizer | None = None,
        criterion: nn.Module | None = None,
        lr: float = 0.3,
        label_smoothing: float = 0.1,
        clip_grad_norm: float | None = 1.0,
        train_mb_size: int = 256,
        train_epochs: int = 2000,
        eval_mb_size: int = 1024,
        device: str | torch.device = "cpu",
        plugins: Sequence | None = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        init_data=None,
        key_init: str = "ema",
        key_init_kwargs: dict | None = None,
        allow_nonlocal_optimizer: bool = False,
        fast_path: str = "compiled",
    ):
        if not isinstance(model, DKVBModel):
            raise TypeError(f"DKVB needs a DKVBModel, got {type(model).__name__}.")
        if fast_path not in FAST_PATH_MODES:
            raise ValueError(f"fast_path must be one of {FAST_PATH_MODES}, got {fast_path!r}.")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be positive or None, got {clip_grad_norm}.")
        optimizer = optimizer or torch.optim.SGD([model.bottleneck.values], lr=lr)
        criterion = criterion or nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        plugins = list(plugins or [])
        if not any(isinstance(p, DKVBPlugin) for p in plugins):
            plugins.append(DKVBPlugin(init_data, key_init=key_init, key_init_kwargs=key_init_kwargs,
                                      allow_nonlocal_optimizer=allow_nonlocal_optimizer))
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=plugins, evaluator=evaluator, eval_every=eval_every)
        self.clip_grad_norm = clip_grad_norm
        self.fast_path = fast_path
        self._index_trainer: CachedIndexTrainer | None = None

    def _before_training_exp(self, **kwargs):
        super()._before_training_exp(**kwargs)  # plugins: key init, freezing, values-only optimizer
        self._index_trainer = None
        if self.fast_path != "off":
            blocker = fast_path_blocker(self)
            if blocker is None:
                self._index_trainer = CachedIndexTrainer(self.model, self.adapted_dataset.eval(),
                                                         self.train_mb_size, self.device,
                                                         compiled=self.fast_path == "compiled")
            else:
                warnings.warn(f"DKVB fast path off for this experience: {blocker}.", stacklevel=2)

    def training_epoch(self, **kwargs):
        if self._index_trainer is None:
            return super().training_epoch(**kwargs)
        self.loss = torch.tensor(self._index_trainer.run_epoch(
            self.optimizer.param_groups[0]["lr"], self._criterion.label_smoothing,
            shuffle=kwargs.get("shuffle", True)))

    def optimizer_step(self):
        if self.clip_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        super().optimizer_step()

    def _after_training_exp(self, **kwargs):
        self._index_trainer = None  # frees the (C*k, N) index cache
        super()._after_training_exp(**kwargs)
