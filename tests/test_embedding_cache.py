"""Tests for the embedding extraction pass and the on-disk embedding cache."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from avalanche_dkvb.embeddings import EmbeddingCache, extract_embeddings, key_fingerprint

torch.set_num_threads(1)

ENCODER = {"name": "toy-net", "weights": "toy-v1", "preprocessing": {"resize": 32, "mean": [0.5, 0.5, 0.5]}}
DATASET = {"name": "toy-cifar", "version": 1}


class CountingCompute:
    """A ``compute`` callable that returns fixed arrays and counts its calls."""

    def __init__(self, n=50, d=16, seed=0):
        rng = np.random.default_rng(seed)
        self.embeddings = rng.standard_normal((n, d)).astype(np.float32)
        self.labels = rng.integers(0, 10, size=n).astype(np.int64)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.embeddings, self.labels


def entry_files(root):
    """Names of all entry files under their final names (locks excluded)."""
    return sorted(p.name for p in root.iterdir() if p.suffix in (".npy", ".json"))


def all_files(root):
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def cache(tmp_path):
    return EmbeddingCache(tmp_path / "cache")


@pytest.fixture
def key():
    return EmbeddingCache.key_for(ENCODER, DATASET, "train")


def assert_matches(entry, compute):
    np.testing.assert_array_equal(entry.embeddings, compute.embeddings)
    np.testing.assert_array_equal(entry.labels, compute.labels)
    assert entry.embeddings.dtype == np.float32 and entry.labels.dtype == np.int64


def test_first_call_computes_second_reuses(cache, key):
    compute = CountingCompute()
    first = cache.get_or_compute(key, compute)
    assert compute.calls == 1 and not first.from_cache
    assert_matches(first, compute)

    second = cache.get_or_compute(key, compute)
    assert compute.calls == 1 and second.from_cache
    assert second.path == first.path
    assert_matches(second, compute)
    assert isinstance(second.embeddings, np.memmap)


def test_layout_and_manifest(cache, key):
    entry = cache.get_or_compute(key, CountingCompute(n=7, d=3))
    fp = key_fingerprint(key)
    assert entry.fingerprint == fp
    assert all_files(cache.root) == [f"{fp}.embeddings.npy", f"{fp}.labels.npy", f"{fp}.manifest.json"]
    manifest = json.loads((cache.root / f"{fp}.manifest.json").read_text())
    assert manifest["key"] == key
    assert manifest["embeddings"]["shape"] == [7, 3] and manifest["embeddings"]["dtype"] == "<f4"
    assert manifest["labels"]["shape"] == [7] and manifest["labels"]["dtype"] == "<i8"
    assert len(manifest["embeddings"]["checksum"]) == 64 and manifest["created"]


def test_fingerprint_is_order_independent():
    reordered = {"b": {"y": 2, "x": 1}, "a": 1}
    assert key_fingerprint({"a": 1, "b": {"x": 1, "y": 2}}) == key_fingerprint(reordered)


@pytest.mark.parametrize(
    "changed_key",
    [
        EmbeddingCache.key_for({**ENCODER, "name": "other-net"}, DATASET, "train"),
        EmbeddingCache.key_for({**ENCODER, "weights": "toy-v2"}, DATASET, "train"),
        EmbeddingCache.key_for({**ENCODER, "preprocessing": {"resize": 64}}, DATASET, "train"),
        EmbeddingCache.key_for(ENCODER, {**DATASET, "version": 2}, "train"),
        EmbeddingCache.key_for(ENCODER, DATASET, "test"),
        EmbeddingCache.key_for(ENCODER, DATASET, "train", extra={"subset": "first-10k"}),
        {**EmbeddingCache.key_for(ENCODER, DATASET, "train"), "format_version": -1},
    ],
    ids=["encoder-name", "weights", "preprocessing", "dataset", "split", "extra", "format-version"],
)
def test_changing_any_key_field_recomputes_into_another_file(cache, key, changed_key):
    original = cache.get_or_compute(key, CountingCompute(seed=0))
    other_compute = CountingCompute(seed=1)
    other = cache.get_or_compute(changed_key, other_compute)
    assert other_compute.calls == 1 and not other.from_cache
    assert other.path != original.path
    assert_matches(other, other_compute)
    assert cache.get_or_compute(key, CountingCompute(seed=0)).from_cache  # the original entry is intact


def test_truncated_data_file_is_rebuilt(cache, key):
    compute = CountingCompute()
    entry = cache.get_or_compute(key, compute)
    with open(entry.path, "r+b") as file:
        file.truncate(os.path.getsize(entry.path) - 40)
    del entry
    with pytest.warns(RuntimeWarning, match=r"embeddings\.npy.*truncated"):
        rebuilt = cache.get_or_compute(key, compute)
    assert compute.calls == 2 and not rebuilt.from_cache
    assert_matches(rebuilt, compute)
    assert cache.get_or_compute(key, compute).from_cache


def test_flipped_byte_is_caught_by_checksum(cache, key):
    compute = CountingCompute()
    path = cache.get_or_compute(key, compute).path
    size = os.path.getsize(path)
    with open(path, "r+b") as file:
        file.seek(size - 5)
        byte = file.read(1)
        file.seek(size - 5)
        file.write(bytes([byte[0] ^ 0xFF]))
    assert os.path.getsize(path) == size
    with pytest.warns(RuntimeWarning, match=r"embeddings\.npy.*checksum mismatch"):
        rebuilt = cache.get_or_compute(key, compute)
    assert compute.calls == 2 and not rebuilt.from_cache
    assert_matches(rebuilt, compute)


def test_corrupt_labels_file_is_rebuilt(cache, key):
    compute = CountingCompute()
    cache.get_or_compute(key, compute)
    labels_path = cache.paths(key_fingerprint(key))["labels"]
    labels_path.unlink()
    with pytest.warns(RuntimeWarning, match=r"labels\.npy.*missing"):
        rebuilt = cache.get_or_compute(key, compute)
    assert compute.calls == 2
    assert_matches(rebuilt, compute)


def test_missing_manifest_is_rebuilt(cache, key):
    compute = CountingCompute()
    cache.get_or_compute(key, compute)
    cache.paths(key_fingerprint(key))["manifest"].unlink()
    with pytest.warns(RuntimeWarning, match="manifest.*missing"):
        rebuilt = cache.get_or_compute(key, compute)
    assert compute.calls == 2 and not rebuilt.from_cache
    assert_matches(rebuilt, compute)


def test_unreadable_manifest_is_rebuilt(cache, key):
    compute = CountingCompute()
    cache.get_or_compute(key, compute)
    cache.paths(key_fingerprint(key))["manifest"].write_text('{"format_version": 1, "key": ')
    with pytest.warns(RuntimeWarning, match=r"manifest\.json.*unreadable manifest"):
        rebuilt = cache.get_or_compute(key, compute)
    assert compute.calls == 2
    assert_matches(rebuilt, compute)


def test_exception_in_compute_leaves_nothing(cache, key):
    def interrupted():
        raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(key, interrupted)
    assert all_files(cache.root) == []

    compute = CountingCompute()
    entry = cache.get_or_compute(key, compute)
    assert compute.calls == 1 and not entry.from_cache
    assert_matches(entry, compute)


def test_interruption_between_files_leaves_no_complete_looking_entry(cache, key, monkeypatch):
    real_replace = os.replace

    def crash_on_labels(src, dst):
        if str(dst).endswith(".labels.npy"):
            raise KeyboardInterrupt("simulated crash while publishing labels")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_labels)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(key, CountingCompute())
    monkeypatch.undo()
    fp = key_fingerprint(key)
    assert all_files(cache.root) == [f"{fp}.embeddings.npy"]  # no manifest, no temp files

    compute = CountingCompute()
    with pytest.warns(RuntimeWarning, match="manifest.*missing"):
        entry = cache.get_or_compute(key, compute)
    assert compute.calls == 1
    assert_matches(entry, compute)


def test_stale_temp_files_are_swept(cache, key):
    cache.root.mkdir(parents=True)
    stale = cache.root / f".{key_fingerprint(key)}.abc123.tmp"
    stale.write_bytes(b"half-written")
    cache.get_or_compute(key, CountingCompute())
    assert not stale.exists()


def test_returned_arrays_are_read_only(cache, key):
    compute = CountingCompute()
    for _ in range(2):  # freshly computed and loaded from cache
        entry = cache.get_or_compute(key, compute)
        assert not entry.embeddings.flags.writeable and not entry.labels.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            entry.embeddings[0, 0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            entry.labels[0] = 1


def test_tensors_are_writable_copies_that_leave_the_entry_alone(cache, key):
    compute = CountingCompute()
    entry = cache.get_or_compute(key, compute)
    x, y = entry.tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (50, 16) and y.shape == (50,)
    x[0, 0], y[0] = 123.0, 7
    assert entry.embeddings[0, 0] == compute.embeddings[0, 0] != 123.0
    assert entry.tensors()[1][0] == compute.labels[0]


@pytest.mark.parametrize(
    "bad, match",
    [
        ((np.zeros((4, 3, 2), np.float32), np.zeros(4, np.int64)), r"shape \(N, D\)"),
        ((np.zeros((4, 3), np.float32), np.zeros(5, np.int64)), "labels of shape"),
        ((np.zeros((4, 3), np.float32), np.zeros(4, np.float32)), "integer labels"),
        ((np.full((4, 3), np.nan, np.float32), np.zeros(4, np.int64)), "NaN"),
    ],
    ids=["3d", "label-count", "label-dtype", "nan"],
)
def test_invalid_compute_output_is_rejected_and_not_stored(cache, key, bad, match):
    with pytest.raises(ValueError, match=match):
        cache.get_or_compute(key, lambda: bad)
    assert all_files(cache.root) == []


# --- extraction -------------------------------------------------------------------------------


def toy_dataset(n=37, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return TensorDataset(images, labels)


def toy_encoder(d=6):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, d), nn.Dropout(0.5))


def test_extract_matches_direct_forward_in_order():
    dataset, encoder = toy_dataset(), toy_encoder()
    encoder.train()
    result = extract_embeddings(encoder, dataset, batch_size=8, progress=False)
    assert encoder.training  # mode restored
    encoder.eval()
    with torch.no_grad():
        expected = encoder(dataset.tensors[0]).numpy()
    assert result.embeddings.shape == (37, 6) and result.embeddings.dtype == np.float32
    np.testing.assert_allclose(result.embeddings, expected, rtol=1e-6, atol=1e-6)  # eval mode: no dropout
    np.testing.assert_array_equal(result.labels, dataset.tensors[1].numpy())
    assert result.labels.dtype == np.int64
    assert result.images_per_second > 0
    embeddings, labels = result  # unpacks as a compute() return value
    assert embeddings is result.embeddings and labels is result.labels


def test_extract_result_can_feed_the_cache(cache, key):
    dataset = toy_dataset()
    entry = cache.get_or_compute(key, lambda: extract_embeddings(toy_encoder(), dataset, progress=False))
    np.testing.assert_array_equal(entry.labels, dataset.tensors[1].numpy())
    assert entry.embeddings.shape == (37, 6)


class NaNOnSecondBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = x.flatten(1)[:, :5].clone()
        if self.calls == 2:
            out[1, 2] = float("nan")
        return out


def test_extract_rejects_nan_naming_the_batch():
    with pytest.raises(ValueError, match=r"batch 1 \(samples 8\.\.15\).*NaN"):
        extract_embeddings(NaNOnSecondBatch(), toy_dataset(), batch_size=8, progress=False)


def test_extract_rejects_non_2d_output():
    with pytest.raises(ValueError, match=r"shape \(8, 3, 4, 4\); expected \(8, D\)"):
        extract_embeddings(nn.Identity(), toy_dataset(), batch_size=8, progress=False)


def test_extract_shows_progress(capsys):
    extract_embeddings(toy_encoder(), toy_dataset(), batch_size=8, progress=True, desc="toy")
    err = capsys.readouterr().err
    assert "toy" in err and "37/37" in err


def _refuse_writes_under(monkeypatch, root):
    """Make every file opened for writing under ``root`` fail as on a read-only mount (the tests run as
    root, which chmod does not stop)."""
    import builtins
    import errno

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(root)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if str(path).startswith(str(root)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)


def test_read_only_cache_with_a_valid_entry_is_readable(cache, key, monkeypatch):
    compute = CountingCompute()
    cache.get_or_compute(key, compute)
    for lock in cache.root.glob("*.lock"):
        lock.unlink()  # a cache copied without its lock files
    before = all_files(cache.root)
    _refuse_writes_under(monkeypatch, cache.root)
    entry = cache.get_or_compute(key, compute)
    assert entry.from_cache and compute.calls == 1
    assert_matches(entry, compute)
    assert all_files(cache.root) == before


def test_read_only_cache_without_the_entry_says_so(cache, key, monkeypatch):
    cache.root.mkdir(parents=True)
    _refuse_writes_under(monkeypatch, cache.root)
    compute = CountingCompute()
    with pytest.raises(PermissionError, match=r"is not writable \(Read-only file system\) and has no valid entry"):
        cache.get_or_compute(key, compute)
    assert compute.calls == 0


def test_entry_files_get_the_umask_permissions(cache, key):
    old_umask = os.umask(0o022)
    try:
        cache.get_or_compute(key, CountingCompute())
    finally:
        os.umask(old_umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in cache.root.iterdir() if p.suffix in (".npy", ".json")}
    assert set(modes.values()) == {0o644}, modes


# --- the image pipeline: backends share one cache key ---------------------------------------------


def write_cifar10_jpeg_tree(root, per_class: int = 1) -> None:
    """root/cifar10-jpeg/{train,test}/<class>/NNNN.jpg: random 32 x 32 colour images."""
    from PIL import Image

    from avalanche_dkvb.data import CIFAR10_CLASSES

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            for j in range(per_class):
                path = root / "cifar10-jpeg" / split / name / f"{j:04d}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=95)


def test_backends_give_the_same_embeddings_under_the_same_cache_key(tmp_path):
    pytest.importorskip("openvino")
    from avalanche_dkvb.embeddings.pipeline import cached_embeddings

    write_cifar10_jpeg_tree(tmp_path / "data")
    entries = {}
    for backend in ("eager", "openvino"):
        torch.manual_seed(0)  # the same random weights for both
        entries[backend] = cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "test", weights=None,
                                             data_root=tmp_path / "data", cache_root=tmp_path / backend,
                                             image_size=48, batch_size=4, num_workers=0, backend=backend)
    eager, fast = entries["eager"], entries["openvino"]
    assert not eager.from_cache and not fast.from_cache
    assert eager.fingerprint == fast.fingerprint  # the backend is not part of the key
    assert eager.embeddings.shape == (10, 1280)
    np.testing.assert_array_equal(eager.labels, fast.labels)
    error = np.abs(fast.embeddings - eager.embeddings).max() / np.abs(eager.embeddings).max()
    assert 0 < error <= 1e-4
    again = cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "test", weights=None,
                              data_root=tmp_path / "data", cache_root=tmp_path / "eager", image_size=48,
                              backend="openvino")
    assert again.from_cache  # an entry made by one backend serves the other


def test_pipeline_checks_backend_settings_before_reading_data(tmp_path):
    from avalanche_dkvb.embeddings.pipeline import cached_embeddings

    with pytest.raises(ValueError, match="backend must be one of"):
        cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "test", data_root=tmp_path / "missing",
                          backend="fastest")


def test_per_class_subset_is_sliced_from_the_cached_whole_split(tmp_path, monkeypatch):
    from avalanche_dkvb.embeddings import pipeline

    write_cifar10_jpeg_tree(tmp_path / "data", per_class=3)
    common = dict(weights=None, data_root=tmp_path / "data", image_size=32, batch_size=4, num_workers=0,
                  backend="eager")
    torch.manual_seed(0)
    fresh = pipeline.cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "train", per_class=2,
                                       cache_root=tmp_path / "fresh", **common)
    torch.manual_seed(0)  # the same random weights
    whole = pipeline.cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "train",
                                       cache_root=tmp_path / "sliced", **common)
    monkeypatch.setattr(pipeline, "extract_embeddings", lambda *a, **k: pytest.fail("extracted again"))
    sliced = pipeline.cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "train", per_class=2,
                                        cache_root=tmp_path / "sliced", **common)
    assert whole.embeddings.shape == (30, 1280) and sliced.embeddings.shape == (20, 1280)
    assert not sliced.from_cache and sliced.fingerprint == fresh.fingerprint
    np.testing.assert_array_equal(sliced.labels, fresh.labels)
    np.testing.assert_allclose(sliced.embeddings, fresh.embeddings, rtol=0, atol=1e-6)
