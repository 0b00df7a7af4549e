"""Building the package's C++ CPU kernels on first use, or None where they cannot be built.

Each kernel module keeps its C++ source next to its Python wrapper and asks :func:`build_extension`
for the compiled functions. ``torch.utils.cpp_extension.load_inline`` compiles them once (tens of
seconds) per source, torch and Python version into ``<user cache>/native`` (see
:mod:`avalanche_dkvb.locations`). Each build runs in its own temporary folder and its library is then
renamed into place (atomic), because torch's own cache guards a build with a lock file that a killed
build leaves behind, and every later process then waits on it forever; here an interrupted build leaves
at most a temporary folder, and concurrent builders never wait on each other. There is no ``-march=native``:
kernels pick their x86-64 level at run time (GCC ``target_clones``), so a build cached on a shared disk
runs on every node. Where no C++ compiler or ninja is found, :func:`build_extension` warns once and
returns None, and the caller falls back to its torch implementation (same results, slower).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

from avalanche_dkvb.locations import user_cache_dir


def toolchain_available() -> bool:
    """Whether the kernels can be built here: a C++ compiler and ninja on the PATH."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which("c++") is not None and is_ninja_available()


@functools.lru_cache(maxsize=None)
def build_extension(name: str, source: str, functions: tuple[str, ...], fallback: str):
    """The compiled module ``name`` exposing ``functions`` from the C++ ``source``, or None (warned once,
    with ``fallback`` saying what runs instead) where it cannot be built."""
    try:
        return _load_or_build(name, source, functions)
    except Exception as error:  # no compiler, no ninja, unsupported platform, ...
        warnings.warn(f"The C++ kernels {name} could not be built ({type(error).__name__}: {error}); "
                      f"{fallback}.", RuntimeWarning, stacklevel=3)
        return None


def _load_or_build(name: str, source: str, functions: tuple[str, ...]):
    """The module from its cached library, built first (in a private folder, then renamed in) if absent."""
    import torch
    from torch.utils.cpp_extension import load_inline

    flags = ["-O3"]
    identity = "\0".join([source, *functions, *flags, torch.__version__, platform.python_version()])
    library = user_cache_dir() / "native" / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=library.parent) as build_directory:
            module = load_inline(name, cpp_sources=source, functions=list(functions), extra_cflags=flags,
                                 build_directory=build_directory, verbose=False)
            os.replace(Path(build_directory) / f"{name}.so", library)
        return module  # already loaded by the build: not imported a second time from its new place
    spec = importlib.util.spec_from_file_location(name, library)  # ".so": an extension module's loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
