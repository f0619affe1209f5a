"""Atomic multi-rank checkpoints: one folder per checkpoint, one file per rank plus a shared one.

Every rank writes its own file (queue shard, RNG states) into a temporary folder; rank 0 adds
the shared state (model, optimizer, schedule position, cluster state, config, MLflow run id)
and only after all ranks are done renames the folder to ``ckpt-<global step>``. A folder with
that name is therefore always complete. Loading falls back to the previous checkpoint, with a
warning, when any rank cannot read its files of the latest one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed

from . import dist

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
SHARED = "state.pt"


def _barrier() -> None:
    if dist.is_distributed():
        torch.distributed.barrier()


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=lambda p: p.name)


def save(root: Path, step: int, shared: dict, per_rank: dict, keep: int) -> Path:
    """Writes a checkpoint collectively (every rank calls this); returns its folder."""
    name = f"{PREFIX}{step:09d}"
    tmp, final = root / f".tmp-{name}", root / name
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    _atomic_save(per_rank, tmp / f"rank{dist.rank()}.pt")
    if dist.rank() == 0:
        _atomic_save(shared, tmp / SHARED)
    _barrier()
    if dist.rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    _barrier()
    return final


def _try_load(path: Path) -> tuple[dict, dict] | None:
    try:
        shared = torch.load(path / SHARED, map_location="cpu", weights_only=False)
        own = torch.load(path / f"rank{dist.rank()}.pt", map_location="cpu", weights_only=False)
        return shared, own
    except Exception as exc:  # noqa: BLE001 - truncated, missing or corrupt: try the previous one
        log.warning("rank %d cannot read checkpoint %s (%s: %s)", dist.rank(), path, type(exc).__name__, exc)
        return None


def load(root: Path, explicit: Path | None = None) -> tuple[Path, dict, dict] | None:
    """The latest checkpoint every rank can read (or ``explicit``), as (folder, shared, own rank's)."""
    candidates = [explicit] if explicit is not None else list(reversed(list_checkpoints(root)))
    for i, path in enumerate(candidates):
        loaded = _try_load(path)
        ok = torch.tensor([1 if loaded is not None else 0], device=dist.comm_device())
        if dist.is_distributed():
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if int(ok):
            if i > 0:
                log.warning("resuming from %s instead of the unreadable %s", path, candidates[0])
            return path, *loaded
        if explicit is not None:
            raise RuntimeError(f"cannot resume from {explicit}: unreadable on at least one rank")
    return None


def encoder_from_checkpoint(path: Path, cfg=None):
    """The query encoder of a dgucdir checkpoint (folder or its state.pt) and the config it was trained with.

    ``cfg`` overrides the saved config (its model section must match the checkpoint's tensors).
    """
    from .config import from_dict
    from .model.encoder import Encoder

    path = Path(path)
    state_file = path / SHARED if path.is_dir() else path
    try:
        shared = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{state_file}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(shared, dict) or "model" not in shared or "config" not in shared:
        raise ValueError(f"{state_file}: not a dgucdir checkpoint")
    cfg = cfg or from_dict(shared["config"])
    encoder = Encoder(cfg.model.arch, cfg.model.proj_dim)
    weights = {k[len("encoder_q."):]: v for k, v in shared["model"].items() if k.startswith("encoder_q.")}
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"{state_file}: was trained with another architecture than model.arch={cfg.model.arch} "
                         f"({str(exc).splitlines()[0]})") from exc
    return encoder, cfg
