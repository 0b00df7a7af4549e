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

Scoring. With the mean decoder the logits are the average over the C*k selected rows r of the row
scores. Writing e_r = h_r - key_r (the head's offset from the selected key) and m_rv = mu_rv - key_r =
(S_rv - n_rv key_r) / (n_rv + prior_strength) (the class's shrunk mean, from the key), with
s = moment_weight / (2 head_variance):

    logits_v = mean_r value_rv - s mean_r |e_r|^2 - s mean_r |m_rv|^2 + (2 s / (C k)) sum_r e_r . m_rv.

The last two terms are one weighted gather-sum over a derived table, ``moment_table`` (R*(d+1), V)
float32, whose rows r*(d+1) + j (j < d) hold m_rvj and row r*(d+1) + d holds |m_rv|^2 for every class
v: for each sample, (d+1) table rows per selected row r, weighted 2 s e_rj / (C k) and -s / (C k)
(``torch.nn.functional.embedding_bag``, which sums duplicate rows; on the CPU codebook block by
codebook block, so the part of the table read stays in cache). Centring on the key keeps the terms of
the expansion of the order of the cell's size, so the float32 sums keep the float64 distances' scores
(to 2e-7 of the largest logit at C 512, K 256, d 14, 200 classes; 7e-7 on the tests' small model with
the means themselves in the table). There one CPU thread scores a sample in 0.4 ms, against 48 ms for
the former per-row scores, whose (C*k, V, d) float64 means per sample were the cost; the temporaries
are now (B, codebooks of a block * k, d+1) weights. The table is derived from the sums, counts and
keys: built on first use, updated cell by cell (only the (row, class) cells a minibatch touched) after
each minibatch, column by column after :meth:`forget_classes`, and rebuilt after the keys are
initialised or a checkpoint is loaded. A training minibatch's output (before its own counts are added)
uses the same formula.

The guarantees of count values hold: the statistics are sums, so the model is the same whatever the
order of the stream (to float64 rounding); a sample changes only the statistics of the keys it selects;
no sample is stored; no task identity or boundary is used; :meth:`forget_classes` is exact. Cost: the
sums take C*K*V*d float64 (8 bytes each): 1.2 GB at C 256, K 4096, 10 classes, 73 MB at K 256, which
is where the cells hold enough samples for a mean to help (see the README's ablation); the scoring
table C*K*(d+1)*V float32 (4 bytes each) adds a bit more than half of that: 0.63 GB at C 256, K 4096,
10 classes; 3.1 GB next to the sums' 5.9 GB at C 1024, K 256, d 14, 200 classes (Split-TinyImageNet).
It is not built when ``moment_weight`` is 0 (the count values' scores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avalanche_dkvb.count_values import CountValues, Selection
from avalanche_dkvb.validation import check_non_negative_float, check_positive_float, check_positive_int

__all__ = ["MomentValues"]

_REBUILD_CHUNK_ELEMENTS = 2**22  # float64 cells of the sums converted at once when the table is rebuilt
_DEVICE_BLOCK_ELEMENTS = 2**25  # off the CPU: per-block (B, codebooks * k, d+1) weights, all codebooks if they fit


class MomentValues(CountValues):
    """:class:`CountValues` whose scores add a per-(key, class) Gaussian of the heads in the key's cell.

    ``moment_weight`` (>= 0; 0 gives exactly the count values' predictions), ``prior_strength`` (> 0,
    pseudo-samples at the key), ``head_variance`` (> 0, or None: measured on ``init_data`` when the keys
    are initialised, so None needs ``init_data``). Other arguments as :class:`CountValues` (which needs
    the mean decoder), except ``distance_temperature`` (uniform top-k only). ``score_chunk_elements``:
    on the CPU the codebooks are scored in blocks whose part of ``moment_table`` holds at most this many
    elements (at least one codebook), so the block stays in cache (2**21 float32: 8 MB)."""

    def __init__(self, *, model, moment_weight: float = 3.0, prior_strength: float = 1.0,
                 head_variance: float | None = None, score_chunk_elements: int = 2**21, **kwargs):
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
        super().__init__(model=model, **kwargs)  # refuses a decoder other than the mean decoder
        self.moment_weight, self.prior_strength = float(moment_weight), float(prior_strength)
        self.head_variance = None if head_variance is None else float(head_variance)
        self.score_chunk_elements = score_chunk_elements
        bottleneck = model.bottleneck
        self.class_head_sums = torch.zeros(bottleneck.num_codebooks, bottleneck.num_keys, bottleneck.value_dim,
                                           bottleneck.key_dim, dtype=torch.float64, device=bottleneck.values.device)
        self.moment_table: torch.Tensor | None = None  # (R*(d+1), V) float32, built on first use

    def _init_keys(self, embeddings: torch.Tensor) -> None:
        super()._init_keys(embeddings)
        self.moment_table = None  # the keys moved: every cell's mean offset changes
        if self.head_variance is None:
            error = float(self.model.bottleneck.quantization_error(embeddings))
            self.head_variance = error / self.model.bottleneck.key_dim

    def _before_training_exp(self, **kwargs):
        device = self.model.bottleneck.values.device
        self.class_head_sums = self.class_head_sums.to(device)
        if self.moment_table is not None:
            self.moment_table = self.moment_table.to(device)
        super()._before_training_exp(**kwargs)

    def _absorb(self, selection: Selection, labels: torch.Tensor) -> None:
        super()._absorb(selection, labels)  # checks the labels, counts, refreshes the values
        bottleneck = self.model.bottleneck
        cells = (selection.rows * bottleneck.value_dim + labels.unsqueeze(1)).flatten()  # (B*C*k,)
        heads = selection.heads.repeat_interleave(bottleneck.top_k, dim=1)  # (B, C*k, d): a head per row
        self.class_head_sums.view(-1, bottleneck.key_dim).index_add_(0, cells, heads.flatten(0, 1).double())
        if self.moment_table is not None:
            cells = cells.unique()
            self._refresh_table(cells // bottleneck.value_dim, cells % bottleneck.value_dim)

    # -- the scoring table ---------------------------------------------------------------------------
    def _table_entries(self, rows: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(m_rv, |m_rv|^2) for broadcastable index tensors ``rows`` (into R) and ``classes`` (into V):
        (..., d+1) float32, computed in float64 from the sums, counts and keys."""
        bottleneck = self.model.bottleneck
        V, d = bottleneck.value_dim, bottleneck.key_dim
        sums = self.class_head_sums.view(-1, V, d)[rows, classes]  # (..., d)
        counts = self.class_counts.view(-1, V)[rows, classes].double().unsqueeze(-1)  # (..., 1)
        keys = bottleneck.keys.view(-1, d)[rows].double()  # broadcasts against the sums
        offsets = (sums - counts * keys) / (counts + self.prior_strength)
        return torch.cat([offsets, offsets.square().sum(-1, keepdim=True)], -1).float()

    def _refresh_table(self, rows: torch.Tensor, classes: torch.Tensor) -> None:
        """Recompute the table's cells (rows[i], classes[i]) (equal-length 1-D index tensors)."""
        bottleneck = self.model.bottleneck
        table = self.moment_table.view(-1, bottleneck.key_dim + 1, bottleneck.value_dim)
        rows, classes = rows.to(table.device), classes.to(table.device)
        table[rows, :, classes] = self._table_entries(rows, classes)  # (n, d+1)

    def _refresh_table_columns(self, classes: torch.Tensor | None) -> None:
        """Recompute every row's cells of ``classes`` (1-D indices into V; None = all classes)."""
        bottleneck = self.model.bottleneck
        R, V, d = bottleneck.num_codebooks * bottleneck.num_keys, bottleneck.value_dim, bottleneck.key_dim
        table = self.moment_table.view(R, d + 1, V)
        width = V if classes is None else len(classes)
        step = max(1, _REBUILD_CHUNK_ELEMENTS // max(1, width * (d + 1)))
        everything = torch.arange(V, device=table.device) if classes is None else classes.to(table.device)
        for start in range(0, R, step):
            rows = torch.arange(start, min(R, start + step), device=table.device)
            entries = self._table_entries(rows.unsqueeze(1), everything.unsqueeze(0))  # (rows, width, d+1)
            if classes is None:
                table[start:start + len(rows)] = entries.transpose(1, 2)
            else:
                table[rows.unsqueeze(1), :, everything.unsqueeze(0)] = entries

    def _score_table(self) -> torch.Tensor:
        """``moment_table`` on the values' device, built (every cell) if missing."""
        bottleneck = self.model.bottleneck
        device = bottleneck.values.device
        if self.moment_table is None:
            R = bottleneck.num_codebooks * bottleneck.num_keys
            self.class_head_sums = self.class_head_sums.to(device)
            self.class_counts = self.class_counts.to(device)
            self.moment_table = torch.empty(R * (bottleneck.key_dim + 1), bottleneck.value_dim,
                                            dtype=torch.float32, device=device)
            self._refresh_table_columns(None)
        elif self.moment_table.device != device:
            self.moment_table = self.moment_table.to(device)
        return self.moment_table

    # -- scores ----------------------------------------------------------------------------------------
    def _codebook_block(self, batch_size: int) -> int:
        """How many codebooks are scored per embedding_bag call."""
        bottleneck = self.model.bottleneck
        d1, C = bottleneck.key_dim + 1, bottleneck.num_codebooks
        if self.moment_table.device.type == "cpu":
            return max(1, min(C, self.score_chunk_elements // (bottleneck.num_keys * d1 * bottleneck.value_dim)))
        return max(1, min(C, _DEVICE_BLOCK_ELEMENTS // max(1, batch_size * bottleneck.top_k * d1)))

    def _logits(self, selection: Selection) -> torch.Tensor:
        """Logits (B, V) of already-looked-up rows: the mean over the C*k rows of value minus the scaled
        squared distance to the class's shrunk mean, by the expansion in the module docstring."""
        if self.moment_weight == 0:
            return super()._logits(selection)  # exactly the count values' scores
        bottleneck = self.model.bottleneck
        if not self.model.uses_mean_decoder:
            raise ValueError("MomentValues scores need the mean decoder; the model's decoder was replaced by "
                             f"{type(self.model.decoder).__name__}.")
        table = self._score_table()
        C, K, k, V, d = (bottleneck.num_codebooks, bottleneck.num_keys, bottleneck.top_k, bottleneck.value_dim,
                         bottleneck.key_dim)
        d1, per_sample = d + 1, C * k
        scale = self.moment_weight / (2 * self.head_variance)
        device = table.device
        rows = selection.rows.to(device).view(-1, C, k)  # (B, C, k)
        heads = selection.heads.to(device)  # (B, C, d)
        B = rows.shape[0]
        values = bottleneck.values.detach().view(-1, V)
        keys = bottleneck.keys.view(-1, d)
        value_sum = torch.zeros(B, V, dtype=torch.float32, device=device)
        moment_sum = torch.zeros(B, V, dtype=torch.float32, device=device)
        head_square = torch.zeros(B, dtype=torch.float64, device=device)
        slots = torch.arange(d1, device=device)
        step = self._codebook_block(B)
        for c0 in range(0, C, step):
            block_rows = rows[:, c0:c0 + step]  # (B, g, k)
            first = c0 * K
            offsets = heads[:, c0:c0 + step].unsqueeze(2).double() - keys[block_rows].double()  # (B, g, k, d)
            head_square += offsets.square().sum((1, 2, 3))
            local = (block_rows - first).flatten(1)  # (B, g*k) rows of this block
            weights = torch.cat([offsets.flatten(1, 2) * (2 * scale / per_sample),
                                 torch.full((*local.shape, 1), -scale / per_sample, dtype=torch.float64,
                                            device=device)], -1)  # (B, g*k, d+1)
            cells = (local.unsqueeze(-1) * d1 + slots).flatten(1)  # (B, g*k*(d+1)) rows of the table block
            block = table[first * d1:(c0 + step) * K * d1]
            moment_sum += F.embedding_bag(cells, block, per_sample_weights=weights.flatten(1).float(), mode="sum")
            value_sum += F.embedding_bag(local, values[first:(c0 + step) * K], mode="sum")
        return value_sum / per_sample + moment_sum - (scale / per_sample * head_square).float().unsqueeze(1)

    @torch.no_grad()
    def forget_classes(self, classes) -> None:
        classes = list(classes)
        super().forget_classes(classes)  # validates, removes counts and usage, refreshes the values
        columns = torch.tensor(sorted(set(classes)), dtype=torch.long, device=self.class_head_sums.device)
        if len(columns):
            self.class_head_sums[..., columns, :] = 0
            if self.moment_table is not None:
                self._refresh_table_columns(columns)

    def count_state(self) -> dict:
        return {**super().count_state(), "class_head_sums": self.class_head_sums, "head_variance": self.head_variance}

    def load_count_state(self, state: dict) -> None:
        if "class_head_sums" not in state:
            raise ValueError("The checkpoint holds count values without head moments; build a CountValues.")
        super().load_count_state(state)
        self.class_head_sums = state["class_head_sums"].to(self.class_counts.device)
        self.head_variance = state["head_variance"]
        self.moment_table = None  # rebuilt from the loaded sums on first use
