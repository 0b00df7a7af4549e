"""KeyValueBottleneck, decoders and DKVBModel: lookup, heads, decoding, masking, usage, device moves,
frozen encoder, input validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from avalanche_dkvb import (KeyValueBottleneck, LinearDecoder, MeanDecoder, MLPDecoder, create_decoder,
                            create_dkvb_model)


def brute_force_sq_dist(heads: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Explicit squared distances: heads (B, C, d), keys (C, K, d) -> (B, C, K)."""
    return ((heads[:, :, None, :] - keys[None]) ** 2).sum(-1)


def random_bottleneck(top_k=1, lookup_chunk_elements=2**24, seed=0, dtype=torch.float64, **kwargs):
    options = dict(input_dim=6, num_codebooks=3, num_keys=20, key_dim=4, value_dim=5)
    options.update(kwargs)
    bn = KeyValueBottleneck(**options, top_k=top_k, lookup_chunk_elements=lookup_chunk_elements,
                            generator=torch.Generator().manual_seed(seed))
    return bn.to(dtype)


# -- 1. lookup -------------------------------------------------------------------------------------
# lookup blocks (codebooks x samples) hold at most lookup_chunk_elements scores; with C=3, K=20, B=50:
# everything in one block; 1 sample x 1 codebook; 7 samples x 1 codebook; all samples x 2 codebooks
CHUNKS = [pytest.param(2**24, id="one_block"), pytest.param(20, id="1x1"), pytest.param(7 * 20, id="7x1"),
          pytest.param(2 * 50 * 20, id="50x2")]


@pytest.mark.parametrize("elements", CHUNKS)
def test_nearest_key_is_bruteforce_argmin(elements):
    C, K = 3, 20
    bn = random_bottleneck(top_k=1, lookup_chunk_elements=elements)
    heads = torch.randn(50, C, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = bn.nearest_keys(heads)
    assert idx.shape == (50, C, 1) and idx.dtype == torch.long
    expected = brute_force_sq_dist(heads, bn.keys).argmin(-1)
    assert torch.equal(idx[..., 0], expected)
    # and the same with torch.cdist as the reference
    assert torch.equal(idx[..., 0], torch.cdist(heads.transpose(0, 1), bn.keys).argmin(-1).T)


@pytest.mark.parametrize("elements", CHUNKS)
@pytest.mark.parametrize("top_k", [1, 3])
def test_masked_lookup_is_bruteforce_over_used_keys(elements, top_k):
    C, K = 3, 20
    bn = random_bottleneck(top_k=top_k, lookup_chunk_elements=elements)
    g = torch.Generator().manual_seed(8)
    used = torch.rand(C, K, generator=g) < 0.4
    used[0, :] = False  # codebook 0: nothing used -> searched unmasked
    used[1, :3] = True  # at least top_k used keys in the others
    used[2, 5:8] = True
    bn.usage_counts.copy_(used.long() * torch.randint(1, 5, (C, K), generator=g))
    heads = torch.randn(50, C, 4, generator=g, dtype=torch.float64)
    dist = brute_force_sq_dist(heads, bn.keys)
    dormant = ~used & used.any(dim=1, keepdim=True)
    dist = dist.masked_fill(dormant.unsqueeze(0), float("inf"))
    expected = dist.topk(top_k, dim=-1, largest=False).indices
    idx = bn.nearest_keys(heads, only_used=True)
    assert torch.equal(idx.sort(-1).values, expected.sort(-1).values)
    assert bn.usage_counts[1:].gather(1, idx[:, 1:].permute(1, 0, 2).reshape(2, -1)).gt(0).all()


@pytest.mark.parametrize("elements", CHUNKS)
def test_masked_topk_with_fewer_used_keys_repeats_the_nearest_used_key(elements):
    C, K = 3, 20
    bn = random_bottleneck(top_k=3, lookup_chunk_elements=elements)
    used = torch.zeros(C, K, dtype=torch.bool)
    used[0, 4] = True  # one used key: all three picks must be it
    used[1, [2, 9]] = True  # two used keys: both, plus the nearer of them again
    used[2, :5] = True
    bn.usage_counts.copy_(used.long())
    heads = torch.randn(40, C, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    idx = bn.nearest_keys(heads, only_used=True)  # (B, C, 3)
    assert bn.usage_counts.gather(1, idx.permute(1, 0, 2).reshape(C, -1)).gt(0).all()
    assert (idx[:, 0] == 4).all()
    dist = brute_force_sq_dist(heads, bn.keys)[:, 1, [2, 9]]  # (B, 2)
    nearest = torch.tensor([2, 9])[dist.argmin(-1)]
    assert torch.equal(idx[:, 1, 0], nearest)
    assert torch.equal(idx[:, 1].sort(-1).values, torch.stack([nearest, torch.full_like(nearest, 2),
                                                               torch.full_like(nearest, 9)], -1).sort(-1).values)


def test_nearest_key_float32_picks_a_minimum_distance_key():
    bn = random_bottleneck(top_k=1, dtype=torch.float32, lookup_chunk_elements=5 * 20)
    heads = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(2))
    idx = bn.nearest_keys(heads)[..., 0]
    dist = brute_force_sq_dist(heads, bn.keys)
    chosen = dist.gather(-1, idx.unsqueeze(-1))[..., 0]
    assert torch.allclose(chosen, dist.min(-1).values, atol=1e-5)


@pytest.mark.parametrize("elements", CHUNKS)
def test_top3_is_bruteforce_topk_set(elements):
    C, K = 3, 20
    bn = random_bottleneck(top_k=3, lookup_chunk_elements=elements)
    heads = torch.randn(50, C, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    idx = bn.nearest_keys(heads)
    assert idx.shape == (50, C, 3)
    expected = brute_force_sq_dist(heads, bn.keys).topk(3, dim=-1, largest=False).indices
    assert torch.equal(idx.sort(-1).values, expected.sort(-1).values)


@pytest.mark.parametrize("reduction", ["sum", "mean", None])  # None: the default, the authors' sum
def test_forward_top3_sums_or_averages_the_three_fetched_values(reduction):
    options = {} if reduction is None else {"top_k_reduction": reduction}
    bn = random_bottleneck(top_k=3, value_init="normal", value_init_std=1.0, **options)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bn.eval()  # no usage yet, so no masking
    out = bn(x)  # (B, C, V)
    heads = torch.einsum("bD,cDd->bcd", x, bn.projection)
    top = brute_force_sq_dist(heads, bn.keys).topk(3, dim=-1, largest=False).indices  # (B, C, 3)
    fetched = torch.stack([bn.values[c][top[:, c]] for c in range(bn.num_codebooks)], dim=1)  # (B, C, 3, V)
    assert torch.allclose(out, fetched.mean(2) if reduction == "mean" else fetched.sum(2))


def test_bad_top_k_reduction_is_named():
    with pytest.raises(ValueError, match=r"top_k_reduction must be one of \('sum', 'mean'\), got 'max'"):
        random_bottleneck(top_k=2, top_k_reduction="max")


def test_flat_indices_offset_by_codebook():
    bn = random_bottleneck(top_k=2)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    flat = bn.flat_indices(x)  # (B, C*k)
    heads = torch.einsum("bD,cDd->bcd", x, bn.projection)
    idx = bn.nearest_keys(heads)  # (B, C, k)
    assert flat.shape == (8, 3 * 2)
    for c in range(3):
        assert torch.equal(flat.view(8, 3, 2)[:, c], idx[:, c] + c * bn.num_keys)


# -- heads ------------------------------------------------------------------------------------------
def test_random_projection_is_a_buffer_with_unit_columns():
    bn = KeyValueBottleneck(10, num_codebooks=5, num_keys=8, key_dim=3, value_dim=4)
    assert bn.projection.shape == (5, 10, 3)
    norms = bn.projection.norm(dim=1)  # each (codebook, output) column over the input dimension D
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    buffers = dict(bn.named_buffers())
    params = dict(bn.named_parameters())
    assert "projection" in buffers and "keys" in buffers
    assert "projection" not in params and "keys" not in params
    assert list(params) == ["values"]  # the only parameters
    # the heads are x @ projection[c], per codebook
    x = torch.randn(7, 10)
    heads = bn.project(x)
    for c in range(5):
        assert torch.allclose(heads[:, c], x @ bn.projection[c], atol=1e-6)


def test_chunk_heads_split_input_into_consecutive_pieces():
    bn = KeyValueBottleneck(12, num_codebooks=4, num_keys=8, key_dim=3, value_dim=2, heads="chunk")
    assert bn.projection is None
    assert list(dict(bn.named_parameters())) == ["values"]
    x = torch.randn(5, 12)
    heads = bn.project(x)
    assert heads.shape == (5, 4, 3)
    for c in range(4):
        assert torch.equal(heads[:, c], x[:, 3 * c:3 * (c + 1)])


def test_chunk_heads_need_matching_sizes():
    with pytest.raises(ValueError, match=r"input_dim=10.*4 \* 3 = 12"):
        KeyValueBottleneck(10, num_codebooks=4, num_keys=8, key_dim=3, value_dim=2, heads="chunk")


# -- 2. decoders -----------------------------------------------------------------------------------
def test_mean_decoder_averages_over_codebooks_not_value_dim():
    C = V = 4  # same sizes, so averaging over the wrong axis would not even change the shape
    dec = MeanDecoder(C, V, V)
    fetched = torch.arange(2 * C * V, dtype=torch.float32).view(2, C, V) ** 2
    out = dec(fetched)
    assert out.shape == (2, V)
    assert torch.allclose(out, fetched.mean(dim=1))
    assert not torch.allclose(out, fetched.mean(dim=2))
    assert list(dec.parameters()) == []


def test_model_logits_are_codebook_mean_of_selected_values():
    C, K, V = 3, 5, 4
    model = create_dkvb_model(C * 2, V, num_codebooks=C, num_keys=K, key_dim=2, heads="chunk")
    bn = model.bottleneck
    with torch.no_grad():  # value of key j in codebook c: one-hot(c) * (j + 1), so codebooks differ
        for c in range(C):
            bn.values[c, :, c] = torch.arange(1, K + 1, dtype=torch.float32)
    model.eval()
    x = torch.randn(6, C * 2)
    idx = bn.nearest_keys(bn.project(x))[..., 0]  # (B, C)
    expected = torch.stack([bn.values[c][idx[:, c]] for c in range(C)], dim=1).mean(1)  # (B, V)
    logits = model(x)
    assert torch.allclose(logits, expected)
    assert not torch.allclose(logits[:, :C], torch.stack([bn.values[c][idx[:, c]] for c in range(C)], 1).mean(2))


def test_mean_decoder_value_dim_mismatch_names_both_numbers():
    with pytest.raises(ValueError, match=r"value_dim=7.*num_classes=5"):
        create_dkvb_model(4, 5, num_codebooks=2, num_keys=4, key_dim=2, value_dim=7)
    with pytest.raises(ValueError, match=r"value_dim=3.*num_classes=10"):
        create_decoder("mean", 2, 3, 10)


def test_linear_decoder_trains_with_values():
    model = create_dkvb_model(4, 3, num_codebooks=2, num_keys=6, key_dim=2, value_dim=5, decoder="linear",
                              value_init="normal")
    assert isinstance(model.decoder, LinearDecoder)
    x, y = torch.randn(9, 4), torch.randint(3, (9,))
    logits = model(x)
    assert logits.shape == (9, 3)
    nn.functional.cross_entropy(logits, y).backward()
    assert model.bottleneck.values.grad is not None and model.bottleneck.values.grad.abs().sum() > 0
    assert model.decoder.linear.weight.grad.abs().sum() > 0
    names = set(model.trainable_parameters())
    assert names == {"bottleneck.values", "decoder.linear.weight", "decoder.linear.bias"}


def test_mlp_decoder_trains_with_values():
    """The authors' "mlp-128": concatenated values -> 128 hidden ReLU units -> logits."""
    model = create_dkvb_model(4, 3, num_codebooks=2, num_keys=6, key_dim=2, value_dim=5, decoder="mlp",
                              value_init="normal")
    assert isinstance(model.decoder, MLPDecoder) and not model.uses_mean_decoder
    first, last = model.decoder.mlp[0], model.decoder.mlp[2]
    assert (first.in_features, first.out_features, last.out_features) == (2 * 5, 128, 3)
    x, y = torch.randn(9, 4), torch.randint(3, (9,))
    logits = model(x)
    fetched = model.bottleneck(x).flatten(1)  # (B, C*V)
    assert torch.allclose(logits, last(torch.relu(first(fetched))))
    nn.functional.cross_entropy(logits, y).backward()
    assert model.bottleneck.values.grad.abs().sum() > 0 and first.weight.grad.abs().sum() > 0
    assert set(model.trainable_parameters()) == {"bottleneck.values", "decoder.mlp.0.weight", "decoder.mlp.0.bias",
                                                  "decoder.mlp.2.weight", "decoder.mlp.2.bias"}
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer, got 0"):
        MLPDecoder(2, 5, 3, hidden_dim=0)


def test_unknown_decoder_is_refused():
    with pytest.raises(ValueError, match="'mlpx'"):
        create_decoder("mlpx", 2, 3, 3)


# -- 5. masking and usage ---------------------------------------------------------------------------
def _line_bottleneck():
    """2 codebooks of 3 keys on the x-axis (chunk heads, 4-d input); values one-hot per key."""
    bn = KeyValueBottleneck(4, num_codebooks=2, num_keys=3, key_dim=2, value_dim=3, heads="chunk")
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]]).expand(2, 3, 2).clone()
    bn.set_keys(keys)
    bn.freeze_keys()
    with torch.no_grad():
        bn.values.copy_(torch.eye(3).expand(2, 3, 3))
    return bn


def test_eval_snaps_to_nearest_used_key_train_does_not():
    bn = _line_bottleneck()
    bn.train()
    bn(torch.tensor([[0.0, 0.0, 0.1, 0.0], [5.0, 0.0, 0.2, 0.0]]))  # uses keys 0 and 2 in codebook 0, key 0 in 1
    assert bn.usage_counts.tolist() == [[1, 0, 1], [2, 0, 0]]
    bn.usage_counts[1].zero_()  # codebook 1: nothing used -> no masking there

    query = torch.tensor([[1.2, 0.0, 1.2, 0.0]])  # nearest key 1 (unused); nearest used key 0
    heads = bn.project(query)
    assert bn.nearest_keys(heads, only_used=False)[0, :, 0].tolist() == [1, 1]
    assert bn.nearest_keys(heads, only_used=True)[0, :, 0].tolist() == [0, 1]

    bn.eval()
    counts_before = bn.usage_counts.clone()
    out_eval = bn(query)[0]  # (C, V)
    assert torch.equal(bn.usage_counts, counts_before)  # eval does not count
    assert torch.equal(out_eval[0], torch.tensor([1.0, 0.0, 0.0]))  # codebook 0: key 0 (used)
    assert torch.equal(out_eval[1], torch.tensor([0.0, 1.0, 0.0]))  # codebook 1: unmasked, key 1

    bn.train()
    out_train = bn(query)[0]
    assert torch.equal(out_train[0], torch.tensor([0.0, 1.0, 0.0]))  # training search is unmasked


def test_searched_keys_follow_every_change_of_usage_and_keys():
    """The search's compacted keys are cached; each in-place change of the usage counters or the keys
    (counting, resetting, load_state_dict, set_keys) must show in the next search."""
    bn = _line_bottleneck()
    query = bn.project(torch.tensor([[1.2, 0.0, 1.2, 0.0]]))  # nearest key 1; with only 0 and 2 used: 0
    assert bn.nearest_keys(query, only_used=True)[0, :, 0].tolist() == [1, 1]  # nothing used: all keys
    bn.usage_counts[0, 0] = 1
    bn.usage_counts[0, 2] = 1
    assert bn.nearest_keys(query, only_used=True)[0, :, 0].tolist() == [0, 1]
    bn.usage_counts[0, 1] = 3
    assert bn.nearest_keys(query, only_used=True)[0, :, 0].tolist() == [1, 1]
    bn.reset_usage()
    bn.usage_counts[0, 2] = 1
    assert bn.nearest_keys(query, only_used=True)[0, :, 0].tolist() == [2, 1]  # the only used key
    moved = {k: v.clone() for k, v in bn.state_dict().items()}
    moved["keys"][0, 2] += 100.0
    moved["usage_counts"][0] = torch.tensor([1, 0, 1])
    bn.load_state_dict(moved)
    assert bn.nearest_keys(query, only_used=True)[0, :, 0].tolist() == [0, 1]  # key 2 moved away
    assert bn.nearest_keys(query, only_used=False)[0, :, 0].tolist() == [1, 1]


def test_usage_counts_count_every_training_selection():
    bn = random_bottleneck(top_k=2, dtype=torch.float64, num_keys=7)
    g = torch.Generator().manual_seed(6)
    expected = torch.zeros(3, 7, dtype=torch.long)
    bn.train()
    for _ in range(3):
        x = torch.randn(11, 6, generator=g, dtype=torch.float64)
        heads = torch.einsum("bD,cDd->bcd", x, bn.projection)
        top = brute_force_sq_dist(heads, bn.keys).topk(2, dim=-1, largest=False).indices  # (B, C, 2)
        for c in range(3):
            expected[c] += torch.bincount(top[:, c].flatten(), minlength=7)
        bn(x)
    assert torch.equal(bn.usage_counts, expected)
    assert int(bn.usage_counts.sum()) == 3 * 11 * 3 * 2
    bn.eval()
    bn(torch.randn(5, 6, dtype=torch.float64))
    assert torch.equal(bn.usage_counts, expected)  # eval-mode forwards do not count
    bn.freeze_keys()
    assert int(bn.usage_counts.sum()) == 0  # freezing resets the counters


# -- 6. values stay parameters through device / dtype moves ------------------------------------------
@pytest.mark.parametrize("move", [
    lambda m: m.to("cpu"),
    lambda m: m.to(torch.device("cpu")),
    lambda m: m.double(),
    lambda m: m.to(torch.float64),
    pytest.param(lambda m: m.to("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="no CUDA")),
], ids=["to_str", "to_device", "double", "to_dtype", "cuda"])
def test_values_stay_registered_parameters_after_moves(move):
    model = create_dkvb_model(4, 3, num_codebooks=2, num_keys=5, key_dim=2)
    model = move(model)
    values = model.bottleneck.values
    assert isinstance(values, nn.Parameter) and values.requires_grad
    assert dict(model.named_parameters())["bottleneck.values"] is values
    assert any(p is values for p in model.parameters())
    assert model.bottleneck.keys.dtype == values.dtype and model.bottleneck.keys.device == values.device
    before = values.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(6, 4, device=values.device)
    y = torch.randint(3, (6,), device=values.device)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(before, values.detach())


# -- 7. frozen encoder ------------------------------------------------------------------------------
def bn_dropout_encoder():
    return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5))


def test_encoder_stays_in_eval_mode_and_frozen():
    encoder = bn_dropout_encoder()
    model = create_dkvb_model(6, 3, num_codebooks=2, num_keys=5, key_dim=3, encoder=encoder)
    model.train()
    assert model.training and model.bottleneck.training
    assert all(not m.training for m in encoder.modules())
    assert all(not p.requires_grad for p in encoder.parameters())
    stats = {k: v.clone() for k, v in encoder.state_dict().items()}
    x = torch.randn(16, 2)
    out1, out2 = model.embed(x), model.embed(x)
    assert torch.equal(out1, out2)  # no dropout
    model(x)
    assert all(torch.equal(stats[k], v) for k, v in encoder.state_dict().items())  # BN stats unchanged
    model.train(True)
    assert all(not m.training for m in encoder.modules())
    assert set(model.trainable_parameters()) == {"bottleneck.values"}


# -- 12. bad input ----------------------------------------------------------------------------------
def test_wrong_embedding_size_is_named():
    bn = KeyValueBottleneck(6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2)
    with pytest.raises(ValueError, match=r"\(batch, 6\).*\(5, 7\)"):
        bn(torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"\(batch, 6\).*\(6,\)"):
        bn(torch.randn(6))
    model = create_dkvb_model(6, 2, num_codebooks=2, num_keys=4, key_dim=3)
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        model(torch.randn(3, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nonfinite_inputs_are_refused(bad, mode):
    bn = KeyValueBottleneck(6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2)
    bn.train(mode == "train")
    x = torch.randn(4, 6)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        bn(x)
    assert int(bn.usage_counts.sum()) == 0


@pytest.mark.parametrize("name, value", [
    ("num_codebooks", 0), ("num_keys", -1), ("key_dim", 0), ("value_dim", 0), ("top_k", 0),
    ("input_dim", 0), ("num_keys", 2.5), ("lookup_chunk_elements", 0),
])
def test_nonpositive_sizes_are_named(name, value):
    sizes = dict(input_dim=6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2, top_k=1)
    sizes[name] = value
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {value}"):
        KeyValueBottleneck(**sizes)


def test_other_bad_options_are_named():
    with pytest.raises(ValueError, match=r"top_k must be at most num_keys=4, got top_k=5"):
        KeyValueBottleneck(6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2, top_k=5)
    with pytest.raises(ValueError, match="heads must be one of"):
        KeyValueBottleneck(6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2, heads="linear")
    with pytest.raises(ValueError, match="value_init must be one of"):
        KeyValueBottleneck(6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2, value_init="ones")
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        create_dkvb_model(6, 0, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2)


def test_set_keys_checks_shape_and_values():
    bn = KeyValueBottleneck(6, num_codebooks=2, num_keys=4, key_dim=3, value_dim=2)
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 4, 2\)"):
        bn.set_keys(torch.zeros(2, 4, 2))
    bad = torch.zeros(2, 4, 3)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="keys contain 1 NaN"):
        bn.set_keys(bad)
    bn.freeze_keys()
    with pytest.raises(RuntimeError, match="frozen"):
        bn.set_keys(torch.zeros(2, 4, 3))
