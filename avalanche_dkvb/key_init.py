"""Key initialisation on unlabelled embeddings, vectorised over codebooks.

Shape legend: N samples, B batch, D input size, C codebooks, K keys per codebook, d key size.

Both initialisers see only the bottleneck's heads (its fixed projection of the inputs); neither uses
labels, and both refuse to run once the keys are frozen.
"""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import torch

from avalanche_dkvb.bottleneck import KeyValueBottleneck, search_keys
from avalanche_dkvb.native_ema import can_use_native_ema, native_ema
from avalanche_dkvb.validation import check_finite, check_positive_int


DEAD_KEY_RULES = ("authors", "reset")


def _batches(data: torch.Tensor, batch_size: int, generator: torch.Generator | None):
    """Shuffled (B, D) batches covering ``data`` (N, D) once."""
    for rows in _batch_rows(data.shape[0], batch_size, generator):
        yield data[rows]


def _batch_rows(num_samples: int, batch_size: int, generator: torch.Generator | None):
    """Row indices (B,) of shuffled batches covering ``num_samples`` rows once."""
    order = torch.randperm(num_samples, generator=generator)
    for start in range(0, num_samples, batch_size):
        yield order[start:start + batch_size]


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


def _augmented_heads_of(bottleneck: KeyValueBottleneck, data: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[head, 1] of every sample, codebook-major: (N, D) -> (C, N, d+1), projected in chunks."""
    C, d = bottleneck.num_codebooks, bottleneck.key_dim
    out = torch.empty(C, data.shape[0], d + 1, dtype=bottleneck.keys.dtype, device=bottleneck.keys.device)
    out[..., d] = 1
    for start in range(0, data.shape[0], chunk):
        heads = bottleneck.project(data[start:start + chunk].to(out.device))  # (b, C, d)
        out[:, start:start + chunk, :d] = heads.transpose(0, 1)
    return out


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
    dead_key_rule: str = "authors",
    generator: torch.Generator | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> None:
    """EMA vector quantisation of the keys on ``data`` (N, D), the authors' initialisation.

    Per batch: cluster sizes and sums of assigned heads are exponentially averaged (``decay``), the
    sizes Laplace-smoothed (``eps``), keys set to smoothed means; keys whose EMA size falls below
    ``dead_threshold`` (default ``0.1 * batch_size / K``) are re-sampled from the current batch.
    ``dead_key_rule="authors"`` (default) overwrites only the dead key, as the authors' code does: its
    EMA sum and size stay, so the next batch rebuilds it from the stale sum and it is re-drawn while
    unused; ``"reset"`` also sets its sum to the fresh head and its size to 1, so it stays there until
    the data moves it. ``progress(epoch, quantisation_error)`` is called after each epoch if given.

    All heads are projected once and shuffled in place once an epoch: (C, N, d+1) floats in memory
    (768 MB for 50,000 samples at C 256, d 14), so each batch is a contiguous slice. The EMA state is
    kept dimension-major (d, C*K), so the keys feed the search without a copy. On the CPU in float32
    each batch's update is :mod:`avalanche_dkvb.native_ema`'s one pass over that state (the same keys,
    bit for bit where torch uses FMA); elsewhere, or where it cannot be built, torch operations
    (``_torch_ema_update``: a scatter with ``index_add_`` and a few passes).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}.")
    if dead_key_rule not in DEAD_KEY_RULES:
        raise ValueError(f"dead_key_rule must be one of {DEAD_KEY_RULES}, got {dead_key_rule!r}.")
    _check_init_inputs(bottleneck, data, epochs, batch_size)
    C, K, d = bottleneck.num_codebooks, bottleneck.num_keys, bottleneck.key_dim
    threshold = 0.1 * batch_size / K if dead_threshold is None else dead_threshold
    heads_all = _augmented_heads_of(bottleneck, data)  # (C, N, d+1)
    embed_sum = bottleneck.keys.reshape(C * K, d).T.contiguous()  # (d, C*K)
    cluster_size = embed_sum.new_zeros(C * K)
    keys_aug = torch.empty(d + 1, C * K, dtype=embed_sum.dtype, device=embed_sum.device)
    torch.mul(embed_sum, -2, out=keys_aug[:d])  # [-2 key; |key|^2]: the keys are keys_aug[:d] * -0.5, exactly
    _set_square_norms(keys_aug)
    search_view = keys_aug.view(d + 1, C, K).transpose(0, 1)  # (C, d+1, K), no copy
    ema = _EmaRule(decay, eps, threshold, dead_key_rule == "reset", generator)
    update = _native_ema_update if can_use_native_ema(embed_sum) else _torch_ema_update
    held = torch.arange(data.shape[0], device=heads_all.device)  # heads_all[:, i] is sample held[i]'s heads
    for epoch in range(epochs):
        order = torch.randperm(data.shape[0], generator=generator).to(heads_all.device)
        _permute_samples(heads_all, held.argsort()[order])  # now heads_all[:, i] is sample order[i]'s
        held = order
        for start in range(0, data.shape[0], batch_size):
            batch = heads_all[:, start:start + batch_size].contiguous()  # (C, B, d+1)
            idx = search_keys(batch, search_view, 1, bottleneck.lookup_chunk_elements)[..., 0]  # (C, B)
            update(embed_sum, cluster_size, keys_aug, batch, idx, ema)
        bottleneck.set_keys((keys_aug[:d] * -0.5).T.reshape(C, K, d))
        if progress is not None:
            progress(epoch, float(bottleneck.quantization_error(data[:4096])))


class _EmaRule(NamedTuple):
    """The constants of one EMA run and the generator its dead-key redraws use."""
    decay: float
    eps: float
    dead_threshold: float
    reset_dead: bool  # dead_key_rule == "reset"
    generator: torch.Generator | None


def _draw_picks(batch: torch.Tensor, num_keys: int, generator: torch.Generator | None) -> torch.Tensor:
    """For every key, the batch position (C*K,) its replacement head comes from, should it be dead."""
    C, B, _ = batch.shape
    return torch.randint(B, (C, num_keys), generator=generator, device=batch.device).view(-1)


def _torch_ema_update(embed_sum: torch.Tensor, cluster_size: torch.Tensor, keys_aug: torch.Tensor,
                      batch: torch.Tensor, idx: torch.Tensor, ema: _EmaRule) -> None:
    """One batch of EMA updates in place: sums (d, C*K) and sizes (C*K,) decay and take in the batch's
    heads (C, B, d+1) at their nearest keys idx (C, B); keys_aug (d+1, C*K) = [-2 mean; |mean|^2] of the
    smoothed means, dead keys re-drawn from the batch. The reference for :func:`_native_ema_update`."""
    C, B, d = batch.shape[0], batch.shape[1], embed_sum.shape[0]
    K = cluster_size.numel() // C
    flat = (idx + torch.arange(C, device=idx.device).unsqueeze(1) * K).flatten()  # codebook-major like the batch
    counts = torch.bincount(flat, minlength=C * K).to(cluster_size.dtype)
    cluster_size.mul_(ema.decay).add_(counts, alpha=1 - ema.decay)
    dead = cluster_size < ema.dead_threshold  # (C*K,)
    embed_sum.mul_(ema.decay).index_add_(1, flat, batch[..., :d].reshape(-1, d).T, alpha=1 - ema.decay)
    total = cluster_size.view(C, K).sum(-1, keepdim=True)
    smoothed = (cluster_size.view(C, K) + ema.eps) / (total + K * ema.eps) * total  # (C, K)
    torch.div(embed_sum, smoothed.view(1, C * K) * -0.5, out=keys_aug[:d])  # -2 * mean
    _set_square_norms(keys_aug)
    if bool(dead.any()):
        pick = _draw_picks(batch, K, ema.generator)
        dead_rows = dead.nonzero().squeeze(1)
        heads_of_batch = batch.view(-1, d + 1)  # (C*B, d+1), codebook-major
        sample = dead_rows // K * B + pick.index_select(0, dead_rows)
        fresh = heads_of_batch.index_select(0, sample)[:, :d]  # (dead, d)
        keys_aug[:d].index_copy_(1, dead_rows, fresh.T * -2)
        keys_aug[d].index_copy_(0, dead_rows, fresh.square().sum(1))
        if ema.reset_dead:
            embed_sum.index_copy_(1, dead_rows, fresh.T)
            cluster_size[dead_rows] = 1.0


def _native_ema_update(embed_sum: torch.Tensor, cluster_size: torch.Tensor, keys_aug: torch.Tensor,
                       batch: torch.Tensor, idx: torch.Tensor, ema: _EmaRule) -> None:
    """:func:`_torch_ema_update` with :mod:`avalanche_dkvb.native_ema`'s kernels (CPU, float32): the same
    operations, random draws and keys, in one pass over the state per batch."""
    kernels = native_ema()
    C, B, d = batch.shape[0], batch.shape[1], embed_sum.shape[0]
    K = cluster_size.numel() // C
    dead_count = kernels.decay_sizes(cluster_size, idx, ema.decay, 1 - ema.decay, ema.dead_threshold)
    total = cluster_size.view(C, K).sum(-1)  # (C,), torch's summation order
    if dead_count:  # head_norms (C, B): per head the sum _torch_ema_update takes of a fresh one, same order
        pick, head_norms = _draw_picks(batch, K, ema.generator), batch[..., :d].square().sum(-1)
    else:
        pick, head_norms = idx.new_empty(0), batch.new_empty(0)
    kernels.update_keys(embed_sum, cluster_size, keys_aug, batch, idx, total, pick, head_norms, ema.decay,
                        1 - ema.decay, ema.eps, K * ema.eps, ema.dead_threshold, ema.reset_dead)


def _permute_samples(heads_all: torch.Tensor, columns: torch.Tensor, codebooks_per_copy: int = 16) -> None:
    """``heads_all[:, :] = heads_all[:, columns]`` in place, a few codebooks at a time, so the extra memory
    is a few codebooks' heads, not a second (C, N, d+1) copy."""
    for chunk in heads_all.split(codebooks_per_copy):
        chunk.copy_(chunk.index_select(1, columns))


def _set_square_norms(keys_aug: torch.Tensor) -> None:
    """Last row of ``keys_aug`` (d+1, M) = |key|^2 of the keys ``keys_aug[:-1] * -0.5``, one row at a
    time (a (d, M) temporary would cost more than the search)."""
    norms = keys_aug[-1]
    torch.mul(keys_aug[0], keys_aug[0], out=norms)
    for row in keys_aug[1:-1]:
        norms.addcmul_(row, row)
    norms.mul_(0.25)


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
    """Initialise the keys with the named method (``"ema"`` or ``"kmeans"``); ``kwargs`` go to it
    (e.g. ``dead_key_rule="authors"`` or ``"reset"`` for EMA)."""
    if method not in KEY_INITIALISERS:
        raise ValueError(f"Unknown key initialisation {method!r}; expected one of {sorted(KEY_INITIALISERS)}.")
    KEY_INITIALISERS[method](bottleneck, data, **kwargs)
