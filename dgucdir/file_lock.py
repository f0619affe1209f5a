"""An exclusive lock on a file, for work that processes started together must do once.

Jobs launched side by side (`dgucdir ablate --jobs`, the seeds of a sweep) reach the same one-time
work at the same moment: creating an MLflow store's tables, rendering the demo data. Whoever takes
the lock first does it; the others wait, then find it done. :class:`FolderLock` is the other kind:
a folder with one owner for its whole life (a run folder, a pack output), refused to anyone else.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created, with its folder, if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class FolderBusy(UserError):
    """Another live process owns the folder (a second train, ablate or pack into it)."""


class FolderLock:
    """One owner per folder: a non-blocking ``flock`` on ``<folder>/.owner``, held for the owner's life.

    The file names the holder (pid, host, command), so a refusal says who. The kernel drops the lock
    when the holder dies, however it dies, so a crashed run never leaves a stale lock behind. On a
    network filesystem ``flock`` is only as good as the filesystem's locking (NFSv4 and Lustre with
    ``flock`` mounted: good; some mounts: local to the node).
    """

    NAME = ".owner"

    def __init__(self, folder: Path, what: str) -> None:
        self.path = Path(folder) / self.NAME
        self.what = what
        self._handle = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderBusy(f"{self.path.parent} is in use by {holder}: wait for it to end, stop it, or use "
                             "another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({self.what})\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
