"""Training values from cached key indices, without autograd.

With encoder, projection and keys frozen, a training sample always selects the same keys, so its
rows of ``values.view(C*K, V)`` are computed once per experience (N, C*k). With the mean decoder,
mean cross-entropy (label smoothing s) and plain SGD (lr), one step on a batch of b samples is:

    logits = mean of the selected value rows                     (b, V)   gather + mean
    g      = (softmax(logits) - ((1-s) onehot(y) + s/V)) / b     (b, V)   exact dLoss/dlogits
    values[row] -= lr * g / (C*k)  for every selected row        sparse update (index_add_)

which is exactly the gradient autograd would compute through the mean decoder, applied by SGD, so
only the selected rows change. Gradient clipping never acts here: the whole gradient's norm is at
most sqrt(2 / (C*k)) (each sample's g has norm <= sqrt(2)/b, shared over C*k rows), so the fast
path is only taken when the clip threshold is at least that bound.

Shape legend: N samples, b batch, C codebooks, K keys, k top-k, V value size (= classes).
"""

from __future__ import annotations

import math

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
    """True if the plugin overrides a per-iteration training callback (evaluation plugins excepted:
    in the fast path training-minibatch metrics are simply not reported)."""
    from avalanche.core import BasePlugin
    from avalanche.training.plugins import EvaluationPlugin
    if isinstance(plugin, EvaluationPlugin):
        return False
    return any(getattr(type(plugin), hook, None) is not getattr(BasePlugin, hook, None)
               for hook in _ITERATION_HOOKS if hasattr(BasePlugin, hook))


class CachedIndexTrainer:
    """Holds one experience's selected rows (N, C*k) and targets (N,), and runs SGD epochs on them."""

    def __init__(self, model: DKVBModel, dataset, batch_size: int, device):
        self.model = model
        rows, targets = [], []
        with torch.no_grad():  # the training lookup searches all keys, dormant or not
            for x, y, *_ in DataLoader(dataset, batch_size=max(batch_size, 1024)):
                rows.append(model.bottleneck.flat_indices(model.embed(x.to(device)), only_used=False))
                targets.append(y.to(device))
        self.rows = torch.cat(rows)  # (N, C*k)
        self.targets = torch.cat(targets).long()  # (N,)
        self.batch_size = batch_size
        self.epoch_counts = torch.bincount(self.rows.flatten(), minlength=model.bottleneck.usage_counts.numel())

    @torch.no_grad()
    def run_epoch(self, lr: float, label_smoothing: float, shuffle: bool = True) -> float:
        """One epoch of SGD steps over the cached rows; returns the mean training loss."""
        values = self.model.bottleneck.values.view(-1, self.model.bottleneck.value_dim)  # (C*K, V)
        num_rows, num_classes = self.rows.shape[1], values.shape[1]
        order = torch.randperm(len(self.targets), device=self.rows.device) if shuffle else None
        total_loss = 0.0
        for start in range(0, len(self.targets), self.batch_size):
            sel = order[start:start + self.batch_size] if shuffle else slice(start, start + self.batch_size)
            rows, y = self.rows[sel], self.targets[sel]  # (b, C*k), (b,)
            logits = F.embedding_bag(rows, values, mode="mean")  # (b, V)
            log_p = logits.log_softmax(dim=1)
            target = F.one_hot(y, num_classes).to(logits.dtype) * (1.0 - label_smoothing) + label_smoothing / num_classes
            total_loss -= float((target * log_p).sum())
            grad = (log_p.exp() - target) * (-lr / (len(y) * num_rows))  # -lr * dLoss/drow, (b, V)
            values.index_add_(0, rows.flatten(), grad.repeat_interleave(num_rows, dim=0))
        self.model.bottleneck.usage_counts.view(-1).add_(self.epoch_counts)
        return total_loss / len(self.targets)
