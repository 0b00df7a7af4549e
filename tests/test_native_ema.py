"""The fused EMA key updates (avalanche_dkvb.native_ema) against the torch path of ema_init_keys."""

import pytest
import torch

from avalanche_dkvb import KeyValueBottleneck, ema_init_keys, key_init
from avalanche_dkvb import native_ema as native_ema_module
from avalanche_dkvb.native import toolchain_available
from avalanche_dkvb.native_ema import can_use_native_ema, native_ema

pytestmark = pytest.mark.skipif(not toolchain_available(),
                                reason="no C++ compiler or no ninja: the fused EMA updates cannot be built")


@pytest.fixture(scope="module")
def kernels():
    built = native_ema()
    assert built is not None, "a C++ compiler and ninja are present, so the fused EMA updates must build"
    return built


def _ema_keys(C, K, d, N, B, epochs, seed, use_native, monkeypatch, keys_offset=0.0, **options):
    """Keys (C, K, d) after ema_init_keys on random data, through the native or the torch path."""
    monkeypatch.setattr(key_init, "can_use_native_ema", lambda embed_sum: use_native and can_use_native_ema(embed_sum))
    bn = KeyValueBottleneck(3 * d, C, K, d, generator=torch.Generator().manual_seed(seed))
    bn.set_keys(bn.keys + keys_offset)
    data = torch.randn(N, 3 * d, generator=torch.Generator().manual_seed(seed + 1))
    ema_init_keys(bn, data, epochs=epochs, batch_size=B, generator=torch.Generator().manual_seed(seed + 2), **options)
    return bn.keys.clone()


@pytest.mark.parametrize("rule", ["authors", "reset"])
@pytest.mark.parametrize("C,K,d,N,B,epochs,keys_offset,dead_threshold", [
    (4, 64, 5, 300, 32, 3, 0.0, None),  # dead keys from the start (sizes start at 0)
    (3, 48, 14, 200, 50, 2, 30.0, None),  # keys far from the data: only redraws bring them in; last batch short
    (2, 37, 1, 90, 16, 2, 0.0, 0.0),  # no key is ever dead; K not a multiple of the vector width
    (2, 16, 33, 70, 9, 4, 0.0, 0.3),  # many dead keys, d wider than a vector
])
def test_native_ema_gives_the_torch_keys(kernels, monkeypatch, rule, C, K, d, N, B, epochs, keys_offset,
                                         dead_threshold):
    options = dict(C=C, K=K, d=d, N=N, B=B, epochs=epochs, seed=C + K + d, keys_offset=keys_offset,
                   dead_key_rule=rule, dead_threshold=dead_threshold)
    native = _ema_keys(use_native=True, monkeypatch=monkeypatch, **options)
    reference = _ema_keys(use_native=False, monkeypatch=monkeypatch, **options)
    assert torch.isfinite(native).all()
    assert float((native - reference).abs().max()) <= 1e-6 * float(reference.abs().max())


def _random_state(C, K, d, B, seed):
    """EMA state mid-run: sums (d, C*K), sizes (C*K,) straddling the dead threshold 0.1, keys_aug (d+1, C*K),
    a batch (C, B, d+1) and its nearest keys (C, B) (random: the update does not care how they were found)."""
    g = torch.Generator().manual_seed(seed)
    sizes = 0.2 * torch.rand(C * K, generator=g)
    sums = torch.randn(d, C * K, generator=g) * sizes
    batch = torch.cat([torch.randn(C, B, d, generator=g), torch.ones(C, B, 1)], dim=-1)
    idx = torch.randint(K, (C, B), generator=g)
    return sums, sizes, torch.zeros(d + 1, C * K), batch, idx


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("threshold", [0.1, 0.0])
def test_one_native_update_is_the_torch_update(kernels, reset, threshold):
    """One batch, every piece of state compared, and the generator left in the same state (same draws)."""
    C, K, d, B = 3, 40, 6, 24
    reference_state, native_state = _random_state(C, K, d, B, 0), _random_state(C, K, d, B, 0)
    sizes, idx = reference_state[1], reference_state[4]
    counts = torch.stack([torch.bincount(row, minlength=K) for row in idx]).flatten()
    assert bool((sizes * 0.9 + 0.1 * counts < threshold).any()) == (threshold > 0)  # 0.1 really re-draws keys
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    key_init._torch_ema_update(*reference_state, key_init._EmaRule(0.9, 1e-5, threshold, reset, generators[0]))
    key_init._native_ema_update(*native_state, key_init._EmaRule(0.9, 1e-5, threshold, reset, generators[1]))
    for reference, native in zip(reference_state[:3], native_state[:3]):
        assert torch.allclose(native, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))
    assert torch.equal(torch.randint(1000, (5,), generator=generators[0]),
                       torch.randint(1000, (5,), generator=generators[1]))


def test_native_ema_applies_only_to_float32_on_the_cpu_where_it_builds(kernels, monkeypatch):
    assert can_use_native_ema(torch.zeros(3, 8))
    assert not can_use_native_ema(torch.zeros(3, 8, dtype=torch.float64))
    monkeypatch.setattr(native_ema_module, "build_extension", lambda *args: None)  # as without a compiler
    assert not can_use_native_ema(torch.zeros(3, 8))


def test_native_ema_refuses_indices_outside_the_codebook(kernels):
    C, K, d, B = 2, 8, 3, 5
    sums, sizes, keys_aug, batch, idx = _random_state(C, K, d, B, 1)
    idx[1, 2] = K
    with pytest.raises(RuntimeError, match=r"idx outside \[0, K\)"):
        kernels.decay_sizes(sizes, idx, 0.9, 0.1, 0.1)
    idx[1, 2] = 0
    pick = torch.full((C * K,), B)
    with pytest.raises(RuntimeError, match=r"pick outside \[0, B\)"):
        kernels.update_keys(sums, sizes, keys_aug, batch, idx, sizes.view(C, K).sum(-1), pick,
                            batch[..., :d].square().sum(-1), 0.9, 0.1, 1e-5, K * 1e-5, 0.1, False)
