"""DKVB with a Gaussian inside each key's cell: count values plus per-(key, class) means of the heads.

Shape legend as in :mod:`avalanche_dkvb.count_values` (B batch, C codebooks, K keys, k top-k, V classes,
d key size, R = C*K rows).

A key's count value says which classes fall into its cell; it cannot tell where inside the cell a head
lies. :class:`MomentValues` also keeps, per key and class, the sum of the heads that selected the key
(``class_head_sums`` (C, K, V, d) float64), and scores class c for a head h in key k's cell as

    value_kc - moment_weight * |h - mu_kc|^2 / (2 * head_variance),
    mu_kc = (S_kc + prior_strength * key_k) / (n_kc + prior_strength),

the count rule's value plus an isotropic Gaussian log-likelihood around the class's mean in the cell,
shrunk towards the key (a class never seen in the cell sits at the key). The scores of a codebook's
top-k rows are averaged and the mean decoder averages the codebooks, as for count values.
``head_variance`` is fixed before any labelled data: by default the keys' mean squared quantisation
error per dimension on the key-initialisation data.

The guarantees of count values hold: the statistics are sums, so the model is the same whatever the
order of the stream (to float64 rounding); a sample changes only the statistics of the keys it selects;
no sample is stored; no task identity or boundary is used; :meth:`forget_classes` is exact. Cost: the
sums take C*K*V*d float64 (8 bytes each): 1.2 GB at C 256, K 4096, 10 classes, 73 MB at K 256, which
is where the cells hold enough samples for a mean to help (see the README's ablation).
"""

from __future__ import annotations

import torch

from avalanche_dkvb.count_values import CountValues, Selection
from avalanche_dkvb.validation import check_non_negative_float, check_positive_float, check_positive_int

__all__ = ["MomentValues"]


class MomentValues(CountValues):
    """:class:`CountValues` whose scores add a per-(key, class) Gaussian of the heads in the key's cell.

    ``moment_weight`` (>= 0; 0 gives exactly the count values' predictions), ``prior_strength`` (> 0,
    pseudo-samples at the key), ``head_variance`` (> 0, or None: measured on ``init_data`` when the keys
    are initialised, so None needs ``init_data``). Other arguments as :class:`CountValues`, except
    ``distance_temperature`` (uniform top-k only). ``score_chunk_elements`` bounds the (B', C*k, V, d)
    temporaries of the scores."""

    def __init__(self, *, model, moment_weight: float = 3.0, prior_strength: float = 1.0,
                 head_variance: float | None = None, score_chunk_elements: int = 2**24, **kwargs):
        if kwargs.get("distance_temperature") is not None:
            raise ValueError("MomentValues supports uniform top-k only; got distance_temperature="
                             f"{kwargs['distance_temperature']}.")
        check_non_negative_float("moment_weight", moment_weight)
        check_positive_float("prior_strength", prior_strength)
        check_positive_int("score_chunk_elements", score_chunk_elements)
        if head_variance is not None:
            check_positive_float("head_variance", head_variance)
        elif kwargs.get("init_data") is None:
            raise ValueError("MomentValues needs head_variance when init_data is None (it is otherwise measured "
                             "on the key-initialisation data).")
        super().__init__(model=model, **kwargs)
        self.moment_weight, self.prior_strength = float(moment_weight), float(prior_strength)
        self.head_variance = None if head_variance is None else float(head_variance)
        self.score_chunk_elements = score_chunk_elements
        bottleneck = model.bottleneck
        self.class_head_sums = torch.zeros(bottleneck.num_codebooks, bottleneck.num_keys, bottleneck.value_dim,
                                           bottleneck.key_dim, dtype=torch.float64, device=bottleneck.values.device)

    def _init_keys(self, embeddings: torch.Tensor) -> None:
        super()._init_keys(embeddings)
        if self.head_variance is None:
            error = float(self.model.bottleneck.quantization_error(embeddings))
            self.head_variance = error / self.model.bottleneck.key_dim

    def _before_training_exp(self, **kwargs):
        self.class_head_sums = self.class_head_sums.to(self.model.bottleneck.values.device)
        super()._before_training_exp(**kwargs)

    def _absorb(self, selection: Selection, labels: torch.Tensor) -> None:
        super()._absorb(selection, labels)  # checks the labels, counts, refreshes the values
        bottleneck = self.model.bottleneck
        cells = (selection.rows * bottleneck.value_dim + labels.unsqueeze(1)).flatten()  # (B*C*k,)
        heads = selection.heads.repeat_interleave(bottleneck.top_k, dim=1)  # (B, C*k, d): a head per row
        self.class_head_sums.view(-1, bottleneck.key_dim).index_add_(0, cells, heads.flatten(0, 1).double())

    def _row_scores(self, selection: Selection) -> torch.Tensor:
        """Value minus the scaled squared distance to the class's shrunk mean: (B, C*k, V)."""
        bottleneck = self.model.bottleneck
        V, d = bottleneck.value_dim, bottleneck.key_dim
        values = super()._row_scores(selection)
        if self.moment_weight == 0:
            return values
        heads = selection.heads.repeat_interleave(bottleneck.top_k, dim=1).double()  # (B, C*k, d)
        sums = self.class_head_sums.view(-1, V, d)
        counts = self.class_counts.view(-1, V)
        keys = bottleneck.keys.view(-1, d)
        scale = self.moment_weight / (2 * self.head_variance)
        per_sample = selection.rows.shape[1] * V * d
        chunk = max(1, self.score_chunk_elements // per_sample)
        penalties = []
        for rows, h in zip(selection.rows.split(chunk), heads.split(chunk)):
            means = (sums[rows] + self.prior_strength * keys[rows].double().unsqueeze(2)) \
                / (counts[rows].double() + self.prior_strength).unsqueeze(-1)  # (b, C*k, V, d)
            penalties.append(scale * (h.unsqueeze(2) - means).square().sum(-1))  # (b, C*k, V)
        return values - torch.cat(penalties).to(values.dtype)

    @torch.no_grad()
    def forget_classes(self, classes) -> None:
        classes = list(classes)
        super().forget_classes(classes)  # validates, removes counts and usage, refreshes the values
        columns = torch.tensor(sorted(set(classes)), dtype=torch.long, device=self.class_head_sums.device)
        if len(columns):
            self.class_head_sums[..., columns, :] = 0

    def count_state(self) -> dict:
        return {**super().count_state(), "class_head_sums": self.class_head_sums.clone(),
                "head_variance": self.head_variance}

    def load_count_state(self, state: dict) -> None:
        if "class_head_sums" not in state:
            raise ValueError("The checkpoint holds count values without head moments; build a CountValues.")
        super().load_count_state(state)
        self.class_head_sums = state["class_head_sums"].to(self.class_counts.device)
        self.head_variance = state["head_variance"]
