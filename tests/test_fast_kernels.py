"""The fast nearest-key search and EMA key initialisation against straightforward reference
implementations (the library's previous ones, kept here only as references): same keys chosen, same
EMA keys to 1e-6, both dead-key rules."""

from __future__ import annotations

import math

import pytest
import torch

from avalanche_dkvb import KeyValueBottleneck, ema_init_keys, init_keys
from avalanche_dkvb.bottleneck import first_argmin


# -- references ------------------------------------------------------------------------------------
def reference_nearest_keys(bn: KeyValueBottleneck, heads: torch.Tensor, only_used: bool = False) -> torch.Tensor:
    """The previous search: per block, bmm of [z, 1] with [-2 key, |key|^2], then torch's argmin/topk."""
    C, K = bn.num_codebooks, bn.num_keys
    keys_aug = torch.cat([-2 * bn.keys, bn.keys.square().sum(-1, keepdim=True)], dim=-1).transpose(1, 2).contiguous()
    penalty = None
    if only_used:
        used = bn.usage_counts > 0
        dormant = ~used & used.any(dim=1, keepdim=True)
        penalty = torch.zeros_like(dormant, dtype=keys_aug.dtype).masked_fill_(dormant, math.inf)
    heads_aug = torch.cat([heads, heads.new_ones(*heads.shape[:2], 1)], dim=-1).transpose(0, 1).contiguous()
    batch_block = max(1, min(heads.shape[0], bn.lookup_chunk_elements // K))
    codebook_block = max(1, bn.lookup_chunk_elements // (batch_block * K))
    out = torch.empty(C, heads.shape[0], bn.top_k, dtype=torch.long)
    for c in range(0, C, codebook_block):
        cs = slice(c, c + codebook_block)
        for b in range(0, heads.shape[0], batch_block):
            bs = slice(b, b + batch_block)
            scores = torch.bmm(heads_aug[cs, bs], keys_aug[cs])
            if penalty is not None:
                scores += penalty[cs].unsqueeze(1)
            if bn.top_k == 1:
                out[cs, bs] = scores.argmin(dim=-1, keepdim=True)
            else:
                nearest, idx = scores.topk(bn.top_k, dim=-1, largest=False)
                out[cs, bs] = torch.where(torch.isinf(nearest), idx[..., :1], idx)
    return out.transpose(0, 1)


@torch.no_grad()
def reference_ema(bn, data, *, epochs, batch_size, rule, decay=0.95, eps=1e-5, generator=None):
    """The previous EMA initialisation (one batch at a time, dense (C, K, d) updates), with either rule."""
    C, K, d = bn.num_codebooks, bn.num_keys, bn.key_dim
    threshold = 0.1 * batch_size / K
    keys, cluster_size, embed_sum = bn.keys.clone(), bn.keys.new_zeros(C, K), bn.keys.clone()
    for _ in range(epochs):
        order = torch.randperm(data.shape[0], generator=generator)
        for start in range(0, data.shape[0], batch_size):
            heads = torch.einsum("bD,cDd->bcd", data[order[start:start + batch_size]], bn.projection)
            idx = reference_nearest_keys(bn, heads)[..., 0]
            flat = (idx + torch.arange(C) * K).flatten()
            counts = torch.bincount(flat, minlength=C * K).to(heads.dtype).view(C, K)
            sums = heads.new_zeros(C * K, d).index_add_(0, flat, heads.reshape(-1, d)).view(C, K, d)
            cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = cluster_size.sum(-1, keepdim=True)
            keys = embed_sum / ((cluster_size + eps) / (total + K * eps) * total).unsqueeze(-1)
            dead = cluster_size < threshold
            if bool(dead.any()):
                pick = torch.randint(heads.shape[0], (C, K), generator=generator)
                fresh = heads.transpose(0, 1)[torch.arange(C).unsqueeze(1), pick]
                keys = torch.where(dead.unsqueeze(-1), fresh, keys)
                if rule == "reset":
                    embed_sum = torch.where(dead.unsqueeze(-1), fresh, embed_sum)
                    cluster_size = torch.where(dead, torch.ones_like(cluster_size), cluster_size)
            bn.set_keys(keys)


# -- data shaped like the real thing: clustered embeddings, projected heads ------------------------
def clustered_embeddings(n, dim=48, clusters=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g, dtype=dtype).abs() * 2  # non-negative like pooled features
    return centres[torch.randint(clusters, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g, dtype=dtype)


def bottleneck(dtype=torch.float32, num_codebooks=16, num_keys=256, key_dim=6, **kwargs):
    return KeyValueBottleneck(48, num_codebooks, num_keys, key_dim, 5, generator=torch.Generator().manual_seed(1),
                              **kwargs).to(dtype)


# -- search ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_keys", [4096, 20, 7])  # groups of 64, of 4, none (prime)
def test_first_argmin_is_argmin_with_ties(num_keys):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (3, 50, num_keys), generator=g).float()  # many exact ties
    assert torch.equal(first_argmin(scores), scores.argmin(-1))
    scores = torch.randn(3, 50, num_keys, generator=g)
    scores[..., -1] = -math.inf if num_keys > 7 else scores[..., -1]
    assert torch.equal(first_argmin(scores), scores.argmin(-1))


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("chunk", [2**20, 256 * 5, 256])
def test_nearest_keys_equal_the_reference_on_trained_keys(top_k, chunk):
    """Keys from EMA (so keys sit among the data and near-ties are realistic), float32: the same
    blocks and the same scores as the reference, so exactly the same keys, masked or not."""
    data = clustered_embeddings(600)
    bn = bottleneck(top_k=top_k, lookup_chunk_elements=chunk)
    ema_init_keys(bn, data[:400], epochs=2, batch_size=64, generator=torch.Generator().manual_seed(2))
    heads = bn.project(data[400:])
    assert torch.equal(bn.nearest_keys(heads), reference_nearest_keys(bn, heads))
    bn.usage_counts.copy_((torch.rand(bn.usage_counts.shape, generator=torch.Generator().manual_seed(3)) < 0.3).long())
    bn.usage_counts[0] = 0  # a codebook with no used key searches all keys
    assert torch.equal(bn.nearest_keys(heads, only_used=True), reference_nearest_keys(bn, heads, only_used=True))


def test_projection_as_one_matmul_equals_the_einsum():
    data = clustered_embeddings(100)
    bn = bottleneck()
    assert torch.allclose(bn.project(data), torch.einsum("bD,cDd->bcd", data, bn.projection), rtol=1e-6, atol=1e-6)


# -- EMA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["reset", "authors"])
def test_ema_equals_the_reference_to_1e6(rule):
    """float64, so no float32 near-tie can send the two down different paths; dead keys occur every
    batch (256 keys, 64 samples), so re-sampling and its RNG draws are covered."""
    data = clustered_embeddings(500, dtype=torch.float64)
    fast, ref = bottleneck(torch.float64), bottleneck(torch.float64)
    ema_init_keys(fast, data, epochs=3, batch_size=64, dead_key_rule=rule, generator=torch.Generator().manual_seed(4))
    reference_ema(ref, data, epochs=3, batch_size=64, rule=rule, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(fast.keys, ref.keys, rtol=1e-6, atol=1e-6), float((fast.keys - ref.keys).abs().max())


def test_ema_float32_chooses_the_reference_keys():
    """float32 over one epoch: the same assignments, keys equal to float32 rounding (the sums are
    accumulated in another order, so not bit for bit)."""
    data = clustered_embeddings(512)
    fast, ref = bottleneck(), bottleneck()
    ema_init_keys(fast, data, epochs=1, batch_size=128, dead_key_rule="reset", generator=torch.Generator().manual_seed(5))
    reference_ema(ref, data, epochs=1, batch_size=128, rule="reset", generator=torch.Generator().manual_seed(5))
    assert torch.allclose(fast.keys, ref.keys, rtol=1e-5, atol=1e-5)
    heads = fast.project(data)
    assert torch.equal(fast.nearest_keys(heads), ref.nearest_keys(heads))


def test_dead_key_rules_differ_and_authors_is_the_default():
    data = clustered_embeddings(500)
    runs = {}
    for rule in ["authors", "reset", None]:
        bn = bottleneck()
        kwargs = {} if rule is None else {"dead_key_rule": rule}
        init_keys(bn, data, "ema", epochs=2, batch_size=64, generator=torch.Generator().manual_seed(6), **kwargs)
        runs[rule] = bn.keys.clone()
    assert torch.equal(runs[None], runs["authors"])
    assert not torch.allclose(runs["authors"], runs["reset"])


def test_bad_dead_key_rule_is_named():
    with pytest.raises(ValueError, match=r"dead_key_rule must be one of \('authors', 'reset'\), got 'ours'"):
        ema_init_keys(bottleneck(), clustered_embeddings(10), dead_key_rule="ours")
