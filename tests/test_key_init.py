"""Key initialisation (EMA vector quantisation, k-means): lower quantisation error, dead-key
re-sampling, refusal after freezing, input validation."""

from __future__ import annotations

import pytest
import torch

from avalanche_dkvb import KeyValueBottleneck, ema_init_keys, init_keys, kmeans_init_keys

C, K, D_KEY = 2, 8, 2


def clustered_data(n=512, seed=0):
    """(n, 4) inputs whose two 2-d chunks each fall in 8 tight clusters (centres spread over [-3, 3])."""
    g = torch.Generator().manual_seed(seed)
    centres = 6 * torch.rand(C, K, D_KEY, generator=g) - 3  # (C, K, d)
    pick = torch.randint(K, (n, C), generator=g)
    points = centres[torch.arange(C), pick] + 0.05 * torch.randn(n, C, D_KEY, generator=g)  # (n, C, d)
    return points.reshape(n, C * D_KEY)


def chunk_bottleneck(seed=0):
    return KeyValueBottleneck(C * D_KEY, num_codebooks=C, num_keys=K, key_dim=D_KEY, value_dim=3,
                              heads="chunk", generator=torch.Generator().manual_seed(seed))


def projected_bottleneck(seed=0):
    return KeyValueBottleneck(C * D_KEY, num_codebooks=3, num_keys=K, key_dim=3, value_dim=3,
                              generator=torch.Generator().manual_seed(seed))


INITIALISERS = [
    pytest.param(lambda bn, x, g: ema_init_keys(bn, x, epochs=20, batch_size=64, generator=g), id="ema"),
    pytest.param(lambda bn, x, g: kmeans_init_keys(bn, x, epochs=10, batch_size=128, generator=g), id="kmeans"),
]


@pytest.mark.parametrize("make_bn", [chunk_bottleneck, projected_bottleneck], ids=["chunk", "projection"])
@pytest.mark.parametrize("initialise", INITIALISERS)
def test_initialisation_lowers_quantisation_error(initialise, make_bn):
    data = clustered_data(n=512, seed=0)
    bn = make_bn()
    random_error = float(bn.quantization_error(data))
    projection = None if bn.projection is None else bn.projection.clone()
    initialise(bn, data, torch.Generator().manual_seed(1))
    error = float(bn.quantization_error(data))
    assert error < 0.25 * random_error, (error, random_error)
    if projection is not None:
        assert torch.equal(projection, bn.projection)  # initialisation never touches the heads
    assert not bool(bn.keys_frozen)  # freezing is a separate, explicit step


def test_ema_matches_cluster_centres_on_clustered_data():
    """With 8 tight clusters and 8 keys per codebook, the EMA keys end near the data: every data
    point's nearest key is within a few cluster widths."""
    data = clustered_data(n=1024, seed=3)
    bn = chunk_bottleneck()
    ema_init_keys(bn, data, epochs=30, batch_size=128, generator=torch.Generator().manual_seed(0))
    heads = bn.project(data)
    dist = ((heads[:, :, None] - bn.keys[None]) ** 2).sum(-1).min(-1).values.sqrt()  # (N, C)
    assert float(dist.mean()) < 0.5


def test_ema_dead_keys_far_from_data_are_resampled():
    """Keys started far away (around 100) are never the nearest key of any point, so only
    re-sampling dead keys can bring them to the data."""
    data = clustered_data(n=512, seed=1)
    bn = chunk_bottleneck()
    bn.set_keys(100.0 + torch.randn(C, K, D_KEY, generator=torch.Generator().manual_seed(2)))
    ema_init_keys(bn, data, epochs=20, batch_size=64, generator=torch.Generator().manual_seed(3))
    heads = bn.project(data)  # (N, C, d)
    for c in range(C):
        # every key lies near some data point
        key_to_data = torch.cdist(bn.keys[c], heads[:, c]).min(dim=1).values  # (K,)
        assert float(key_to_data.max()) < 1.0, key_to_data
    # and more than one key per codebook is in use
    idx = bn.nearest_keys(heads)[..., 0]
    assert all(len(torch.unique(idx[:, c])) > K // 2 for c in range(C))


def test_ema_without_resampling_leaves_far_keys_far():
    """Control for the test above: with a dead threshold of 0 no key is re-sampled and the far
    keys stay far, so that test really exercises re-sampling."""
    data = clustered_data(n=512, seed=1)
    bn = chunk_bottleneck()
    bn.set_keys(100.0 + torch.randn(C, K, D_KEY, generator=torch.Generator().manual_seed(2)))
    ema_init_keys(bn, data, epochs=5, batch_size=64, dead_threshold=0.0,
                  generator=torch.Generator().manual_seed(3))
    assert float(bn.keys.abs().max()) > 50


def test_kmeans_reseeds_empty_clusters(monkeypatch):
    """k-means seeds its keys on the data, so to get empty clusters the first seeding is moved far
    away (all keys but one); only re-seeding empty clusters from the data brings them back."""
    from avalanche_dkvb import key_init
    real_sample = key_init._sample_heads
    calls = []

    def far_first_seeding(heads, num_keys, generator):
        keys = real_sample(heads, num_keys, generator)
        if not calls:
            keys = keys.clone()
            keys[:, 1:] += 100.0
        calls.append(len(calls))
        return keys

    monkeypatch.setattr(key_init, "_sample_heads", far_first_seeding)
    data = clustered_data(n=512, seed=1)
    bn = chunk_bottleneck()
    kmeans_init_keys(bn, data, epochs=5, batch_size=128, generator=torch.Generator().manual_seed(5))
    assert len(calls) > 1
    heads = bn.project(data)
    for c in range(C):
        assert float(torch.cdist(bn.keys[c], heads[:, c]).min(dim=1).values.max()) < 1.0
    idx = bn.nearest_keys(heads)[..., 0]
    assert all(len(torch.unique(idx[:, c])) == K for c in range(C))  # no empty cluster left


@pytest.mark.parametrize("method", ["ema", "kmeans"])
def test_initialisers_refuse_frozen_keys(method):
    data = clustered_data(n=64)
    bn = chunk_bottleneck()
    init_keys(bn, data, method, epochs=1, batch_size=32)
    bn.freeze_keys()
    keys = bn.keys.clone()
    with pytest.raises(RuntimeError, match="frozen"):
        init_keys(bn, data, method, epochs=1, batch_size=32)
    fn = ema_init_keys if method == "ema" else kmeans_init_keys
    with pytest.raises(RuntimeError, match="frozen"):
        fn(bn, data, epochs=1)
    assert torch.equal(keys, bn.keys)


def test_initialisation_uses_no_labels_and_reports_progress():
    data = clustered_data(n=256)
    bn = chunk_bottleneck()
    errors = []
    ema_init_keys(bn, data, epochs=4, batch_size=64, progress=lambda epoch, err: errors.append((epoch, err)))
    assert [e for e, _ in errors] == [0, 1, 2, 3]
    assert errors[-1][1] == pytest.approx(float(bn.quantization_error(data)), rel=1e-5)


def test_bad_initialisation_inputs_are_named():
    bn = chunk_bottleneck()
    with pytest.raises(ValueError, match=r"\(N, 4\).*\(10, 3\)"):
        ema_init_keys(bn, torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"non-empty.*\(0, 4\)"):
        kmeans_init_keys(bn, torch.randn(0, 4))
    bad = torch.randn(10, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ema_init_keys(bn, bad)
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_init_keys(bn, bad)
    with pytest.raises(ValueError, match="epochs must be a positive integer, got 0"):
        ema_init_keys(bn, torch.randn(10, 4), epochs=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got -2"):
        kmeans_init_keys(bn, torch.randn(10, 4), batch_size=-2)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.0"):
        ema_init_keys(bn, torch.randn(10, 4), decay=1.0)
    with pytest.raises(ValueError, match="'kmedoids'"):
        init_keys(bn, torch.randn(10, 4), "kmedoids")
