"""Building the package's C++ CPU kernels on first use, or None where they cannot be built.

Each kernel module keeps its C++ source next to its Python wrapper and asks :func:`build_extension`
for the compiled functions. ``torch.utils.cpp_extension.load_inline`` compiles them once per machine
and torch version into torch's extension cache (tens of seconds). There is no ``-march=native``:
kernels pick their x86-64 level at run time (GCC ``target_clones``), so a build cached on a shared disk
runs on every node. Where no C++ compiler or ninja is found, :func:`build_extension` warns once and
returns None, and the caller falls back to its torch implementation (same results, slower).
"""

from __future__ import annotations

import functools
import shutil
import warnings


def toolchain_available() -> bool:
    """Whether the kernels can be built here: a C++ compiler and ninja on the PATH."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which("c++") is not None and is_ninja_available()


@functools.lru_cache(maxsize=None)
def build_extension(name: str, source: str, functions: tuple[str, ...], fallback: str):
    """The compiled module ``name`` exposing ``functions`` from the C++ ``source``, or None (warned once,
    with ``fallback`` saying what runs instead) where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name, cpp_sources=source, functions=list(functions), extra_cflags=["-O3"], verbose=False)
    except Exception as error:  # no compiler, no ninja, unsupported platform, ...
        warnings.warn(f"The C++ kernels {name} could not be built ({type(error).__name__}: {error}); "
                      f"{fallback}.", RuntimeWarning, stacklevel=3)
        return None
