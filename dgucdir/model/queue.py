"""ShardedQueue: per-domain FIFO queues of negative keys, sharded across ranks, exact InfoNCE.

Each rank keeps only the keys it produced: K/W entries per domain instead of K, and no
all-gather of keys on enqueue. The union of the shards holds exactly the keys an unsharded
queue of K would hold, and the InfoNCE softmax over them stays exact: queries are
all-gathered (with autograd), each rank computes the log-sum-exp of every query's logits
against its own shard, and the per-rank log-sum-exps are combined for each query on its
owner rank. Loss and gradients equal the unsharded computation.

The queue is plain tensors, deliberately not module buffers: DDP would otherwise broadcast
rank 0's shard over every other rank's at each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import dist

MASKED_LOGIT = -1e9  # exp() of it is exactly 0 in fp32; finite so an all-masked shard gives no NaN


def sample_ids(domain: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One int64 id per (domain, index within domain): what 'the query's own sample' means."""
    return (domain.long() << 40) | index.long()


@dataclass
class ContrastiveResult:
    loss: torch.Tensor
    accuracy: torch.Tensor  # fraction of queries whose positive beats every negative


class ShardedQueue:
    """FIFO of keys per domain (or one shared FIFO), this rank's K/W share of it."""

    def __init__(self, n_domains: int, size: int, dim: int, rank_batch_per_domain: int, device: torch.device,
                 seed: int = 0) -> None:
        world = dist.world_size()
        # validate_runtime() tells the user; this guards the FIFO arithmetic of enqueue()
        assert size % (world * rank_batch_per_domain) == 0, (size, world, rank_batch_per_domain)
        self.shard_size = size // world
        gen = torch.Generator().manual_seed(seed * 1000 + dist.rank())
        self.keys = F.normalize(torch.randn(n_domains, self.shard_size, dim, generator=gen), dim=2).to(device)
        self.ids = torch.full((n_domains, self.shard_size), -1, dtype=torch.long, device=device)
        self.ptr = torch.zeros(n_domains, dtype=torch.long)

    @property
    def n_domains(self) -> int:
        return self.keys.shape[0]

    def memory_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.ids.numel() * self.ids.element_size()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor, domain: torch.Tensor) -> None:
        """Writes this rank's keys into its own shard, per domain, oldest entries first out."""
        for d in range(self.n_domains):
            sel = domain == d
            n = int(sel.sum())
            if n == 0:
                continue
            p = int(self.ptr[d])
            self.keys[d, p : p + n] = keys[sel].to(self.keys.dtype)
            self.ids[d, p : p + n] = ids[sel]
            self.ptr[d] = (p + n) % self.shard_size

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def infonce(self, q: torch.Tensor, k_pos: torch.Tensor, domain: torch.Tensor, ids: torch.Tensor,
                temperature: float) -> ContrastiveResult:
        """Mean InfoNCE of this rank's queries over [positive, all K negatives of their domain].

        Negatives with the query's own sample id are masked out. ``domain`` selects the queue
        (all zeros for a shared queue). Always fp32, also under bf16 autocast: logits divided by a
        temperature of 0.2 and a log-sum-exp over thousands of negatives need the mantissa.
        """
        q = q.float()
        l_pos = (q * k_pos.float().detach()).sum(1) / temperature
        q_all = dist.all_gather_with_grad(q)
        dom_all = dist.all_gather(domain)
        ids_all = dist.all_gather(ids)
        lse_local = torch.full((q_all.shape[0],), MASKED_LOGIT, device=q.device)
        max_local = torch.full((q_all.shape[0],), MASKED_LOGIT, device=q.device)
        for d in range(self.n_domains):
            rows = (dom_all == d).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            # a copy: the enqueue after this step writes the shard in place before backward runs
            logits = q_all[rows] @ self.keys[d].float().clone().T / temperature
            logits = logits.masked_fill(ids_all[rows, None] == self.ids[d][None, :], MASKED_LOGIT)
            lse_local = lse_local.index_put((rows,), torch.logsumexp(logits, dim=1))
            max_local[rows] = logits.detach().max(dim=1).values
        n, r = q.shape[0], dist.rank()
        lse_ranks = dist.all_gather_with_grad(lse_local[None])[:, r * n : (r + 1) * n]  # (W, n)
        max_neg = dist.all_gather(max_local[None])[:, r * n : (r + 1) * n].max(dim=0).values
        lse = torch.logsumexp(torch.cat([l_pos[None], lse_ranks]), dim=0)
        return ContrastiveResult((lse - l_pos).mean(), (l_pos.detach() > max_neg).float().mean())

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["keys"].shape != self.keys.shape:
            raise ValueError(f"queue shard shape {tuple(state['keys'].shape)} does not match {tuple(self.keys.shape)} "
                             "(a different world size or queue size than the checkpoint's)")
        self.keys.copy_(state["keys"])
        self.ids.copy_(state["ids"])
        self.ptr.copy_(state["ptr"])
