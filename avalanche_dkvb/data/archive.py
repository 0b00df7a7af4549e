"""Atomic extraction of dataset archives (where data lives by default: ``avalanche_dkvb.locations``)."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

from avalanche_dkvb.atomic_files import temporary_sibling
from avalanche_dkvb.locations import ARCHIVE_DIR_ENV, default_archive_dir

__all__ = ["describe_archive", "extract_archive", "local_archive"]


def local_archive(archive: str | Path | None, name: str) -> Path | None:
    """``archive`` as a Path, else ``name`` in ``default_archive_dir()``, else None (no local archive)."""
    if archive is not None:
        return Path(archive)
    archive_dir = default_archive_dir()
    return archive_dir / name if archive_dir is not None else None


def describe_archive(archive: Path | None) -> str:
    """For error messages: the archive and whether it exists, or how to name one."""
    if archive is None:
        return f"a local archive (none given: pass archive=, archive_dir=, or set ${ARCHIVE_DIR_ENV})"
    return f"{archive} (exists: {archive.is_file()})"


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
