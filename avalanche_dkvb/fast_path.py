"""Training values from cached key indices, without autograd.

With encoder, projection and keys frozen, a training sample always selects the same keys, so its
rows of ``values.view(C*K, V)`` are computed once per experience (C*k, N). With the mean decoder,
mean cross-entropy (label smoothing s) and plain SGD (lr), one step on a batch of b samples is:

    logits = mean of the selected value rows                     (b, V)   gather + mean
    g      = (softmax(logits) - ((1-s) onehot(y) + s/V)) / b     (b, V)   exact dLoss/dlogits
    values[row] -= lr * g / (C*k)  for every selected row        sparse update (index_add_)

which is exactly the gradient autograd would compute through the mean decoder, applied by SGD, so
only the selected rows change. The step is fused by ``torch.compile`` (eager where unavailable).
Gradient clipping never acts here: the whole gradient's norm is at most sqrt(2 / (C*k)) (each
sample's g has norm <= sqrt(2)/b, shared over C*k rows), so the fast path is only taken when the
clip threshold is at least that bound.

Shape legend: N samples, b batch, C codebooks, K keys, k top-k, V value size (= classes).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from avalanche_dkvb.model import DKVBModel


def fast_path_blocker(strategy) -> str | None:
    """Why ``strategy`` cannot train through the fast path, or None if it can."""
    model, optimizer, criterion = strategy.model, strategy.optimizer, strategy._criterion
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
    bound = math.sqrt(2.0 / (model.bottleneck.num_codebooks * model.bottleneck.top_k))
    clip = getattr(strategy, "clip_grad_norm", None)
    if clip is not None and clip < bound:
        return f"gradient clipping at {clip} could act (gradient norm bound {bound:.3g})"
    hooked = [type(p).__name__ for p in strategy.plugins if _has_iteration_hooks(p)]
    if hooked:
        return f"plugin(s) {hooked} need per-iteration callbacks"
    return None


_ITERATION_HOOKS = ("before_training_iteration", "before_forward", "after_forward", "before_backward",
                    "after_backward", "before_update", "after_update", "after_training_iteration")


def _has_iteration_hooks(plugin) -> bool:
    """True if the plugin overrides a per-iteration training callback. Excepted: evaluation plugins
    (in the fast path training-minibatch metrics are simply not reported), Avalanche's Clock (its
    iteration counters do not advance) and PeriodicEval unless it evaluates every N iterations.

    The iteration hooks' no-op defaults live on ``BaseSGDPlugin`` (``BasePlugin`` has none), so a
    hook counts as overridden when the plugin's class has it and it is not that default."""
    from avalanche.core import BaseSGDPlugin
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval
    if isinstance(plugin, (EvaluationPlugin, Clock)):
        return False
    if isinstance(plugin, PeriodicEval):
        return plugin.peval_mode == "iteration" and plugin.eval_every > 0
    for hook in _ITERATION_HOOKS:
        method = getattr(type(plugin), hook, None)
        if method is not None and method is not getattr(BaseSGDPlugin, hook, None):
            return True
    return False


class CachedIndexTrainer:
    """Holds one experience's selected rows, codebook-major (C*k, N), and targets (N,), and runs SGD
    epochs on them.

    Codebook-major order makes each step visit the value table one codebook slice (K rows) at a time,
    which stays in cache: about 1.6x faster than sample-major order at the paper's scale.
    """

    def __init__(self, model: DKVBModel, dataset, batch_size: int, device, compiled: bool = True):
        self.model = model
        self.compiled = compiled
        self.step = compiled_sgd_step() if compiled else sgd_step
        rows, targets = [], []
        with torch.no_grad():  # the training lookup searches all keys, dormant or not
            for x, y, *_ in DataLoader(dataset, batch_size=max(batch_size, 1024)):
                rows.append(model.bottleneck.flat_indices(model.embed(x.to(device)), only_used=False))
                targets.append(y.to(device))
        self.rows = torch.cat(rows).T.contiguous()  # (C*k, N)
        self.targets = torch.cat(targets).long()  # (N,)
        self.batch_size = batch_size
        self.epoch_counts = torch.bincount(self.rows.flatten(), minlength=model.bottleneck.usage_counts.numel())

    @torch.no_grad()
    def run_epoch(self, lr: float, label_smoothing: float, shuffle: bool = True) -> float:
        """One epoch of SGD steps over the cached rows; returns the mean training loss."""
        values = self.model.bottleneck.values.detach().view(-1, self.model.bottleneck.value_dim)  # shares storage
        lr_t, smoothing_t = torch.tensor(lr), torch.tensor(label_smoothing)  # tensors: no recompiles
        rows, targets = self.rows, self.targets
        if shuffle:  # one permutation per epoch; each step then reads contiguous column blocks
            order = torch.randperm(len(targets), device=targets.device)
            rows, targets = rows[:, order], targets[order]
        total_loss = 0.0
        with _threads(1 if self.compiled else torch.get_num_threads()):
            for start in range(0, len(targets), self.batch_size):
                batch = slice(start, start + self.batch_size)
                total_loss += float(self.step(values, rows[:, batch], targets[batch], lr_t, smoothing_t))
        self.model.bottleneck.usage_counts.view(-1).add_(self.epoch_counts)
        return total_loss / len(targets)


@contextmanager
def _threads(count: int):
    """Run with ``count`` torch threads. The compiled step moves ~65k value rows per batch at the
    paper's scale, too little work to share: on 2 cores one thread was 2-3x faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sgd_step(values: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, lr: torch.Tensor,
             label_smoothing: torch.Tensor) -> torch.Tensor:
    """One exact SGD step on ``values`` (C*K, V) in place for the selected rows of a batch,
    codebook-major (C*k, b), and labels (b,); returns the batch's summed cross-entropy (with label
    smoothing)."""
    num_rows, b = rows.shape
    num_classes = values.shape[1]
    log_p = values[rows].mean(0).log_softmax(dim=1)  # (b, V)
    target = F.one_hot(y, num_classes).to(log_p.dtype) * (1 - label_smoothing) + label_smoothing / num_classes
    grad = (log_p.exp() - target) * (-lr / (b * num_rows))  # -lr * dLoss/drow, (b, V)
    values.index_add_(0, rows.flatten(), grad.repeat(num_rows, 1))
    return -(target * log_p).sum()


_compiled_step = None


def compiled_sgd_step():
    """:func:`sgd_step` fused by ``torch.compile`` into one loop (about 15x faster on CPU), or the
    eager function, with a warning, where compilation is unavailable."""
    global _compiled_step
    if _compiled_step is None:
        try:
            candidate = torch.compile(sgd_step, dynamic=False)
            probe = torch.zeros(4, 2)
            candidate(probe, torch.tensor([[0], [1]]), torch.tensor([1]), torch.tensor(0.1), torch.tensor(0.0))
            _compiled_step = candidate
        except Exception as error:  # no C++ compiler, unsupported platform, ...
            warnings.warn(f"torch.compile of the DKVB fast step failed ({type(error).__name__}: {error}); "
                          "using the eager step, which is slower but gives the same results.", stacklevel=2)
            _compiled_step = sgd_step
    return _compiled_step
