"""The library stands alone: data and cache roots from parameters, environment or the user cache
directory, never the source tree; the command lines show the library's warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import avalanche_dkvb
from avalanche_dkvb.data import load_image_set
from avalanche_dkvb.embeddings.pipeline import cached_embeddings
from avalanche_dkvb.locations import default_archive_dir, default_cache_root, default_data_root
from benchmarks import cli

SOURCE = Path(avalanche_dkvb.__file__).parent


def test_defaults_come_from_the_environment_or_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("DKVB_DATA_ROOT", raising=False)
    monkeypatch.delenv("DKVB_CACHE_ROOT", raising=False)
    monkeypatch.delenv("DKVB_ARCHIVE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_root() == tmp_path / "xdg" / "avalanche-dkvb" / "data"
    assert default_cache_root() == tmp_path / "xdg" / "avalanche-dkvb" / "embeddings"
    assert default_archive_dir() is None
    monkeypatch.setenv("DKVB_DATA_ROOT", str(tmp_path / "d"))
    monkeypatch.setenv("DKVB_CACHE_ROOT", str(tmp_path / "c"))
    assert (default_data_root(), default_cache_root()) == (tmp_path / "d", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "d" / "cifar10-jpeg")):
        load_image_set("cifar10_jpeg", "train")


def test_no_library_default_points_into_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in ("DKVB_DATA_ROOT", "DKVB_CACHE_ROOT", "DKVB_ARCHIVE_DIR"):
        monkeypatch.delenv(name, raising=False)
    repo = SOURCE.parent
    for path in (default_data_root(), default_cache_root()):
        assert repo not in path.parents, path
    with pytest.raises(FileNotFoundError) as info:
        load_image_set("tiny_imagenet", "train")
    assert str(repo) not in str(info.value) and "--" not in str(info.value)
    assert not any("parents[" in p.read_text() for p in SOURCE.rglob("*.py")), "a path derived from __file__"


def test_bad_sizes_are_refused_before_any_data_is_read(tmp_path):
    for kwargs, message in [({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
                            ({"image_size": -1}, "image_size must be a positive integer, got -1"),
                            ({"per_class": 0}, "per_class must be a positive integer, got 0")]:
        with pytest.raises(ValueError, match=message):
            cached_embeddings("tf_efficientnet_lite0", "cifar10_jpeg", "train", data_root=tmp_path / "none",
                              cache_root=tmp_path / "cache", **kwargs)
    assert not (tmp_path / "cache").exists()


def test_the_cli_hides_only_avalanches_deprecations():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.hide_avalanche_deprecations()
        for module in ("avalanche", "avalanche.training.plugins.gdumb", "avalanche_dkvb.strategy", "benchmarks"):
            warnings.warn_explicit("old API", DeprecationWarning, "f.py", 1, module=module)
        warnings.warn_explicit("fast path off", UserWarning, "f.py", 1, module="avalanche_dkvb.strategy")
        warnings.warn_explicit("cache entry rebuilt", RuntimeWarning, "f.py", 1, module="avalanche_dkvb.embeddings")
    shown = [(str(w.message), w.filename) for w in caught]
    assert [str(w.message) for w in caught] == ["old API", "old API", "fast path off", "cache entry rebuilt"], shown
