"""The one build mechanism of the C++ kernels: cached per source, never blocked by an interrupted build."""

import time

import pytest
import torch.utils.cpp_extension

from avalanche_dkvb.native import build_extension, toolchain_available

pytestmark = pytest.mark.skipif(not toolchain_available(), reason="needs a C++ compiler and ninja")

SOURCE = "int answer(int x) { return x + 42; }"


def _build(name: str, source: str = SOURCE):
    build_extension.cache_clear()  # a fresh process, as far as the lru_cache goes
    return build_extension(name, source, ("answer",), "no fallback")


def test_build_is_cached_and_survives_an_interrupted_build(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "avalanche-dkvb" / "native"
    folder.mkdir(parents=True)
    # what a build killed half-way leaves: its private folder, holding torch's lock file
    (folder / ".dkvb_test_answer-killed").mkdir()
    (folder / ".dkvb_test_answer-killed" / "lock").touch()
    built = []
    real_load_inline = torch.utils.cpp_extension.load_inline
    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline",
                        lambda *args, **kwargs: built.append(real_load_inline(*args, **kwargs)) or built[-1])
    start = time.perf_counter()
    module = _build("dkvb_test_answer")
    assert module is not None and module.answer(1) == 43
    assert built == [module]  # the build's own module, not the library imported a second time
    assert time.perf_counter() - start < 600  # it built instead of waiting on the stale lock
    libraries = sorted(p.name for p in folder.glob("dkvb_test_answer-*.so"))
    assert len(libraries) == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".dkvb_test_answer-killed"]

    def no_compiler(*args, **kwargs):
        raise AssertionError("rebuilt although the library is cached")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    assert _build("dkvb_test_answer").answer(2) == 44  # loaded from the cache, not compiled again
    with pytest.warns(RuntimeWarning, match="could not be built"):  # another source: a new build (refused here)
        assert _build("dkvb_test_answer", SOURCE.replace("42", "7")) is None
    build_extension.cache_clear()


def test_build_identity_covers_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_load_inline(name, build_directory, **kwargs):
        calls.append(kwargs["cpp_sources"])
        raise RuntimeError("stop before compiling")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", fake_load_inline)
    for source in (SOURCE, SOURCE + " "):
        with pytest.warns(RuntimeWarning):
            assert _build("dkvb_test_identity", source) is None
    assert calls == [SOURCE, SOURCE + " "]
    assert not any((tmp_path / "avalanche-dkvb" / "native").iterdir())  # failed builds leave nothing
    build_extension.cache_clear()
