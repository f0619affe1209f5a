"""Seeds derived from names, process-wide seeding by global rank, and the RNG state of a process.

Every random draw of a training step is a function of (seed, epoch, rank, step, purpose) through
:func:`derive_seed`, which is what makes exact resume work without saving DALI state.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts; stable across processes and Python versions."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_process(seed: int, global_rank: int) -> None:
    """Seeds Python, numpy and torch by *global* rank, so GPU k of every node draws differently."""
    s = derive_seed(seed, "global", global_rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def numpy_rng_state() -> dict:
    """numpy's global generator state as a tensor and plain values, which the safe loader reads
    (``np.random.get_state()`` holds an ndarray, which it would refuse)."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state()
    return {"algorithm": algorithm, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def set_numpy_rng_state(state: dict | tuple) -> None:
    """Restores :func:`numpy_rng_state`'s dict, or the raw tuple that checkpoints of version 0.1 hold."""
    if isinstance(state, dict):
        keys = state["keys"].numpy().astype(np.uint32)
        state = (state["algorithm"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])
    np.random.set_state(state)


class ProcessRNG:
    """The process-wide generators (Python, numpy, torch CPU and CUDA) as a checkpointable object."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": numpy_rng_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        set_numpy_rng_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
