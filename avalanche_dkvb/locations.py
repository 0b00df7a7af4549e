"""Where the library reads data and keeps caches, when the caller does not say: never the source tree.

``default_data_root()``: ``$DKVB_DATA_ROOT``, else ``<user cache>/avalanche-dkvb/data``;
``default_cache_root()``: ``$DKVB_CACHE_ROOT``, else ``<user cache>/avalanche-dkvb/embeddings``;
``default_archive_dir()``: ``$DKVB_ARCHIVE_DIR`` (local dataset archives to extract), else None.
``<user cache>`` is ``$XDG_CACHE_HOME``, else ``~/.cache``. Read at each call, so the environment of
the moment counts.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ARCHIVE_DIR_ENV", "CACHE_ROOT_ENV", "DATA_ROOT_ENV", "default_archive_dir", "default_cache_root",
           "default_data_root", "user_cache_dir"]

DATA_ROOT_ENV = "DKVB_DATA_ROOT"
CACHE_ROOT_ENV = "DKVB_CACHE_ROOT"
ARCHIVE_DIR_ENV = "DKVB_ARCHIVE_DIR"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/avalanche-dkvb``, else ``~/.cache/avalanche-dkvb``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "avalanche-dkvb"


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV) or user_cache_dir() / "data")


def default_cache_root() -> Path:
    return Path(os.environ.get(CACHE_ROOT_ENV) or user_cache_dir() / "embeddings")


def default_archive_dir() -> Path | None:
    return Path(os.environ[ARCHIVE_DIR_ENV]) if os.environ.get(ARCHIVE_DIR_ENV) else None
