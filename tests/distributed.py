"""Runs a test function in N processes joined by a gloo process group and returns their results."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as exc:  # reported to the parent, which fails the test
        result = ("error", f"rank {rank}: {exc!r}\n{traceback.format_exc()}")
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(result))


def run_distributed(fn: Callable, world: int = 2, *args: Any) -> list[Any]:
    """fn(*args) on every rank (fn must be importable); returns the list of results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, free_port(), fn, args, out_dir), nprocs=world, start_method="spawn")
        results = [pickle.loads(Path(out_dir, f"{r}.pkl").read_bytes()) for r in range(world)]
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]
