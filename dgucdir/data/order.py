"""Which samples a rank reads in an epoch: a fresh global shuffle, split across ranks.

The original trains with ``DistributedSampler(shuffle=True)`` and ``set_epoch``: every epoch, one
permutation of each dataset seeded by the epoch, padded to a multiple of the world size with its
own first items, and rank ``r`` takes every ``W``-th item from ``r``. :func:`rank_share` is that,
per training domain, as a function of (seed, domain, epoch) only, which is what keeps resume exact
and makes every rank agree without talking. Nothing depends on how the data was packed: samples
are read by their index through the shard offsets of ``samples.tsv``.
"""

from __future__ import annotations

import math

import torch

from ..seeding import derive_seed


def rank_share(count: int, epoch: int, seed: int, domain: str, rank: int, world: int) -> torch.Tensor:
    """This rank's sample indices of one domain for ``epoch``, in reading order (``ceil(count / world)`` of them)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "order", domain, epoch))
    perm = torch.randperm(count, generator=generator)
    total = math.ceil(count / world) * world
    padded = perm.repeat(math.ceil(total / count))[:total]  # as DistributedSampler pads: its own first items
    return padded[rank:total:world]


def cycled(share: torch.Tensor, length: int) -> torch.Tensor:
    """``share`` repeated to ``length``: a smaller domain wraps around within the epoch, as in the original."""
    return share.repeat(math.ceil(length / len(share)))[:length]
