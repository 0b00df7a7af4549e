"""Key initialisation on unlabelled embeddings, vectorised over codebooks.

Shape legend: N samples, B batch, D input size, C codebooks, K keys per codebook, d key size.

Both initialisers see only the bottleneck's heads (its fixed projection of the inputs); neither uses
labels, and both refuse to run once the keys are frozen.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from avalanche_dkvb.bottleneck import KeyValueBottleneck
from avalanche_dkvb.validation import check_finite, check_positive_int


def _batches(data: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    """Shuffled (B, D) batches covering ``data`` (N, D) once."""
    order = torch.randperm(data.shape[0], generator=generator)
    for start in range(0, data.shape[0], batch_size):
        yield data[order[start:start + batch_size]]


def _check_init_inputs(bottleneck: KeyValueBottleneck, data: torch.Tensor, epochs: int,
                       batch_size: int) -> None:
    if bool(bottleneck.keys_frozen):
        raise RuntimeError("The keys are frozen; key initialisation must run before freeze_keys().")
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if data.dim() != 2 or data.shape[1] != bottleneck.input_dim or data.shape[0] == 0:
        raise ValueError(
            f"Key initialisation expects a non-empty (N, {bottleneck.input_dim}) tensor of embeddings, "
            f"got shape {tuple(data.shape)}."
        )
    check_finite("key initialisation embeddings", data)
    if data.shape[0] < bottleneck.num_keys:
        warnings.warn(f"Key initialisation on {data.shape[0]} samples for {bottleneck.num_keys} keys per codebook: "
                      "at least one sample per key is needed, so some keys will be duplicates or never "
                      "move from where they were drawn. Pass more unlabelled data or fewer keys.", stacklevel=3)


def _scatter_heads(bottleneck: KeyValueBottleneck, heads: torch.Tensor):
    """Per-key sample counts (C, K) and sums of assigned heads (C, K, d) for heads (B, C, d)."""
    C, K, d = bottleneck.num_codebooks, bottleneck.num_keys, bottleneck.key_dim
    idx = bottleneck.nearest_keys(heads)[..., 0]  # (B, C)
    flat = (idx + torch.arange(C, device=idx.device) * K).flatten()  # codebook-major rows
    counts = torch.bincount(flat, minlength=C * K).to(heads.dtype).view(C, K)
    sums = heads.new_zeros(C * K, d).index_add_(0, flat, heads.reshape(-1, d)).view(C, K, d)
    return counts, sums


def _sample_heads(heads: torch.Tensor, num_keys: int, generator: torch.Generator | None):
    """K heads per codebook drawn from the batch with replacement: (B, C, d) -> (C, K, d)."""
    B, C, _ = heads.shape
    pick = torch.randint(B, (C, num_keys), generator=generator, device=heads.device)
    return heads.transpose(0, 1)[torch.arange(C, device=heads.device).unsqueeze(1), pick]


@torch.no_grad()
def ema_init_keys(
    bottleneck: KeyValueBottleneck,
    data: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    decay: float = 0.95,
    eps: float = 1e-5,
    dead_threshold: float | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """EMA vector quantisation of the keys on ``data`` (N, D), the authors' initialisation.

    Per batch: cluster sizes and sums of assigned heads are exponentially averaged (``decay``), the
    sizes Laplace-smoothed (``eps``), keys set to smoothed means; keys whose EMA size falls below
    ``dead_threshold`` (default ``0.1 * batch_size / K``) are re-sampled from the current batch.
    ``progress(epoch, quantisation_error)`` is called after each epoch if given.
    """
    _check_init_inputs(bottleneck, data, epochs, batch_size)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}.")
    K = bottleneck.num_keys
    threshold = 0.1 * batch_size / K if dead_threshold is None else dead_threshold
    keys = bottleneck.keys.clone()
    cluster_size = keys.new_zeros(keys.shape[:2])  # (C, K)
    embed_sum = keys.clone()  # (C, K, d)
    for epoch in range(epochs):
        for batch in _batches(data, batch_size, generator):
            heads = bottleneck.project(batch)  # (B, C, d)
            counts, sums = _scatter_heads(bottleneck, heads)
            cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = cluster_size.sum(-1, keepdim=True)
            smoothed = (cluster_size + eps) / (total + K * eps) * total
            keys = embed_sum / smoothed.unsqueeze(-1)
            dead = cluster_size < threshold  # (C, K)
            if bool(dead.any()):
                fresh = _sample_heads(heads, K, generator)
                keys = torch.where(dead.unsqueeze(-1), fresh, keys)
                embed_sum = torch.where(dead.unsqueeze(-1), fresh, embed_sum)
                cluster_size = torch.where(dead, torch.ones_like(cluster_size), cluster_size)
            bottleneck.set_keys(keys)
        if progress is not None:
            progress(epoch, float(bottleneck.quantization_error(data[:4096])))


@torch.no_grad()
def kmeans_init_keys(
    bottleneck: KeyValueBottleneck,
    data: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 4096,
    generator: torch.Generator | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """Lloyd's k-means per codebook on ``data`` (N, D): keys start at random heads of the data,
    then each epoch assigns every head to its nearest key and moves keys to their cluster means;
    a key with an empty cluster is re-seeded with a random head."""
    _check_init_inputs(bottleneck, data, epochs, batch_size)
    seed_rows = torch.randint(data.shape[0], (min(data.shape[0], 65536),), generator=generator)
    seed_heads = bottleneck.project(data[seed_rows])  # (S, C, d)
    bottleneck.set_keys(_sample_heads(seed_heads, bottleneck.num_keys, generator))
    for epoch in range(epochs):
        counts = bottleneck.keys.new_zeros(bottleneck.keys.shape[:2])
        sums = torch.zeros_like(bottleneck.keys)
        for batch in _batches(data, batch_size, generator):
            batch_counts, batch_sums = _scatter_heads(bottleneck, bottleneck.project(batch))
            counts += batch_counts
            sums += batch_sums
        reseed = _sample_heads(seed_heads, bottleneck.num_keys, generator)
        empty = (counts == 0).unsqueeze(-1)
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        bottleneck.set_keys(torch.where(empty, reseed, means))
        if progress is not None:
            progress(epoch, float(bottleneck.quantization_error(data[:4096])))


KEY_INITIALISERS = {"ema": ema_init_keys, "kmeans": kmeans_init_keys}


def init_keys(bottleneck: KeyValueBottleneck, data: torch.Tensor, method: str = "ema", **kwargs) -> None:
    """Initialise the keys with the named method (``"ema"`` or ``"kmeans"``)."""
    if method not in KEY_INITIALISERS:
        raise ValueError(f"Unknown key initialisation {method!r}; expected one of {sorted(KEY_INITIALISERS)}.")
    KEY_INITIALISERS[method](bottleneck, data, **kwargs)
