"""The DKVB strategy: Avalanche's SupervisedTemplate with the paper's defaults and the fast path."""

from __future__ import annotations

import random
import warnings
from typing import Sequence

import numpy as np
import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn

from avalanche_dkvb.fast_path import (CachedExperienceBatches, FastStep, Kernels, RowsByContent,
                                      fast_path_blocker, torch_threads)
from avalanche_dkvb.model import DKVBModel
from avalanche_dkvb.plugin import DKVBPlugin, check_local_optimizer, optimise_trainable_parameters
from avalanche_dkvb.validation import check_positive_float, check_positive_int

FAST_PATH_MODES = ("compiled", "eager", "off")


class DKVB(SupervisedTemplate):
    """Discrete Key-Value Bottleneck training, used like Avalanche's Naive/EWC/Replay.

    Defaults are the authors' CIFAR class-incremental protocol: SGD lr 0.3 on the values only,
    batch 256, 2000 epochs per experience, gradient-norm clip 1.0, cross-entropy with label
    smoothing 0.1. A :class:`DKVBPlugin` is added (unless one is passed) to initialise the keys on
    ``init_data`` and freeze them before the first experience.

    With ``fast_path="compiled"`` (default) or ``"eager"`` each iteration's forward, loss, backward
    and step are computed from cached key indices (see :mod:`avalanche_dkvb.fast_path`) inside
    Avalanche's own training loop, so every callback, metric and logger sees the true minibatch,
    output and loss. "compiled" runs C++ kernels on the CPU (float32) and ``torch.compile``'d ones
    elsewhere; "eager" runs plain torch ops. It is taken only when exact: mean decoder, plain SGD on the
    values, plain mean cross-entropy, and every plugin in the fast path's allow-list or declaring
    ``dkvb_fast_path_exact = True``; otherwise the standard loop runs and a warning names the reason.
    On the strategy's own loader over plain batches without training transforms, indices are
    computed once per experience; otherwise (a loader replaced by a plugin such as Replay, a loader
    that shapes its batches, training transforms) the loader is iterated as it is.
    ``fast_path_threads`` runs training epochs with that many torch threads (the
    step moves too little memory to share: on 2 cores one thread is 2-3x faster); None leaves the
    process's setting alone.
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
        fast_path_threads: int | None = None,
    ):
        if not isinstance(model, DKVBModel):
            raise TypeError(f"DKVB needs a DKVBModel, got {type(model).__name__}.")
        if fast_path not in FAST_PATH_MODES:
            raise ValueError(f"fast_path must be one of {FAST_PATH_MODES}, got {fast_path!r}.")
        if clip_grad_norm is not None:
            check_positive_float("clip_grad_norm", clip_grad_norm)
        check_positive_float("lr", lr)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        for name, value in [("train_mb_size", train_mb_size), ("train_epochs", train_epochs),
                            ("eval_mb_size", eval_mb_size)]:
            check_positive_int(name, value)
        if fast_path_threads is not None:
            check_positive_int("fast_path_threads", fast_path_threads)
        optimizer = optimizer or torch.optim.SGD([model.bottleneck.values], lr=lr)
        if not allow_nonlocal_optimizer:
            check_local_optimizer(optimizer)  # before any key initialisation
        criterion = criterion or nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        plugins = list(plugins or [])
        if not any(isinstance(p, DKVBPlugin) for p in plugins):
            plugins.append(DKVBPlugin(init_data, key_init=key_init, key_init_kwargs=key_init_kwargs,
                                      allow_nonlocal_optimizer=allow_nonlocal_optimizer))
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=plugins, evaluator=evaluator, eval_every=eval_every)
        self.train_criterion = criterion
        self.clip_grad_norm = clip_grad_norm
        self.fast_path = fast_path
        self.fast_path_threads = fast_path_threads
        self._kernels = Kernels(compiled=fast_path == "compiled")
        self._default_loader = None  # the loader make_train_dataloader built, to see if a plugin replaced it
        self._loader_shapes_batches = False  # whether that loader's batches are more than plain minibatches
        self._fast_step: FastStep | None = None

    @property
    def uses_fast_path(self) -> bool:
        """True while the current training experience runs through the fast path."""
        return self._fast_step is not None

    def make_optimizer(self, reset_optimizer_state: bool = False, **kwargs):
        """Values only (and a parametric decoder's weights): encoder, projection and keys never enter."""
        optimise_trainable_parameters(self, reset_optimizer_state=reset_optimizer_state)

    def make_train_dataloader(self, shuffle: bool = True, **kwargs):
        super().make_train_dataloader(shuffle=shuffle, **kwargs)
        self._default_loader, self._shuffle = self.dataloader, shuffle
        # The cached batches are plain minibatches of the dataset; a loader that drops the last one or
        # balances several task labels (Avalanche's TaskBalancedDataLoader) is iterated as it is instead.
        self._loader_shapes_batches = bool(kwargs.get("drop_last")) or _task_label_count(self.adapted_dataset) > 1

    def _before_training_exp(self, **kwargs):
        super()._before_training_exp(**kwargs)  # plugins: key init, freezing, replay loaders, ...
        self._fast_step = None
        if self.fast_path == "off":
            return
        blocker = fast_path_blocker(self, self.train_criterion, self.clip_grad_norm)
        if blocker is not None:
            warnings.warn(f"DKVB fast path off for this experience: {blocker}.", stacklevel=2)
            return
        self._kernels.prepare(self.model.bottleneck.values)
        if (self.dataloader is self._default_loader and not self._loader_shapes_batches
                and not _has_training_transforms(self.adapted_dataset)):  # cached in eval mode: no transforms
            batches = CachedExperienceBatches(self.model, self.adapted_dataset.eval(), self.train_mb_size,
                                              self._shuffle, self.device)
        else:
            batches = RowsByContent(self.dataloader, self.model)
        self.dataloader = batches
        self._fast_step = FastStep(self.model, batches, self.train_criterion.label_smoothing, self._kernels)

    def training_epoch(self, **kwargs):
        with torch_threads(self.fast_path_threads):
            super().training_epoch(**kwargs)

    def forward(self):
        if self._fast_step is None or not self.is_training:
            return super().forward()
        return self._fast_step.forward()

    def criterion(self):
        if self._fast_step is None or not self.is_training:
            return super().criterion()
        return self._fast_step.loss(self.mb_output, self.mb_y)

    def backward(self):
        if self._fast_step is None:
            return super().backward()
        self._fast_step.backward(self.mb_output, self.mb_y)

    def optimizer_step(self):
        if self._fast_step is not None:  # clipping cannot act there (see fast_path_blocker)
            # The update runs as the closure of the optimizer's own step, so step hooks (and an LR
            # scheduler's check that the optimizer stepped) see a step around it; the values' dense
            # gradient is never formed, so SGD has nothing to apply after the closure (about 10 us).
            self.model.bottleneck.values.grad = None
            self.optimizer.step(lambda: self._fast_step.step(self.optimizer.param_groups[0]["lr"]))
            return
        if self.clip_grad_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        super().optimizer_step()

    def _after_training_exp(self, **kwargs):
        self._fast_step = None  # frees the cached experience and its (C*k, N) rows
        super()._after_training_exp(**kwargs)


def _task_label_count(dataset) -> int:
    """How many task labels an Avalanche dataset holds (1 for a dataset without them)."""
    labels = getattr(dataset, "targets_task_labels", None)
    return 1 if labels is None else len(labels.uniques)


def _has_training_transforms(dataset, probes: int = 32) -> bool:
    """Whether the first ``probes`` inputs of an Avalanche dataset differ between its train and eval
    modes (training transforms or augmentations). The random generators (torch, numpy, ``random``) are
    put back afterwards, so the probe changes no later draw."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            train, evaluation = dataset.train(), dataset.eval()
            return any(not torch.equal(torch.as_tensor(train[i][0]), torch.as_tensor(evaluation[i][0]))
                       for i in range(min(probes, len(dataset))))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
