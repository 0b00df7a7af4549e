"""The discrete key-value bottleneck: fixed heads, C codebooks of key-value pairs, nearest-key lookup.

Shape legend
    B  batch                     D  input (embedding) size
    C  codebooks (= heads)       K  keys per codebook
    d  key size (d_key)          V  value size (d_value)
    k  keys fetched per codebook (top-k, 1 by default)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avalanche_dkvb.native_search import can_use_native_search, native_search
from avalanche_dkvb.validation import check_finite, check_positive_int

HEAD_KINDS = ("random_projection", "chunk")
TOP_K_REDUCTIONS = ("sum", "mean")
VALUE_INITS = ("zeros", "normal")


class KeyValueBottleneck(nn.Module):
    """C codebooks of K (key, value) pairs behind C fixed heads.

    Invariants: the head projection and the keys are buffers, never parameters, so no optimizer can
    move them; keys change only through :mod:`avalanche_dkvb.key_init` and not at all after
    :meth:`freeze_keys`. Values are the only parameters: ``values`` (C, K, V).

    Training-mode forwards count how often each key was selected (``usage_counts`` (C, K)); eval-mode
    forwards search only among keys selected at least once in training ("prune dormant keys"), per
    codebook, once that codebook has any used key.
    """

    def __init__(
        self,
        input_dim: int,
        num_codebooks: int = 256,
        num_keys: int = 4096,
        key_dim: int = 14,
        value_dim: int = 10,
        *,
        heads: str = "random_projection",
        top_k: int = 1,
        top_k_reduction: str = "sum",
        value_init: str = "zeros",
        value_init_std: float = 1e-3,
        lookup_chunk_elements: int = 2**18,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, size in [("input_dim", input_dim), ("num_codebooks", num_codebooks),
                           ("num_keys", num_keys), ("key_dim", key_dim), ("value_dim", value_dim),
                           ("top_k", top_k), ("lookup_chunk_elements", lookup_chunk_elements)]:
            check_positive_int(name, size)
        if heads not in HEAD_KINDS:
            raise ValueError(f"heads must be one of {HEAD_KINDS}, got {heads!r}.")
        if heads == "chunk" and input_dim != num_codebooks * key_dim:
            raise ValueError(
                f"heads='chunk' splits the input into num_codebooks pieces of key_dim, so it needs "
                f"input_dim == num_codebooks * key_dim; got input_dim={input_dim}, "
                f"num_codebooks * key_dim = {num_codebooks} * {key_dim} = {num_codebooks * key_dim}."
            )
        if top_k > num_keys:
            raise ValueError(f"top_k must be at most num_keys={num_keys}, got top_k={top_k}.")
        if top_k_reduction not in TOP_K_REDUCTIONS:
            raise ValueError(f"top_k_reduction must be one of {TOP_K_REDUCTIONS}, got {top_k_reduction!r}.")
        if value_init not in VALUE_INITS:
            raise ValueError(f"value_init must be one of {VALUE_INITS}, got {value_init!r}.")

        self.input_dim, self.num_codebooks, self.num_keys = input_dim, num_codebooks, num_keys
        self.key_dim, self.value_dim, self.top_k, self.heads = key_dim, value_dim, top_k, heads
        self.top_k_reduction = top_k_reduction
        self.lookup_chunk_elements = lookup_chunk_elements

        if heads == "random_projection":
            projection = torch.randn(num_codebooks, input_dim, key_dim, generator=generator)
            self.register_buffer("projection", F.normalize(projection, dim=1))  # (C, D, d), unit columns
        else:
            self.register_buffer("projection", None)
        self.register_buffer("keys", torch.randn(num_codebooks, num_keys, key_dim, generator=generator))
        self.register_buffer("usage_counts", torch.zeros(num_codebooks, num_keys, dtype=torch.long))
        self.register_buffer("keys_frozen", torch.tensor(False))
        values = torch.zeros(num_codebooks, num_keys, value_dim)
        if value_init == "normal":
            values.normal_(0.0, value_init_std, generator=generator)
        self.values = nn.Parameter(values)  # (C, K, V)

    # -- state -------------------------------------------------------------------------------
    def freeze_keys(self, reset_usage: bool = True) -> None:
        """Freeze the keys for good (call after key initialisation); ``reset_usage`` zeroes the usage
        counters (keep them when freezing keys that values were already trained with)."""
        self.keys_frozen.fill_(True)
        if reset_usage:
            self.reset_usage()

    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def set_keys(self, keys: torch.Tensor) -> None:
        """Overwrite the keys (C, K, d); refused once the keys are frozen."""
        if bool(self.keys_frozen):
            raise RuntimeError("The keys are frozen; they cannot change after freeze_keys().")
        expected = (self.num_codebooks, self.num_keys, self.key_dim)
        if tuple(keys.shape) != expected:
            raise ValueError(f"keys must have shape (C, K, d) = {expected}, got {tuple(keys.shape)}.")
        check_finite("keys", keys)
        self.keys.copy_(keys)

    # -- lookup ------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Heads: (B, D) -> (B, C, d)."""
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise ValueError(
                f"Expected embeddings of shape (batch, {self.input_dim}), got {tuple(x.shape)}."
            )
        check_finite("input embeddings", x)
        x = x.to(self.keys.dtype)
        if self.projection is None:
            return x.view(x.shape[0], self.num_codebooks, self.key_dim)
        return (x @ self.projection_matrix()).view(x.shape[0], self.num_codebooks, self.key_dim)

    def projection_matrix(self) -> torch.Tensor:
        """The random-projection heads as one matrix (D, C*d), codebook-major columns (a copy)."""
        return self.projection.transpose(0, 1).reshape(self.input_dim, self.num_codebooks * self.key_dim)

    @torch.no_grad()
    def nearest_keys(self, heads: torch.Tensor, only_used: bool = False) -> torch.Tensor:
        """Indices of the top-k nearest keys (squared L2) per codebook: (B, C, d) -> (B, C, k).

        The search is :func:`search_keys` on :func:`augmented_heads` and the keys of
        :meth:`searched_keys`. With ``only_used``, keys never selected in training are excluded (per
        codebook, once any key of that codebook has been used; a codebook with no used key searches all
        its keys, where the authors' code returns key 0); a codebook with fewer than k used keys repeats
        its nearest used key.
        """
        keys_aug, key_of = self.searched_keys(only_used)
        idx = search_keys(augmented_heads(heads), keys_aug, self.top_k, self.lookup_chunk_elements)  # (C, B, k)
        if key_of is not None:
            idx = key_of.gather(1, idx.flatten(1)).view(idx.shape)
        return idx.transpose(0, 1)

    def searched_keys(self, only_used: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The keys a search reads, as (keys_aug (C, d+1, K'), key_of (C, K') or None).

        keys_aug holds :func:`augmented_keys`; with ``only_used``, each codebook's searchable keys
        (its used keys, or all of them if none is used) in ascending order, padded to the largest count
        K' with masked (inf) entries, and key_of maps position -> key index (None when nothing is
        left out). A search over them chooses the keys, ties included, that the search over all keys
        with the others masked chooses. Kept until the keys or the usage counters change (their
        tensors' version counters: every in-place write bumps them), so consecutive evaluation batches
        build it once.
        """
        versions = (self.keys._version, self.usage_counts._version, only_used)
        cached = self.__dict__.get("_searched_keys")  # (keys, usage_counts, versions, searched keys)
        if cached is not None and cached[0] is self.keys and cached[1] is self.usage_counts and cached[2] == versions:
            return cached[3]
        with torch.inference_mode(False):  # usable outside inference mode even if first built inside it
            keys_aug, key_of = augmented_keys(self.keys), None
            if only_used:
                keys_aug, key_of = _compact_used_keys(keys_aug, self.usage_counts > 0)
        # not a buffer: never saved or moved; the tensors are held so a replaced buffer never matches
        self.__dict__["_searched_keys"] = (self.keys, self.usage_counts, versions, (keys_aug, key_of))
        return keys_aug, key_of

    def flat_indices(self, x: torch.Tensor, only_used: bool = False) -> torch.Tensor:
        """Rows of ``values.view(C*K, V)`` selected by each input: (B, D) -> (B, C*k)."""
        idx = self.nearest_keys(self.project(x), only_used=only_used)  # (B, C, k)
        offsets = torch.arange(self.num_codebooks, device=idx.device).view(1, -1, 1) * self.num_keys
        return (idx + offsets).flatten(1)

    def count_usage(self, flat_idx: torch.Tensor) -> None:
        """Add one selection of each row in ``flat_idx`` (any shape) to the usage counters."""
        self.usage_counts.view(-1).add_(torch.bincount(flat_idx.flatten(), minlength=self.usage_counts.numel()))

    @property
    def top_k_scale(self) -> int:
        """What the top-k reduction multiplies the mean of the k fetched values by: k for "sum" (the
        authors' decoder sums them), 1 for "mean"."""
        return self.top_k if self.top_k_reduction == "sum" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fetched values per codebook, summed (``top_k_reduction="sum"``, the authors') or averaged
        (``"mean"``) over the top-k keys: (B, D) -> (B, C, V). With top_k 1 both are the value itself."""
        flat_idx = self.flat_indices(x, only_used=not self.training)
        if self.training:
            self.count_usage(flat_idx)
        fetched = self.values.view(-1, self.value_dim)[flat_idx]  # (B, C*k, V)
        fetched = fetched.view(x.shape[0], self.num_codebooks, self.top_k, self.value_dim)
        return fetched.sum(2) if self.top_k_reduction == "sum" else fetched.mean(2)

    @torch.no_grad()
    def quantization_error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared distance from each head to its nearest key (scalar)."""
        heads = self.project(x)  # (B, C, d)
        idx = self.nearest_keys(heads)[..., 0]  # (B, C)
        nearest = self.keys[torch.arange(self.num_codebooks, device=idx.device), idx]  # (B, C, d)
        return (heads - nearest).square().sum(-1).mean()

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, num_codebooks={self.num_codebooks}, "
                f"num_keys={self.num_keys}, key_dim={self.key_dim}, value_dim={self.value_dim}, "
                f"heads={self.heads!r}, top_k={self.top_k}, top_k_reduction={self.top_k_reduction!r}")


# -- nearest-key search ------------------------------------------------------------------------------
def augmented_heads(heads: torch.Tensor) -> torch.Tensor:
    """[z, 1] per head, codebook-major: (B, C, d) -> (C, B, d+1)."""
    return torch.cat([heads, heads.new_ones(*heads.shape[:2], 1)], dim=-1).transpose(0, 1).contiguous()


def augmented_keys(keys: torch.Tensor) -> torch.Tensor:
    """[-2 key, |key|^2] per key, transposed for the search: (C, K, d) -> (C, d+1, K)."""
    keys_aug = torch.cat([-2 * keys, keys.square().sum(-1, keepdim=True)], dim=-1)
    return keys_aug.transpose(1, 2).contiguous()


def _compact_used_keys(keys_aug: torch.Tensor, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each codebook's searchable keys of ``keys_aug`` (C, d+1, K): its used keys (``used`` (C, K)), or all
    of them if none is used, in ascending order, padded with masked entries to the largest count K':
    ((C, d+1, K'), key index of each position (C, K')); the input and None if every key is searchable."""
    searchable = used | ~used.any(dim=1, keepdim=True)  # (C, K)
    counts = searchable.sum(1)  # (C,)
    width = int(counts.max())
    if width == keys_aug.shape[2] and bool((counts == width).all()):
        return keys_aug, None
    key_of = torch.sort((~searchable).to(torch.int8), dim=1, stable=True).indices[:, :width]  # searchable first
    compact = keys_aug.gather(2, key_of.unsqueeze(1).expand(-1, keys_aug.shape[1], -1))  # (C, d+1, K')
    padding = torch.arange(width, device=counts.device).unsqueeze(0) >= counts.unsqueeze(1)  # (C, K')
    compact[:, -1].masked_fill_(padding, math.inf)
    return compact, key_of


def _group_size(num_keys: int) -> int:
    """The largest divisor of ``num_keys`` not above its square root (64 for 4096)."""
    return max(g for g in range(1, math.isqrt(num_keys) + 1) if num_keys % g == 0)


def first_argmin(scores: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Index of the first minimum along the last axis, as ``scores.argmin(-1)``: (..., K) -> (...).

    In two stages, because torch's argmin is several times slower than its min: the minimum of each
    group of G keys, the first group holding the overall minimum, then the first minimum inside that
    group. Both stages compare the same values, so the result equals ``argmin`` exactly, ties included.
    ``group_size`` G (a divisor of K) defaults to :func:`_group_size` of K.
    """
    K = scores.shape[-1]
    G = _group_size(K) if group_size is None else group_size  # a divisor of K
    if G == 1:
        return scores.argmin(-1)
    groups = scores.unflatten(-1, (K // G, G))  # (..., K/G, G)
    group = groups.amin(-1).argmin(-1, keepdim=True)  # (..., 1)
    inside = groups.gather(-2, group.unsqueeze(-1).expand(*group.shape, G)).squeeze(-2).argmin(-1)
    return group.squeeze(-1) * G + inside


@torch.no_grad()
def search_keys(heads_aug: torch.Tensor, keys_aug: torch.Tensor, top_k: int = 1,
                chunk_elements: int = 2**18, fused: bool = True) -> torch.Tensor:
    """Top-k smallest squared distances per codebook: heads (C, B, d+1), keys (C, d+1, K) -> (C, B, k).

    Scores ``|key|^2 - 2 z.key`` (the squared distance less ``|z|^2``, which does not change the order)
    are products of [z, 1] with [-2 key, |key|^2]. A key whose |key|^2 entry is inf is masked (all its
    scores are inf); with fewer than k finite scores the nearest finite one is repeated. With ``fused``,
    top-1 float32 searches on the CPU run :mod:`avalanche_dkvb.native_search`'s kernel, which never
    stores a score; otherwise the scores are batched matrix products in blocks of codebooks x samples
    holding at most ``chunk_elements`` scores, so each block stays in cache and there is never a
    (B, C, K, d) tensor.
    """
    if fused and can_use_native_search(heads_aug, keys_aug, top_k):
        return native_search()(heads_aug.contiguous(), keys_aug).unsqueeze(-1)
    C, B, K = heads_aug.shape[0], heads_aug.shape[1], keys_aug.shape[2]
    batch_block = max(1, min(B, chunk_elements // K))  # below B only with one codebook a block: contiguous
    codebook_block = max(1, chunk_elements // (batch_block * K))
    group_size = _group_size(K)
    out = torch.empty(C, B, top_k, dtype=torch.long, device=heads_aug.device)
    for c in range(0, C, codebook_block):
        cs = slice(c, c + codebook_block)
        for b in range(0, B, batch_block):
            bs = slice(b, b + batch_block)
            scores = torch.bmm(heads_aug[cs, bs], keys_aug[cs])  # (c, b, K)
            if top_k == 1:
                out[cs, bs, 0] = first_argmin(scores, group_size)
            else:  # with fewer finite scores than top_k, repeat the nearest finite one
                nearest, idx = scores.topk(top_k, dim=-1, largest=False)
                out[cs, bs] = torch.where(torch.isinf(nearest), idx[..., :1], idx)
    return out
