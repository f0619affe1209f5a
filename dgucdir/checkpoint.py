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

Checkpoints are shared between people, so reading one must never run code: every file is read
with ``torch.load(weights_only=True)``, and the state is kept to tensors and plain values.
A write that fails for lack of space (``ENOSPC``/``EDQUOT``, on any rank) removes the partial
folder and raises :class:`CheckpointSpaceError`, whose exit code says "resumable": the last
complete checkpoint is never touched before a new one is in place.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import dist
from .errors import CheckpointError, CheckpointSpaceError, first_line, space_error

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
    """Written through a file object of ours (so a full disk surfaces as the ``OSError`` it is, not
    as the zip writer's "unexpected pos"), synced, then renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # network filesystems report a full quota at the latest here
    tmp.replace(path)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    """Free space of the filesystem that holds ``path`` (or would, for a folder not made yet)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


class RefusedCheckpoint(CheckpointError):
    """A file that holds more than tensors and plain values: never loaded, never skipped over silently."""


_REFUSAL = re.compile(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)")


def safe_load(path: Path) -> Any:
    """``torch.load`` that never runs code from the file: tensors, plain values and nothing else.

    A refused file raises :class:`CheckpointError` naming the file and what the safe loader
    refused (e.g. ``GLOBAL posix.system``); any other unreadable file (truncated, not a torch
    file) raises it with the reader's reason. Both are one line.
    """
    try:
        with torch.serialization.safe_globals(LEGACY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _REFUSAL.search(" ".join(str(exc).split()))
        if found and ("GLOBAL" in found.group(1) or "allowlisted" in found.group(1)):  # code or a class it names
            raise RefusedCheckpoint(f"{path}: refused by the safe loader, which reads only tensors and plain "
                                    f"values ({found.group(1)})") from exc
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - truncated, missing, not a torch file: the same user error
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from exc


def _legacy_safe_globals() -> list:
    """What checkpoints of dgucdir 0.1 need beyond plain values: numpy's RNG state was pickled as an
    ``ndarray`` of uint32. Each entry only rebuilds an array from raw bytes: ``_reconstruct`` makes
    an empty array of an allowed class, ``ndarray``/``dtype``/the uint32 dtype class restore shape,
    dtype and data; the items of an
    object array would still go through the same restricted unpickler. No callable of the file's
    choosing is reachable, so this stays as safe as ``weights_only`` itself."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 moved it; 1.26 keeps np.core
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


LEGACY_SAFE_GLOBALS = _legacy_safe_globals()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def read_shared(path: Path) -> dict:
    """The shared state of a checkpoint folder (or its ``state.pt``), on the CPU; for tools, not resume."""
    path = Path(path)
    state_file = path / SHARED if path.is_dir() else path
    shared = safe_load(state_file)
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
        """Writes ``ckpt-<step>`` collectively (every rank calls this); returns its folder.

        Raises :class:`CheckpointSpaceError` on every rank when any rank ran out of space; the
        partial folder is gone and the previous checkpoints are as they were.
        """
        name = f"{PREFIX}{step:09d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        rank = dist.rank()
        failure: BaseException | None = None
        try:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as exc:
            failure = exc
        if not dist.any_rank(failure is not None):
            try:
                _atomic_save({k: v.state_dict() for k, v in self.per_rank.items()}, tmp / rank_file(rank))
                if rank == 0:
                    _atomic_save({META: meta, **{k: v.state_dict() for k, v in self.shared.items()}}, tmp / SHARED)
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it before anyone raises
                failure = exc
        if dist.any_rank(failure is not None):
            out_of_space = dist.any_rank(failure is not None and space_error(failure) is not None)
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()
            raise self._write_failure(name, failure, out_of_space)
        if rank == 0:
            self._put_in_place(tmp, final)
            for old in list_checkpoints(self.root)[: -self.keep]:
                if old != final:  # never the one just written, whatever sorts after it
                    shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint %s", final)
        dist.barrier()
        return final

    @staticmethod
    def _put_in_place(tmp: Path, final: Path) -> None:
        """Renames the finished folder to its final name; an older folder of that name goes only afterwards."""
        if final.exists():
            aside = final.with_name(f".old-{final.name}")
            shutil.rmtree(aside, ignore_errors=True)
            final.replace(aside)
            tmp.replace(final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            tmp.replace(final)

    def _write_failure(self, name: str, failure: BaseException | None, out_of_space: bool) -> BaseException:
        """The error to raise on this rank: this rank's own error, the space message (``out_of_space``: on some
        rank), or, on a rank that wrote its part, a pointer to the one that could not."""
        if failure is not None and space_error(failure) is None:
            return failure
        if failure is None and not out_of_space:
            return RuntimeError(f"checkpoint {name} not written: another rank failed to write its part (its error "
                                "is in its log)")
        previous = list_checkpoints(self.root)
        resume = (f"resume from {previous[-1]} with --resume once there is room" if previous
                  else "no earlier checkpoint: the run starts over when resumed")
        if failure is None:
            return CheckpointSpaceError(f"checkpoint {name} not written: another rank ran out of space; {resume}")
        needed = f"about {folder_bytes(previous[-1]) / 2**20:.1f} MiB (the last checkpoint's size)" if previous \
            else "more than was left"
        return CheckpointSpaceError(
            f"checkpoint {name} not written: {space_error(failure).strerror.lower()} in {self.root} "
            f"(it needs {needed}; {free_bytes(self.root) / 2**20:.1f} MiB free); {resume}")

    def warn_if_short_of_space(self, estimate: int) -> None:
        """At start: one warning when the filesystem cannot hold one more checkpoint of ``estimate`` bytes."""
        previous = list_checkpoints(self.root)
        needed = folder_bytes(previous[-1]) if previous else estimate
        free = free_bytes(self.root)
        if free < needed:
            log.warning("only %.1f MiB free for checkpoints in %s; one needs about %.1f MiB: the first checkpoint "
                        "will fail (the run then stops, resumable)", free / 2**20, self.root, needed / 2**20)

    def load(self, explicit: Path | None = None) -> tuple[Path, dict] | None:
        """Restores the latest checkpoint every rank can read (or ``explicit``); returns (folder, meta).

        None when there is no checkpoint. The objects are only touched once all ranks agree on
        the folder, so a failed attempt leaves them as they were. Checkpoints of which none can be
        read are an error, not a fresh start: hours of training are not thrown away in silence.
        """
        candidates = [Path(explicit)] if explicit is not None else self._listed_by_rank0()
        for unfinished in sorted(self.root.glob(".tmp-*")) if self.root.is_dir() else []:
            if dist.rank() == 0:  # never read: a rank or its node died while the ranks were writing it
                log.warning("skipping the unfinished checkpoint %s (a rank stopped while writing it)", unfinished)
                shutil.rmtree(unfinished, ignore_errors=True)
        dist.barrier()
        for i, path in enumerate(candidates):
            refusal: RefusedCheckpoint | None = None
            try:
                loaded = self._read(path)
            except RefusedCheckpoint as exc:
                refusal, loaded = exc, None
            if dist.any_rank(refusal is not None):  # a crafted file is an error, not a reason to fall back
                raise refusal or RefusedCheckpoint(f"{path}: refused by the safe loader on another rank")
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
        if candidates:
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoint(s) in {self.root} ({', '.join(p.name for p in candidates)}) "
                "can be read on every rank (the reasons are in the warnings above); to start over, train with "
                "--overwrite or remove the folder")
        return None

    def _listed_by_rank0(self) -> list[Path]:
        """The checkpoints, newest first, as rank 0 sees them, on every rank: one listing per job, so that
        stale or node-local listings cannot make ranks pick different checkpoints. A rank that cannot see
        one of them says so, naming itself and its host, and every rank stops."""
        listing = [str(p) for p in reversed(list_checkpoints(self.root))] if dist.rank() == 0 else None
        listing = [Path(p) for p in dist.broadcast_object(listing)]
        unseen = [p.name for p in listing if not p.is_dir()]
        if dist.any_rank(bool(unseen)):
            where = f"rank {dist.rank()} on {socket.gethostname()}"
            raise CheckpointError(f"{where} cannot see {', '.join(unseen)} in {self.root}, which rank 0 lists: is "
                                  "the folder on a filesystem every node shares?" if unseen else
                                  f"another rank cannot see the checkpoints rank 0 lists in {self.root} (its error "
                                  "names it)")
        return listing

    def set_aside_newer(self, resumed: Path) -> Path | None:
        """After resuming from ``resumed``, moves the checkpoints written after it into ``aside-<name>-<time>/``
        (collective; rank 0 moves). Training on from an older checkpoint starts a new branch: the newer
        ones would otherwise be shadowed by it (``--resume`` picks the highest step) or rotated away.
        Returns the folder they went to, None when there were none."""
        newer = [p for p in list_checkpoints(self.root) if p.name > Path(resumed).name]
        aside = None
        if newer:
            aside = self.root / f"aside-{Path(resumed).name}-{time.strftime('%Y%m%d-%H%M%S')}"
            if dist.rank() == 0:
                aside.mkdir(parents=True)
                for p in newer:
                    p.replace(aside / p.name)
                log.warning("training on from %s: the %d newer checkpoint(s) (%s) moved to %s", Path(resumed).name,
                            len(newer), ", ".join(p.name for p in newer), aside)
        dist.barrier()
        return aside

    def _read(self, path: Path) -> tuple[dict, dict] | None:
        """(shared state, this rank's state) of ``path``, None when unreadable here. The shared state (the
        model and optimizer: hundreds of MB) is read by rank 0 alone and broadcast, not read by every rank
        from the shared filesystem; each rank reads its own small file."""
        shared, refusal = self._read_shared_on_rank0(path)
        if refusal is not None:
            raise RefusedCheckpoint(refusal)
        try:
            if shared is None:
                raise OSError(f"rank 0 could not read {path / SHARED} (its warning says why)")
            own = safe_load(path / rank_file(dist.rank()))
            missing = [k for k in (META, *self.shared) if k not in shared] + [k for k in self.per_rank if k not in own]
            if missing:
                raise KeyError(f"no {', '.join(missing)} (written by another version?)")
            return shared, own
        except RefusedCheckpoint:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated, missing or corrupt: try the previous one
            log.warning("rank %d cannot read checkpoint %s (%s: %s)", dist.rank(), path, type(exc).__name__, exc)
            return None

    @staticmethod
    def _read_shared_on_rank0(path: Path) -> tuple[dict | None, str | None]:
        """Rank 0 reads ``state.pt`` and broadcasts (state, refusal): the state, or None if unreadable, and the
        safe loader's refusal message, if any (collective)."""
        result: tuple[dict | None, str | None] = (None, None)
        if dist.rank() == 0:
            try:
                result = (safe_load(path / SHARED), None)
            except RefusedCheckpoint as exc:
                result = (None, str(exc))
            except Exception as exc:  # noqa: BLE001 - reported, and the previous checkpoint is tried
                log.warning("rank 0 cannot read checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
        return dist.broadcast_object(result)
