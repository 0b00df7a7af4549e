"""Training values from cached key indices, without autograd, inside Avalanche's own training loop.

With encoder, projection and keys frozen, a training sample always selects the same keys, i.e. the
same rows of ``values.view(C*K, V)``. The fast path only replaces what one iteration computes, not the
loop: Avalanche's ``training_epoch`` still runs over ``strategy.dataloader`` and fires every callback,
so metrics, loggers, LR schedulers and plugins see the real minibatch, outputs and loss. With the mean
decoder, mean cross-entropy (label smoothing s) and plain SGD (lr), for a batch of b samples:

    forward   logits = t * mean of the selected value rows                  (b, V)   gather + mean
    loss      mean cross-entropy of logits, and with it                     ()
              g = (softmax(logits) - ((1-s) onehot(y) + s/V)) / b           (b, V)   exact dLoss/dlogits
    step      values[row] -= lr * t * g / (C*k)  for every selected row      sparse update (index_add_)

with t the bottleneck's top-k scale (k when the k values of a codebook are summed, the authors'
default, 1 when averaged). This is exactly the gradient autograd computes through the mean decoder,
applied by SGD, so only the selected rows change. Gradient clipping never acts: the whole gradient's
norm is at most sqrt(2 C k) t / (C k) (:func:`gradient_norm_bound`: each sample's g has norm
<= sqrt(2)/b, reaching each of its C*k rows times t/(C k)), so the fast path is only taken when the
clip threshold is at least that bound.

The strategy's ``criterion`` returns the loss computed there, so the loss Avalanche's loop and its
metrics see is the one the gradient comes from. :class:`Kernels` runs the three stages: on the CPU (float32)
as the C++ kernels of :mod:`avalanche_dkvb.native_step`, one pass each; elsewhere as torch ops, compiled
by ``torch.compile`` or eager.

Where the rows come from:
- :class:`CachedExperienceBatches` when the strategy trains on its own default loader over plain
  batches of an experience without training transforms: the experience is materialised once with its
  rows (N, C*k); each epoch is a shuffle (or not) and slices.
- :class:`RowsByContent` otherwise (a plugin replaced the loader, e.g. Replay's buffer; the loader
  shapes its batches; training transforms): the loader itself is iterated and each input's rows are
  found by its content, computed once per distinct input.

Whether the fast path may run at all is decided by :func:`fast_path_blocker` from an explicit
allow-list of plugins (:data:`EXACT_PLUGINS`) and the ``dkvb_fast_path_exact`` attribute a user's
plugin can set.

Shape legend: N samples, b batch, C codebooks, K keys, k top-k, V value size (= classes).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from avalanche_dkvb.model import DKVBModel
from avalanche_dkvb.native_step import can_use_native_step, native_step

FAST_PATH_EXACT_ATTRIBUTE = "dkvb_fast_path_exact"


# -- eligibility -----------------------------------------------------------------------------------
def _always(plugin, strategy) -> str | None:
    return None


def _periodic_eval(plugin, strategy) -> str | None:
    if plugin.peval_mode == "iteration" and plugin.eval_every > 0:
        return "it evaluates every N iterations, in the middle of an epoch"
    return None


def _early_stopping(plugin, strategy) -> str | None:
    if plugin.peval_mode == "iteration":
        return "it saves and restores the model every iteration, in the middle of an epoch"
    return None


def _lr_scheduler(plugin, strategy) -> str | None:
    if plugin.scheduler.optimizer is not strategy.optimizer:
        return "its scheduler drives another optimizer than the strategy's"
    return None


def _exact_plugins() -> dict[type, Callable]:
    """Avalanche plugins whose callbacks the fast path keeps exact, with the condition each needs.

    - EvaluationPlugin, Clock: they only observe; every callback fires with the true minibatch, output
      and loss.
    - PeriodicEval: evaluating between epochs is exact; every N iterations is not (usage counts and the
      masked lookup would see a half-counted epoch).
    - LRSchedulerPlugin (epoch or iteration): the step reads the learning rate at every update.
    - ReplayPlugin: it replaces the loader, which the fast path then iterates (:class:`RowsByContent`).
    - GDumbPlugin: it replaces the adapted dataset and resets the model before the loader is built.
    - EarlyStoppingPlugin per epoch: it saves and restores the model between epochs, where the usage
      counts are complete, and calls ``stop_training``, which Avalanche's loop obeys; per iteration it
      would save and restore them half-counted.
    """
    from avalanche.training.plugins import (EarlyStoppingPlugin, EvaluationPlugin, GDumbPlugin,
                                            LRSchedulerPlugin, ReplayPlugin)
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval
    from avalanche_dkvb.plugin import DKVBPlugin
    return {EvaluationPlugin: _always, Clock: _always, PeriodicEval: _periodic_eval, DKVBPlugin: _always,
            LRSchedulerPlugin: _lr_scheduler, ReplayPlugin: _always, GDumbPlugin: _always,
            EarlyStoppingPlugin: _early_stopping}


def plugin_blocker(plugin, strategy) -> str | None:
    """Why ``plugin`` keeps the fast path from being exact, or None.

    A plugin is exact if it declares ``dkvb_fast_path_exact = True`` (its callbacks change neither the
    loss, the gradients, the parameters nor the data in a way the fast path would miss) or its type is
    in the allow-list (:func:`_exact_plugins`) and meets that entry's condition. A declared ``False``
    always blocks."""
    declared = getattr(plugin, FAST_PATH_EXACT_ATTRIBUTE, None)
    if declared is not None:
        return None if declared else f"it declares {FAST_PATH_EXACT_ATTRIBUTE} = False"
    condition = _exact_plugins().get(type(plugin))
    if condition is None:
        return (f"it is not known to be exact there (set {FAST_PATH_EXACT_ATTRIBUTE} = True on a plugin "
                "whose callbacks leave loss, gradients, parameters and data alone)")
    return condition(plugin, strategy)


def gradient_norm_bound(bottleneck) -> float:
    """Largest possible norm of the whole values gradient of mean cross-entropy through the mean
    decoder: sqrt(2 C k) * s / (C k), with s the top-k scale (k for "sum", 1 for "mean"): each sample's
    logit gradient has norm <= sqrt(2) / b and reaches each of its C*k rows times s / (C k)."""
    rows = bottleneck.num_codebooks * bottleneck.top_k
    return math.sqrt(2.0 * rows) * bottleneck.top_k_scale / rows


def fast_path_blocker(strategy, criterion: nn.Module, clip_grad_norm: float | None) -> str | None:
    """Why ``strategy`` cannot train through the fast path with ``criterion``, or None if it can."""
    model, optimizer = strategy.model, strategy.optimizer
    if not isinstance(model, DKVBModel) or not model.uses_mean_decoder:
        return "the model is not a DKVBModel with the non-parametric mean decoder"
    if not bool(model.bottleneck.keys_frozen):
        return "the keys are not frozen"
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return "the optimizer is not plain torch.optim.SGD with one parameter group"
    group = optimizer.param_groups[0]
    if group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"]:
        return "the SGD optimizer uses momentum, weight decay, nesterov or maximize"
    if [id(p) for p in group["params"]] != [id(model.bottleneck.values)]:
        return "the optimizer does not optimise exactly the values"
    if type(criterion) is not nn.CrossEntropyLoss or criterion.weight is not None \
            or criterion.reduction != "mean":
        return "the criterion is not a plain mean nn.CrossEntropyLoss"
    bound = gradient_norm_bound(model.bottleneck)
    if clip_grad_norm is not None and clip_grad_norm < bound:
        return f"gradient clipping at {clip_grad_norm} could act (gradient norm bound {bound:.3g})"
    for plugin in strategy.plugins:
        reason = plugin_blocker(plugin, strategy)
        if reason is not None:
            return f"plugin {type(plugin).__name__}: {reason}"
    return None


# -- where the rows come from ----------------------------------------------------------------------
def row_dtype(num_rows: int) -> torch.dtype:
    """The dtype of row indices into a value table of ``num_rows`` rows: int32 where it holds them
    (half the bytes to move per step), else int64."""
    return torch.int32 if num_rows <= torch.iinfo(torch.int32).max else torch.long


def dataloader_order(n: int, shuffle: bool) -> torch.Tensor | None:
    """The sample order (n,) of one epoch of torch's ``DataLoader`` over n samples, as Avalanche's default
    training loader (one task label) draws it, or None for 0..n-1 without shuffling.

    It takes from torch's global RNG what that loader takes, in the same order: one int64 for the
    iterator's base seed, then, when shuffling, one to seed ``RandomSampler``'s generator, which draws
    the permutation. So the fast path's minibatches, and every later random draw (which samples a replay
    buffer keeps), are the loader's. This repeats torch's internals (no public API yields a loader's
    order without fetching its samples); ``tests/test_fast_path.py`` compares it with the real loader."""
    torch.empty((), dtype=torch.int64).random_()  # _BaseDataLoaderIter's base seed
    if not shuffle:
        return None
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class CachedExperienceBatches:
    """Minibatches ``[x, y, t]`` of one experience's dataset, materialised once with each sample's
    selected rows (N, C*k). Iterating yields ``len(self)`` batches of ``batch_size`` in the order of
    an epoch of Avalanche's default loader (:func:`dataloader_order`), sets :attr:`current_rows`
    (b, C*k) to the rows of the batch just yielded, and adds the epoch's key selections to the usage
    counters when the epoch ends (once, not per step).

    Each batch is gathered on its own (``index_select`` of b rows of inputs and of rows): permuting the
    whole experience each epoch instead costs fresh (N, D) and (N, C*k) copies, more than the steps
    themselves at the paper's scale. Rows are int32 when they fit (half the bytes to move). Holds the
    experience's inputs (N, ...) in memory, like any in-memory loader."""

    def __init__(self, model: DKVBModel, dataset, batch_size: int, shuffle: bool, device):
        xs, ys, ts, rows = [], [], [], []
        with torch.no_grad():  # the training lookup searches all keys, dormant or not
            # its own generator: the global RNG stays as the off path leaves it (see dataloader_order)
            for x, y, t, *_ in DataLoader(dataset, batch_size=max(batch_size, 1024), generator=torch.Generator()):
                x = x.to(device)
                rows.append(model.bottleneck.flat_indices(model.embed(x), only_used=False))
                xs.append(x)
                ys.append(y.to(device))
                ts.append(t.to(device))
        self.inputs, self.targets, self.task_labels = torch.cat(xs), torch.cat(ys), torch.cat(ts)
        self.usage_counts = model.bottleneck.usage_counts  # (C, K)
        self.rows = torch.cat(rows).to(row_dtype(self.usage_counts.numel()))  # (N, C*k)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.current_rows: torch.Tensor | None = None
        self.epoch_counts = self._counts(self.rows)

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self):
        n = len(self.targets)
        order = dataloader_order(n, self.shuffle)
        order = None if order is None else order.to(self.targets.device)
        consumed = 0
        try:
            for start in range(0, n, self.batch_size):
                if order is None:
                    batch = slice(start, start + self.batch_size)
                    x, y, t, rows = self.inputs[batch], self.targets[batch], self.task_labels[batch], self.rows[batch]
                else:
                    idx = order[start:start + self.batch_size]
                    x, y, t, rows = (a.index_select(0, idx) for a in
                                     (self.inputs, self.targets, self.task_labels, self.rows))
                self.current_rows = rows  # (b, C*k)
                yield [x, y, t]
                consumed = min(start + self.batch_size, n)  # asked for more: this batch was trained on
        finally:  # the selections of the batches trained on, counted once per epoch (also if stopped early)
            if consumed == n:
                counts = self.epoch_counts
            else:
                counts = self._counts(self.rows[:consumed] if order is None else self.rows[order[:consumed]])
            self.usage_counts.view(-1).add_(counts)

    def _counts(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.bincount(rows.flatten(), minlength=self.usage_counts.numel())


class RowsByContent:
    """Wraps any training loader (e.g. Avalanche's ReplayDataLoader) and sets :attr:`current_rows`
    (b, C*k) for each minibatch it yields, unchanged.

    Rows are looked up by the input's content: a 64-bit hash of its bytes, then an exact comparison
    with the stored input, so a hash collision only costs a recomputation. Inputs not found are
    embedded and searched once and stored, up to ``max_cached_bytes`` of stored inputs (beyond that,
    e.g. with random augmentations, they are recomputed each time: slower, still exact)."""

    def __init__(self, loader, model: DKVBModel, max_cached_bytes: int = 2**30):
        self.loader, self.model, self.max_cached_bytes = loader, model, max_cached_bytes
        self.current_rows: torch.Tensor | None = None
        self._hashes = self._inputs = self._rows = None  # sorted by hash: (M,), (M, F), (M, C*k)
        self._weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        usage = self.model.bottleneck.usage_counts.view(-1)
        for mbatch in self.loader:
            self.current_rows = self.rows_of(mbatch[0])
            yield mbatch
            flat = self.current_rows.flatten()  # asked for more: this batch was trained on
            usage.index_add_(0, flat, torch.ones_like(flat))

    def _words(self, x: torch.Tensor) -> torch.Tensor:
        """The inputs' bytes as int64 words: (b, ...) -> (b, W)."""
        flat = x.detach().reshape(len(x), -1).contiguous()
        words = flat.view(torch.int32) if flat.element_size() == 4 else flat.view(torch.uint8)
        return words.long()

    @torch.no_grad()
    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """Selected rows (b, C*k) of inputs x (b, ...)."""
        words = self._words(x)
        if self._weights is None:
            generator = torch.Generator().manual_seed(0)
            self._weights = torch.randint(1, 2**62, (words.shape[1],), generator=generator).to(words.device)
        hashes = (words * self._weights).sum(1)  # wraps modulo 2^64: any fixed mixing of the bytes will do
        rows = torch.empty(len(x), self.model.bottleneck.num_codebooks * self.model.bottleneck.top_k,
                           dtype=torch.long, device=x.device)
        found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if self._hashes is not None:
            pos = torch.searchsorted(self._hashes, hashes).clamp_max(len(self._hashes) - 1)
            found = (self._hashes[pos] == hashes) & (self._inputs[pos] == words).all(1)
            rows[found] = self._rows[pos[found]]
        missing = ~found
        if bool(missing.any()):
            fresh = self.model.bottleneck.flat_indices(self.model.embed(x[missing]), only_used=False)
            rows[missing] = fresh
            self._store(hashes[missing], words[missing], fresh)
        return rows

    def _store(self, hashes: torch.Tensor, words: torch.Tensor, rows: torch.Tensor) -> None:
        stored = 0 if self._inputs is None else self._inputs.numel()
        if (stored + words.numel()) * words.element_size() > self.max_cached_bytes:
            return
        if self._hashes is not None:
            hashes, words, rows = (torch.cat([a, b]) for a, b in
                                   ((self._hashes, hashes), (self._inputs, words), (self._rows, rows)))
        order = hashes.argsort()
        self._hashes, self._inputs, self._rows = hashes[order], words[order], rows[order]


# -- the step ----------------------------------------------------------------------------------------
def gather_mean(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of a batch: the mean of its selected rows of ``values`` (C*K, V), rows (b, C*k) -> (b, V);
    gathered codebook-major, so the table is visited one codebook slice at a time."""
    return values[rows.T].mean(0)


def scatter_update(values: torch.Tensor, rows: torch.Tensor, update: torch.Tensor) -> None:
    """Add ``update`` (b, V) to every selected row of ``values`` (C*K, V) in place; rows (b, C*k)."""
    values.index_add_(0, rows.T.flatten(), update.repeat(rows.shape[1], 1))


def logit_gradient(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """dLoss/dlogits (b, V) of mean cross-entropy with label smoothing, for logits (b, V), labels (b,)."""
    num_classes = logits.shape[1]
    target = F.one_hot(y, num_classes).to(logits.dtype) * (1 - label_smoothing) + label_smoothing / num_classes
    return (logits.softmax(dim=1) - target) / len(y)


@contextmanager
def torch_threads(count: int | None):
    """Run with ``count`` torch threads (None: leave the setting alone), restoring it afterwards."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class FastStep:
    """The fast path's forward, loss (with the gradient), and SGD step for one experience, reading the
    rows of the current minibatch from ``batches.current_rows``; each stage runs through ``kernels``.

    Nothing here is recorded by autograd, with no ``torch.no_grad`` needed (it would cost more than the
    loss's kernel): the kernels read and write the values' storage (the C++ ones) or a detached view of
    it (the torch ones), so no output requires a gradient."""

    def __init__(self, model: DKVBModel, batches, label_smoothing: float, kernels: "Kernels"):
        self.bottleneck = model.bottleneck
        self.batches, self.label_smoothing, self.kernels = batches, label_smoothing, kernels
        self._gradient: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """Training-mode logits (b, V) of the current batch (its source counts the selections)."""
        return self.kernels.gather_mean(self.bottleneck.values, self.batches.current_rows,
                                        self.bottleneck.top_k_scale)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (b, V) against ``y`` (b,); keeps its gradient for the step."""
        loss, self._gradient = self.kernels.cross_entropy(logits, y, self.label_smoothing)
        return loss

    def backward(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """The gradient was computed with the loss; computed here only if the loss was not asked for."""
        if self._gradient is None:
            self._gradient = logit_gradient(logits.detach(), y, self.label_smoothing)

    def step(self, lr: float) -> None:
        rows = self.batches.current_rows
        step = -lr * self.bottleneck.top_k_scale / rows.shape[1]  # dlogits/drow: top-k scale / (C*k)
        self.kernels.scatter_update(self.bottleneck.values, rows, self._gradient, step, self.bottleneck.top_k)
        self._gradient = None


class Kernels:
    """The step's three stages for the values' device and dtype (chosen by :meth:`prepare`): with
    ``compiled``, the C++ kernels of :mod:`avalanche_dkvb.native_step` on the CPU (float32) and
    ``torch.compile``'d torch ops elsewhere (probed once per device); otherwise eager torch ops."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.native = None
        self._gather_mean, self._scatter_update = gather_mean, scatter_update
        self._probed_on: set[str] = set()

    def prepare(self, values: torch.Tensor) -> None:
        """Choose the kernels for ``values``' device and dtype (with the C++ kernels, also ask for huge pages
        under the table: see :mod:`avalanche_dkvb.native_step`); where compiling fails, warn and keep the
        eager torch ops."""
        self.native = native_step() if self.compiled and can_use_native_step(values) else None
        if self.native is not None:
            self.native.collapse_to_huge_pages(values.detach())
        device = values.device
        if not self.compiled or self.native is not None or device.type in self._probed_on:
            return
        self._probed_on.add(device.type)
        try:
            gather, scatter = torch.compile(gather_mean, dynamic=False), torch.compile(scatter_update, dynamic=False)
            probe, rows = torch.zeros(4, 2, device=device), torch.tensor([[0, 1]], device=device)
            scatter(probe, rows, gather(probe, rows) + 1)
            self._gather_mean, self._scatter_update = gather, scatter
        except Exception as error:  # no C++ compiler, unsupported platform, ...
            warnings.warn(f"torch.compile of the DKVB fast step failed on {device} ({type(error).__name__}: "
                          f"{error}); using the eager step, which is slower but gives the same results.",
                          stacklevel=3)

    def gather_mean(self, values: torch.Tensor, rows: torch.Tensor, scale: int) -> torch.Tensor:
        """``scale`` * the mean of each sample's rows of ``values`` (..., V), e.g. the (C, K, V) table,
        whose rows are numbered as in its (R, V) view; rows (b, J) -> (b, V)."""
        if self.native is not None:
            return self.native.gather_mean(values, rows, scale)
        logits = self._gather_mean(_row_view(values), rows)
        return logits if scale == 1 else logits * scale

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor, label_smoothing: float):
        """(mean cross-entropy (), its gradient (b, V)) of ``logits`` (b, V) against ``y`` (b,)."""
        if self.native is not None:
            return tuple(self.native.cross_entropy(logits.contiguous(), y, label_smoothing))
        return (F.cross_entropy(logits, y, label_smoothing=label_smoothing),
                logit_gradient(logits, y, label_smoothing))

    def scatter_update(self, values: torch.Tensor, rows: torch.Tensor, gradient: torch.Tensor, step: float,
                       group: int) -> None:
        """values[rows[i, j]] += step * gradient[i] in place (rows of ``values`` (..., V) numbered as in
        :meth:`gather_mean`); ``group`` columns of rows per codebook."""
        if self.native is not None:
            self.native.scatter_add(values, rows.contiguous(), gradient.contiguous(), step, group)
        else:
            self._scatter_update(_row_view(values), rows, gradient * step)


def _row_view(values: torch.Tensor) -> torch.Tensor:
    """The (R, V) view of a value table (..., V), detached (it shares the storage)."""
    return values.detach().view(-1, values.shape[-1])
