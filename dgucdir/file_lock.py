"""An exclusive lock on a file, for work that processes started together must do once.

Jobs launched side by side (`dgucdir ablate --jobs`, the seeds of a sweep) reach the same one-time
work at the same moment: creating an MLflow store's tables, rendering the demo data. Whoever takes
the lock first does it; the others wait, then find it done.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


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
