"""ShardedQueue: per-domain FIFO queues of negative keys, sharded across ranks, exact InfoNCE.

Each rank keeps only the keys it produced: K/W entries per domain instead of K, and no
all-gather of keys on enqueue. The union of the shards holds exactly the keys an unsharded
queue of K would hold, and the InfoNCE softmax over them stays exact.

Communication per training step, whatever the number of loss terms (:func:`infonce_terms`):
the queries of every term are all-gathered once (with autograd), as are their sample ids and
domains; each rank sums exp(logit - 1/T) of every gathered query over its own shard, and one
reduce-scatter gives each rank the totals of its own queries. The shift 1/T is the largest logit
possible (queries and keys are unit vectors), so no per-row maximum has to be agreed first and
no exponent overflows; the terms that share a query set and a queue (the two terms of each query
modality, by default) share one sum. A second reduce-scatter (max) gives the accuracy. So 4
collectives forward and 2 backward, where a per-term, per-rank log-sum-exp needs 28 at W ranks,
and their bytes grow as W, not W squared. Loss and gradients equal the unsharded computation.

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

    def negative_sums(self, q_all: torch.Tensor, dom_all: torch.Tensor, ids_all: torch.Tensor,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For every gathered query, over this rank's shard of its domain's queue, the query's own sample
        masked: (sum of exp(logit - 1/T), differentiable; the largest logit, for the accuracy)."""
        shift = 1.0 / temperature  # the largest possible logit of unit vectors
        sums = q_all.new_zeros(q_all.shape[0])
        best = torch.full((q_all.shape[0],), MASKED_LOGIT, device=q_all.device)
        for d in range(self.n_domains):
            rows = (dom_all == d).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            # a copy: the enqueue after this step writes the shard in place before backward runs
            logits = q_all[rows] @ self.keys[d].float().clone().T / temperature
            logits = logits.masked_fill(ids_all[rows, None] == self.ids[d][None, :], MASKED_LOGIT)
            sums = sums.index_put((rows,), torch.exp(logits - shift).sum(1))
            best[rows] = logits.detach().max(dim=1).values
        return sums, best

    def infonce(self, q: torch.Tensor, k_pos: torch.Tensor, domain: torch.Tensor, ids: torch.Tensor,
                temperature: float) -> ContrastiveResult:
        """Mean InfoNCE of this rank's queries over [positive, all K negatives of their domain] (one term)."""
        return infonce_terms({"term": (q, k_pos, self)}, domain, ids, temperature)["term"]

    def state_dict(self) -> dict:
        return {"keys": self.keys.cpu(), "ids": self.ids.cpu(), "ptr": self.ptr.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["keys"].shape != self.keys.shape:
            raise ValueError(f"queue shard shape {tuple(state['keys'].shape)} does not match {tuple(self.keys.shape)} "
                             "(a different world size or queue size than the checkpoint's)")
        self.keys.copy_(state["keys"])
        self.ids.copy_(state["ids"])
        self.ptr.copy_(state["ptr"])


@torch.autocast("cuda", enabled=False)
@torch.autocast("cpu", enabled=False)
def infonce_terms(terms: dict[str, tuple[torch.Tensor, torch.Tensor, ShardedQueue]], domain: torch.Tensor,
                  ids: torch.Tensor, temperature: float) -> dict[str, ContrastiveResult]:
    """InfoNCE of every term (name -> (queries, positive keys, queue)) of this rank's batch, with the
    communication of one: see the module docstring.

    Negatives with the query's own sample id are masked out. ``domain`` selects each query's queue
    (all zeros for a shared queue). Always fp32, also under bf16 autocast: logits divided by a
    temperature of 0.2 and sums over thousands of negatives need the mantissa.
    """
    queries: dict[int, torch.Tensor] = {}  # the distinct query tensors (by identity), gathered together
    pairs: dict[tuple[int, int], tuple[int, ShardedQueue]] = {}  # (query set, queue) -> (query set's slot, queue)
    for q, _, queue in terms.values():
        queries.setdefault(id(q), q)
        pairs.setdefault((id(q), id(queue)), (list(queries).index(id(q)), queue))
    dim = next(iter(queries.values())).shape[1]
    meta_all = dist.all_gather(torch.stack([domain.long(), ids.long()], 1))
    q_all = dist.all_gather_with_grad(torch.cat([q.float() for q in queries.values()], 1))  # (W*n, sets*dim)
    sums, best = zip(*(queue.negative_sums(q_all[:, slot * dim:(slot + 1) * dim], meta_all[:, 0], meta_all[:, 1],
                                           temperature) for slot, queue in pairs.values()))
    own_sums = dist.reduce_scatter_with_grad(torch.stack(sums, 1))  # (n, pairs): this rank's queries, every shard
    own_best = dist.reduce_scatter(torch.stack(best, 1), op="max")
    column = {key: j for j, key in enumerate(pairs)}
    shift = 1.0 / temperature
    out = {}
    for name, (q, k_pos, queue) in terms.items():
        j = column[id(q), id(queue)]
        l_pos = (q.float() * k_pos.float().detach()).sum(1) / temperature
        lse = torch.log(torch.exp(l_pos - shift) + own_sums[:, j]) + shift
        out[name] = ContrastiveResult((lse - l_pos).mean(), (l_pos.detach() > own_best[:, j]).float().mean())
    return out
