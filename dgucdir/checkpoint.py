"""Atomic multi-rank checkpoints over named stateful objects (the torchtitan/DCP contract).

A :class:`Checkpointer` is given two dicts of objects that have ``state_dict()`` and
``load_state_dict()``: the *shared* ones (identical on every rank: model, optimizer, schedule
position, cluster state), which rank 0 writes to ``state.pt``, and the *per-rank* ones (queue
shard, RNG states), which every rank writes to ``rank<r>.pt``. Plus a small ``meta`` dict
(config, world size, MLflow run id) beside the shared state. Nothing is packed by hand: saving
and loading walk the same dicts, so a new piece of state is one new entry.

All ranks write into a temporary folder that rank 0 renames to ``ckpt-<global step>`` only
after every rank is done, so a folder with that name is always complete. Loading takes the
latest checkpoint that every rank can read, skipping (with a warning) one that any rank cannot.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import dist
from .errors import CheckpointError

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
SHARED = "state.pt"
META = "meta"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> Any: ...


@dataclass(frozen=True)
class StateFns:
    """A :class:`Stateful` made of two functions, for state that is not one object of its own."""

    state_dict: Callable[[], dict]
    load_state_dict: Callable[[dict], Any]


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def read_shared(path: Path) -> dict:
    """The shared state of a checkpoint folder (or its ``state.pt``), on the CPU; for tools, not resume."""
    path = Path(path)
    state_file = path / SHARED if path.is_dir() else path
    try:
        shared = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{state_file}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(shared, dict) or META not in shared:
        raise CheckpointError(f"{state_file}: not a dgucdir checkpoint")
    return shared


class Checkpointer:
    """Saves and restores ``shared`` and ``per_rank`` stateful objects under ``root``."""

    def __init__(self, root: Path, shared: dict[str, Stateful], per_rank: dict[str, Stateful], keep: int) -> None:
        self.root = Path(root)
        self.shared = shared
        self.per_rank = per_rank
        self.keep = keep

    def save(self, step: int, meta: dict) -> Path:
        """Writes ``ckpt-<step>`` collectively (every rank calls this); returns its folder."""
        name = f"{PREFIX}{step:09d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        rank = dist.rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        _atomic_save({k: v.state_dict() for k, v in self.per_rank.items()}, tmp / rank_file(rank))
        if rank == 0:
            _atomic_save({META: meta, **{k: v.state_dict() for k, v in self.shared.items()}}, tmp / SHARED)
        dist.barrier()
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            tmp.replace(final)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", final)
        dist.barrier()
        return final

    def load(self, explicit: Path | None = None) -> tuple[Path, dict] | None:
        """Restores the latest checkpoint every rank can read (or ``explicit``); returns (folder, meta).

        None when there is no checkpoint. The objects are only touched once all ranks agree on
        the folder, so a failed attempt leaves them as they were.
        """
        candidates = [Path(explicit)] if explicit is not None else list(reversed(list_checkpoints(self.root)))
        for unfinished in sorted(self.root.glob(".tmp-*")) if self.root.is_dir() else []:
            if dist.rank() == 0:  # never read: a rank or its node died while the ranks were writing it
                log.warning("skipping the unfinished checkpoint %s (a rank stopped while writing it)", unfinished)
                shutil.rmtree(unfinished, ignore_errors=True)
        dist.barrier()
        for i, path in enumerate(candidates):
            loaded = self._read(path)
            if dist.all_ranks(loaded is not None):
                if i > 0:
                    log.warning("resuming from %s instead of the unreadable %s", path, candidates[0])
                shared, own = loaded
                meta = shared[META]
                if meta["world_size"] != dist.world_size():
                    raise CheckpointError(f"{path} was written by {meta['world_size']} ranks; this job has "
                                          f"{dist.world_size()} (the queue shards are per rank)")
                for key, obj in self.shared.items():
                    obj.load_state_dict(shared[key])
                for key, obj in self.per_rank.items():
                    obj.load_state_dict(own[key])
                return path, meta
            if explicit is not None:
                raise CheckpointError(f"cannot resume from {explicit}: unreadable on at least one rank")
        return None

    def _read(self, path: Path) -> tuple[dict, dict] | None:
        try:
            shared = torch.load(path / SHARED, map_location="cpu", weights_only=False)
            own = torch.load(path / rank_file(dist.rank()), map_location="cpu", weights_only=False)
            missing = [k for k in (META, *self.shared) if k not in shared] + [k for k in self.per_rank if k not in own]
            if missing:
                raise KeyError(f"no {', '.join(missing)} (written by another version?)")
            return shared, own
        except Exception as exc:  # noqa: BLE001 - truncated, missing or corrupt: try the previous one
            log.warning("rank %d cannot read checkpoint %s (%s: %s)", dist.rank(), path, type(exc).__name__, exc)
            return None
