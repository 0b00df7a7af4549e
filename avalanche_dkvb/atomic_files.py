"""Atomic file writes: a file only ever appears under its final name complete.

Every write goes to a uniquely named hidden sibling (``.<name>.<pid>-<random>.tmp``, created
exclusively, ``open(..., "xb")``, so the process umask sets its permissions as for any file), is
fsync'ed, moved over the final name with ``os.replace`` and the folder fsync'ed. An exception inside
the block removes the temporary file and leaves the final file untouched. Concurrent writers of the
same file never share a temporary name; the last rename wins.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "temporary_sibling"]


def temporary_sibling(path: str | os.PathLike) -> Path:
    """A fresh hidden name next to ``path`` (``.<name>.<pid>-<8 hex>.tmp``); nothing is created."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` (creating its folder) only if the block completes; its
    ``name`` is the temporary file's path, so the block can read back what it wrote (after a flush)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temp = temporary_sibling(path)
        try:
            file = open(temp, "xb")  # O_EXCL, mode 0o666 less the umask; file.name is the temporary path
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as file:
        file.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where folders cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
