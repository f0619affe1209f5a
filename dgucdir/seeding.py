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


class ProcessRNG:
    """The process-wide generators (Python, numpy, torch CPU and CUDA) as a checkpointable object."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
