"""The repository's conventions for the benchmarks' data, mapped onto the library's parameters:
data sets in ``<repo>/data`` (git-ignored), embedding caches in ``<repo>/.cache/embeddings``, and
read-only dataset archives in ``<repo>/../shared/data`` (machines without internet)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT / "data"
CACHE_ROOT = REPO_ROOT / ".cache" / "embeddings"
ARCHIVE_DIR = REPO_ROOT.parent / "shared" / "data"
