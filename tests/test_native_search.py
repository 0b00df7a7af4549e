"""The fused CPU key search (avalanche_dkvb.native_search) against the matrix-product search."""

import pytest
import torch

from avalanche_dkvb.bottleneck import augmented_heads, augmented_keys, search_keys
from avalanche_dkvb.native import toolchain_available
from avalanche_dkvb.native_search import can_use_native_search, native_search

pytestmark = pytest.mark.skipif(not toolchain_available(),
                                reason="no C++ compiler or no ninja: the fused search cannot be built")


@pytest.fixture(autouse=True)
def fused_search_everywhere(monkeypatch):
    """search_keys takes the kernel only on AVX-512 CPUs; it is correct (slower) elsewhere, so test it."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")


@pytest.fixture(scope="module")
def kernel():
    built = native_search()
    assert built is not None, "a C++ compiler and ninja are present, so the fused search must build"
    return built


def _true_distances(heads, keys):
    """Squared distances in float64: (B, C, d), (C, K, d) -> (C, B, K)."""
    return torch.cdist(heads.double().transpose(0, 1), keys.double()).square()


@pytest.mark.parametrize("C,B,K,d", [(3, 13, 37, 1), (4, 64, 4096, 14), (2, 70, 256, 33), (1, 9, 16, 4)])
def test_fused_search_finds_a_nearest_key(kernel, C, B, K, d):
    g = torch.Generator().manual_seed(C * B + K + d)
    keys, heads = torch.randn(C, K, d, generator=g), torch.randn(B, C, d, generator=g)
    fused = search_keys(augmented_heads(heads), augmented_keys(keys))[..., 0]  # (C, B)
    products = search_keys(augmented_heads(heads), augmented_keys(keys), fused=False)[..., 0]
    dist = _true_distances(heads, keys)
    chosen = dist.gather(-1, fused.unsqueeze(-1)).squeeze(-1)
    nearest = dist.min(-1).values
    assert torch.all(chosen <= nearest + 1e-5 * (1 + nearest))  # a nearest key, to float32 rounding
    assert (fused == products).double().mean() >= 0.999  # the same keys but for float32 near-ties


def test_fused_search_skips_masked_keys_and_breaks_ties_to_the_lowest_index(kernel):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 40, 3, generator=g)
    keys[:, 20:] = keys[:, :20]  # every key twice: ties go to the first copy
    heads = torch.randn(50, 2, 3, generator=g)
    idx = search_keys(augmented_heads(heads), augmented_keys(keys))[..., 0]
    assert torch.equal(idx, search_keys(augmented_heads(heads), augmented_keys(keys), fused=False)[..., 0])
    assert int(idx.max()) < 20
    keys_aug = augmented_keys(keys)
    keys_aug[:, -1, :25] = float("inf")  # mask keys 0..24: only 25..39 remain (copies of 5..19)
    masked = search_keys(augmented_heads(heads), keys_aug)[..., 0]
    assert int(masked.min()) >= 25
    reference = _true_distances(heads, keys)[..., 25:].argmin(-1) + 25
    assert torch.equal(masked, reference)


def test_fused_search_reads_keys_through_strides(kernel):
    g = torch.Generator().manual_seed(1)
    C, K, d = 3, 48, 5
    keys = torch.randn(C, K, d, generator=g)
    heads_aug = augmented_heads(torch.randn(20, C, d, generator=g))
    rows = augmented_keys(keys).transpose(0, 1).reshape(d + 1, C * K).contiguous()  # (d+1, C*K), as EMA keeps it
    view = rows.view(d + 1, C, K).transpose(0, 1)  # (C, d+1, K), not contiguous
    assert not view.is_contiguous()
    assert torch.equal(search_keys(heads_aug, view), search_keys(heads_aug, augmented_keys(keys)))


def test_fused_search_applies_only_to_top1_float32_on_an_avx512_cpu(kernel, monkeypatch):
    heads_aug, keys_aug = torch.zeros(1, 2, 3), torch.zeros(1, 3, 4)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not can_use_native_search(heads_aug, keys_aug, 1)  # its 16-lane vectors spill: slower than bmm
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert can_use_native_search(heads_aug, keys_aug, 1)
    assert not can_use_native_search(heads_aug, keys_aug, 2)
    assert not can_use_native_search(heads_aug.double(), keys_aug.double(), 1)
