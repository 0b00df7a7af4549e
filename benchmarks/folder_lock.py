"""One owner per output folder: a run holds ``<out>/run.lock`` for as long as it writes there.

The lock is an exclusive ``flock`` on ``run.lock``, which records the holder (pid, host, command,
start time) as JSON. The operating system releases it when the holder exits, however it exits, so a
lock left by a killed run is stale by construction: the next run takes it over (and says whose it
was). A run refused because a live run holds the folder changes nothing on disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "run.lock"


class FolderBusy(RuntimeError):
    """Another live run holds the output folder."""


class FolderLock:
    """Exclusive ownership of ``folder`` for ``command``: :meth:`acquire` (FolderBusy if another
    process holds it), :meth:`release` (removes ``run.lock``); also a context manager."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self._file = None
        self.took_over: dict | None = None  # the record of a dead holder whose lock this run took over

    def acquire(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"--out {self.folder} is a file; expected a folder (or a new name).")
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            lock_file = open(self.path, "a+")  # never truncates: a refused run changes nothing
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_record(lock_file)
                lock_file.close()
                raise FolderBusy(
                    f"{self.folder} is in use by another run (pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')}, started {holder.get('started', '?')}: {holder.get('command', '?')}); "
                    f"wait for it to finish or use another --out.") from None
            if _same_file(lock_file, self.path):
                break
            lock_file.close()  # the previous holder removed run.lock after we opened it: lock the new one
        self.took_over = _read_record(lock_file) or None
        lock_file.seek(0)
        lock_file.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                   "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}, lock_file)
        lock_file.flush()
        self._file = lock_file

    def release(self) -> None:
        """Remove ``run.lock`` and drop the lock; a no-op if this object does not hold it."""
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_record(lock_file) -> dict:
    lock_file.seek(0)
    try:
        record = json.loads(lock_file.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _same_file(lock_file, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(lock_file.fileno()).st_ino
    except FileNotFoundError:
        return False
