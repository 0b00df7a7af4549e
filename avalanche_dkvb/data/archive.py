"""Where data lives locally, and atomic extraction of dataset archives.

``DEFAULT_DATA_ROOT`` (``<repo>/data``, git-ignored) is where datasets are read from
and extracted to; ``SHARED_DATA_DIR`` (``<repo>/../shared/data``) holds read-only
archives provided on machines without internet.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

from avalanche_dkvb.atomic_files import temporary_sibling

__all__ = ["DEFAULT_DATA_ROOT", "REPO_ROOT", "SHARED_DATA_DIR", "extract_archive"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_ROOT = REPO_ROOT / "data"
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def extract_archive(archive: str | Path, dest: str | Path, member_root: str | None = None) -> Path:
    """Extract a .tar(.gz) or .zip ``archive`` so that ``dest`` holds its content; return ``dest``.

    ``member_root`` is the archive's top folder to become ``dest`` (``None``: the
    archive's whole content becomes ``dest``). Does nothing if ``dest`` exists. The
    archive is extracted into a temporary sibling of ``dest`` which is renamed to
    ``dest`` only once complete, so an interrupted extraction never leaves a ``dest``
    that looks complete (a leftover ``.<name>.<pid>-<hex>.tmp`` folder may be deleted).
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        return dest
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_sibling(dest)
    staging.mkdir()  # with the umask's permissions, like the files extracted into it
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(staging, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        else:
            raise ValueError(f"{archive} is neither a tar nor a zip archive")
        content = staging / member_root if member_root is not None else staging
        if not content.is_dir():
            raise FileNotFoundError(f"{archive} has no top folder {member_root!r}")
        try:
            content.rename(dest)
        except OSError:
            if not dest.exists():  # not a concurrent extraction that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
