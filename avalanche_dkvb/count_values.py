"""DKVB with count values: per-key class counts in one pass, no SGD.

Shape legend: B batch, D input size, C codebooks, K keys per codebook, k keys fetched per codebook
(top-k), V value size (= number of classes), R = C*K rows of the value table.

The keys stay what DKVB makes them (fixed heads, keys initialised on unlabelled data, then frozen);
only the way the values are filled changes. Every training sample adds one to the count of its class
in each of the C*k rows it selects; each row's value is a function of that row's counts alone:

    ``"log_posterior"`` (default)  log(V * (n_kc + a) / (n_k + V a)): the Laplace-smoothed log class
                                   posterior of the key, shifted by log V so an unvisited key is 0;
    ``"posterior"``                V * (n_kc + a) / (n_k + V a) - 1, the same posterior, not logged;
    ``"counts"``                   n_kc, the raw (possibly weighted) counts: what SGD on the values
                                   degenerates to at the paper's settings (tiny steps around uniform
                                   logits).

with ``n_kc`` the row's count of class c, ``n_k`` its total and ``a`` = ``smoothing`` (default 0.1,
the best of the rules measured on Split-CIFAR10 embeddings: see the README's ablation). The mean decoder
then averages the selected rows over codebooks, as in DKVB.

With top-k > 1 the k rows of a codebook are averaged with weights w (summing to 1 per codebook), both
when counting and when predicting: uniform by default, or, with ``distance_temperature`` tau,
``w = softmax(-|h - key|^2 / tau)`` over the k keys (distance-weighted top-k: a selection counts k*w,
so as tau grows the counts tend to uniform top-k's; weighted counts are float64).

Consequences:

- the model after a stream is exactly the same whatever the order of its samples and experiences
  (integer counts, values recomputed from them; to float64 rounding with distance weights);
- a labelled sample changes only the value rows of the keys it selects; no sample is stored; no task
  identity or boundary is used (values are refreshed after every minibatch);
- :meth:`CountValues.forget_classes` removes classes exactly (the model equals one trained without
  them).
"""

from __future__ import annotations

import numbers
from typing import Iterable, NamedTuple, Sequence

import torch
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import DataLoader, Dataset

from avalanche_dkvb.key_init import init_keys
from avalanche_dkvb.model import DKVBModel
from avalanche_dkvb.validation import check_positive_float, check_positive_int

VALUE_RULES = ("log_posterior", "posterior", "counts")


class Selection(NamedTuple):
    """What a minibatch of B inputs selects: ``rows`` (B, C*k) of the (C*K, V) value table, their
    ``weights`` (B, C*k; each codebook's k sum to 1; None = uniform) and the ``heads`` (B, C, d)."""

    rows: torch.Tensor
    weights: torch.Tensor | None
    heads: torch.Tensor


def values_from_counts(counts: torch.Tensor, rule: str = "log_posterior", smoothing: float = 0.1) -> torch.Tensor:
    """Value rows from per-key class counts: (..., V) counts (integer, or weighted) -> (..., V) float32 values.

    Each output row depends only on the same input row; an all-zero row gives an all-zero value.
    Computed in float64, so the result does not depend on how rows are batched.
    """
    if rule not in VALUE_RULES:
        raise ValueError(f"rule must be one of {VALUE_RULES}, got {rule!r}.")
    counts = counts.to(torch.float64)
    if rule == "counts":
        return counts.to(torch.float32)
    check_positive_float("smoothing", smoothing)  # a pseudo-count per class: 0 or inf give NaN rows
    num_classes = counts.shape[-1]
    posterior = (counts + smoothing) / (counts.sum(-1, keepdim=True) + num_classes * smoothing)
    relative = num_classes * posterior  # 1 for a uniform posterior
    return (relative.log() if rule == "log_posterior" else relative - 1).to(torch.float32)


def _check_labels(labels: torch.Tensor, num_classes: int, batch_size: int) -> None:
    """TypeError unless ``labels`` is an integer tensor; ValueError unless it is (B,) in [0, V)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor, got {kind}.")
    if tuple(labels.shape) != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},) to match the inputs, got {tuple(labels.shape)}.")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the value size), got range "
                         f"[{int(labels.min())}, {int(labels.max())}].")


class CountValues(SupervisedTemplate):
    """DKVB whose values are computed from per-key class counts instead of trained by SGD.

    Used like :class:`avalanche_dkvb.DKVB` (``train(experience)``, ``eval(stream)``, any
    ``EvaluationPlugin``) over a :class:`DKVBModel` with the mean decoder, e.g. from
    ``create_dkvb_model``. Before the first training experience the keys are initialised on
    ``init_data`` (unlabelled model inputs: a tensor (N, ...) or a dataset whose items are ``x`` or
    ``(x, ...)``) with :func:`avalanche_dkvb.key_init.init_keys` and frozen; ``init_data`` may be
    None only when the model's keys are frozen already.

    One pass per experience: there is no ``train_epochs`` argument (it is fixed to 1), since a second
    pass would count every sample twice; training the same experience twice does count it twice.
    Each minibatch: training-mode lookup (no masking), ``bottleneck.count_usage`` (so evaluation masks
    dormant keys as in DKVB), class counts added with ``index_add_``, and the touched value rows
    recomputed. The training-minibatch output seen by metrics is computed before its own counts are
    added (prequential, as Avalanche's ``StreamingLDA``). ``class_counts`` (C, K, V) int32 counts the
    selections; with ``distance_temperature`` (a positive float, in squared head-distance units) the
    values come from ``class_weights`` (C, K, V) float64, the same selections weighted.
    """

    def __init__(
        self,
        *,
        model: DKVBModel,
        value_rule: str = "log_posterior",
        smoothing: float = 0.1,
        distance_temperature: float | None = None,
        init_data: torch.Tensor | Dataset | None = None,
        key_init: str = "ema",
        key_init_kwargs: dict | None = None,
        train_mb_size: int = 1024,
        eval_mb_size: int = 1024,
        embed_batch_size: int = 1024,
        device: str | torch.device = "cpu",
        plugins: Sequence | None = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
    ):
        if not isinstance(model, DKVBModel):
            raise TypeError(f"CountValues needs a DKVBModel, got {type(model).__name__}.")
        if not model.uses_mean_decoder:
            raise ValueError(f"CountValues needs the mean decoder (values are class scores), got "
                             f"{type(model.decoder).__name__}.")
        if value_rule not in VALUE_RULES:
            raise ValueError(f"value_rule must be one of {VALUE_RULES}, got {value_rule!r}.")
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real):
            raise TypeError(f"smoothing must be a real number, got {type(smoothing).__name__}.")
        if value_rule != "counts":  # a pseudo-count per class; the counts rule does not use it
            check_positive_float("smoothing", smoothing)
        if distance_temperature is not None:
            check_positive_float("distance_temperature", distance_temperature)
        check_positive_int("embed_batch_size", embed_batch_size)
        if init_data is None and not bool(model.bottleneck.keys_frozen):
            raise ValueError("CountValues needs init_data (unlabelled inputs for the key initialisation) "
                             "unless the model's keys are frozen already.")
        super().__init__(model=model, optimizer=None, train_mb_size=train_mb_size, train_epochs=1,
                         eval_mb_size=eval_mb_size, device=device, plugins=plugins, evaluator=evaluator,
                         eval_every=eval_every)
        self.value_rule, self.smoothing = value_rule, float(smoothing)
        self.distance_temperature = None if distance_temperature is None else float(distance_temperature)
        self.init_data, self.key_init = init_data, key_init
        self.key_init_kwargs = dict(key_init_kwargs or {})
        self.embed_batch_size = embed_batch_size
        bottleneck = model.bottleneck
        table = (bottleneck.num_codebooks, bottleneck.num_keys, bottleneck.value_dim)
        self.class_counts = torch.zeros(table, dtype=torch.int32, device=bottleneck.values.device)
        self.class_weights = None if distance_temperature is None else \
            torch.zeros(table, dtype=torch.float64, device=bottleneck.values.device)

    # -- Avalanche extension points --------------------------------------------------------------
    def make_optimizer(self, **kwargs):
        """No optimizer: the values are computed from counts."""

    def _before_training_exp(self, **kwargs):
        bottleneck = self.model.bottleneck
        self.class_counts = self.class_counts.to(bottleneck.values.device)
        if self.class_weights is not None:
            self.class_weights = self.class_weights.to(bottleneck.values.device)
        if not bool(bottleneck.keys_frozen):
            self._init_keys(self._embed(self.init_data))
            self._refresh_values(None)  # every row = the rule at zero counts, before any labelled data
        super()._before_training_exp(**kwargs)

    def _init_keys(self, embeddings: torch.Tensor) -> None:
        """Initialise the keys on unlabelled ``embeddings`` (N, D) and freeze them."""
        init_keys(self.model.bottleneck, embeddings, self.key_init, **self.key_init_kwargs)
        self.model.bottleneck.freeze_keys()

    @torch.no_grad()
    def training_epoch(self, **kwargs):
        """One counting pass over the experience (minibatch callbacks fire as in the generic loop)."""
        for self.mbatch in self.dataloader:
            if self._stop_training:
                break
            self._unpack_minibatch()
            self._before_training_iteration(**kwargs)
            self.loss = self._make_empty_loss()
            selection = self._select(self.mb_x, only_used=False)
            self._before_forward(**kwargs)
            self.mb_output = self._logits(selection)
            self._after_forward(**kwargs)
            self.loss += self.criterion()
            self._before_update(**kwargs)
            self._absorb(selection, self.mb_y)
            self._after_update(**kwargs)
            self._after_training_iteration(**kwargs)

    def forward(self):
        """The minibatch's logits; evaluation searches only the used keys, as DKVB."""
        return self.logits(self.mb_x, only_used=not self.is_training)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, only_used: bool = True) -> torch.Tensor:
        """Logits (B, V) of model inputs ``x`` (B, ...) from the current values, with the key weights;
        ``only_used``: search only keys used in training (evaluation, as DKVB)."""
        return self._logits(self._select(x.to(self.device), only_used=only_used))

    # -- counts ------------------------------------------------------------------------------------
    def _absorb(self, selection: Selection, labels: torch.Tensor) -> None:
        """Add each sample's class (labels (B,)) to each row it selects, with weight 1 or its weight."""
        bottleneck = self.model.bottleneck
        flat_idx, weights = selection.rows, selection.weights
        _check_labels(labels, bottleneck.value_dim, flat_idx.shape[0])
        bottleneck.count_usage(flat_idx)
        cells = flat_idx * bottleneck.value_dim + labels.unsqueeze(1)  # (B, C*k) cells of the (R, V) table
        cells = cells.flatten()
        self.class_counts.view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=torch.int32))
        if weights is not None:
            # k * w: a sample adds k to each codebook as in uniform top-k, so flat weights count the same
            self.class_weights.view(-1).index_add_(0, cells, bottleneck.top_k * weights.flatten().double())
        self._refresh_values(flat_idx.flatten().unique())

    def _refresh_values(self, rows: torch.Tensor | None) -> None:
        """Recompute the value rows ``rows`` (R' indices into the (R, V) table; None = all rows)."""
        bottleneck = self.model.bottleneck
        table = self.class_counts if self.class_weights is None else self.class_weights
        counts = table.view(-1, bottleneck.value_dim)
        values = bottleneck.values.data.view(-1, bottleneck.value_dim)
        if rows is None:
            values.copy_(values_from_counts(counts, self.value_rule, self.smoothing))
        else:
            values[rows] = values_from_counts(counts[rows], self.value_rule, self.smoothing).to(values.device)

    @torch.no_grad()
    def forget_classes(self, classes: Iterable[int]) -> None:
        """Remove every count of ``classes`` (ints in [0, V)) and their key selections from the usage
        counters, then recompute the affected rows: the model equals one trained without those
        classes' samples (keys selected only by them become dormant again)."""
        bottleneck = self.model.bottleneck
        classes = list(classes)
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise TypeError(f"classes must be integers, got {c!r} ({type(c).__name__}).")
            if not 0 <= c < bottleneck.value_dim:
                raise ValueError(f"classes must lie in [0, {bottleneck.value_dim}) (the value size), got {c}.")
        if not classes:
            return
        columns = torch.tensor(sorted(set(classes)), device=self.class_counts.device)
        removed = self.class_counts[..., columns].sum(-1)  # (C, K) selections by the forgotten classes
        if bool((removed > bottleneck.usage_counts).any()):
            raise RuntimeError("The usage counters hold fewer selections than the class counts; they were "
                               "reset or changed outside this strategy, so forgetting cannot be exact.")
        self.class_counts[..., columns] = 0
        if self.class_weights is not None:
            self.class_weights[..., columns] = 0
        bottleneck.usage_counts -= removed.to(bottleneck.usage_counts.dtype)
        self._refresh_values(torch.nonzero(removed.flatten()).flatten())

    # -- helpers -----------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor, only_used: bool) -> Selection:
        """The rows, weights and heads of inputs ``x`` (B, ...)."""
        bottleneck = self.model.bottleneck
        heads = bottleneck.project(self.model.embed(x))  # (B, C, d)
        idx = bottleneck.nearest_keys(heads, only_used=only_used)  # (B, C, k)
        offsets = torch.arange(bottleneck.num_codebooks, device=idx.device).view(1, -1, 1) * bottleneck.num_keys
        flat_idx = (idx + offsets).flatten(1)
        if self.distance_temperature is None:
            return Selection(flat_idx, None, heads)
        keys = bottleneck.keys.view(-1, bottleneck.key_dim)[flat_idx].view(*idx.shape, -1)  # (B, C, k, d)
        distances = (heads.unsqueeze(2) - keys).square().sum(-1)  # (B, C, k)
        return Selection(flat_idx, torch.softmax(-distances / self.distance_temperature, dim=-1).flatten(1), heads)

    def _row_scores(self, selection: Selection) -> torch.Tensor:
        """Each selected row's class scores (B, C*k, V): its value."""
        return self.model.bottleneck.values.view(-1, self.model.bottleneck.value_dim)[selection.rows]

    def _logits(self, selection: Selection) -> torch.Tensor:
        """The output for already-looked-up rows: (B, C*k) rows -> logits (B, V), the rows' scores
        averaged over each codebook's k keys (with the weights), then the model's decoder."""
        bottleneck = self.model.bottleneck
        scores = self._row_scores(selection)  # (B, C*k, V)
        shape = (scores.shape[0], bottleneck.num_codebooks, bottleneck.top_k, -1)
        if selection.weights is None:
            scores = scores.view(shape).mean(2)
        else:
            scores = (scores * selection.weights.unsqueeze(-1).to(scores.dtype)).view(shape).sum(2)
        return self.model.decoder(scores)

    # -- checkpoints ---------------------------------------------------------------------------------
    def count_state(self) -> dict:
        """The tensors outside the model that a checkpoint must carry: the strategy's own, not copies (at
        Split-TinyImageNet scale a copy of MomentValues' sums alone is 5.9 GB); serialise or clone them
        before training on."""
        return {"class_counts": self.class_counts, "class_weights": self.class_weights}

    def load_count_state(self, state: dict) -> None:
        """Restore :meth:`count_state`; ValueError if it was made with other settings."""
        if (state.get("class_weights") is None) != (self.class_weights is None):
            raise ValueError("The checkpoint's count values and this strategy differ in distance_temperature "
                             "(weighted or uniform top-k); build the strategy with the checkpoint's settings.")
        device = self.class_counts.device
        self.class_counts = state["class_counts"].to(device)
        if self.class_weights is not None:
            self.class_weights = state["class_weights"].to(device)

    @torch.no_grad()
    def _embed(self, data) -> torch.Tensor:
        """The frozen encoder's embeddings (N, D) of unlabelled ``data``, in batches."""
        if isinstance(data, torch.Tensor):
            batches = data.split(self.embed_batch_size)
        else:
            batches = (b[0] if isinstance(b, (tuple, list)) else b
                       for b in DataLoader(data, batch_size=self.embed_batch_size))
        return torch.cat([self.model.embed(b.to(self.device)) for b in batches])
