"""Distributed spherical k-means in torch: every rank clusters its own shard of features.

Only centroid sums, counts, scalar objectives and the occasional chosen point cross ranks
(all-reduce / broadcast); no rank ever holds all features. Every random draw comes from a
generator seeded identically on all ranks, and the owner of a drawn point is found from the
all-gathered per-rank weight sums, so W ranks make the same choices as one rank holding the
concatenation of the shards in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dist


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d), L2-normalised
    assignments: torch.Tensor  # (n_local,) cluster id of each local feature
    objective: float  # sum over all ranks' points of (1 - cosine to their centroid); lower is better


def _local_counts(n_local: int, device: torch.device) -> list[int]:
    return dist.all_gather(torch.tensor([n_local], device=device)).tolist()


def _broadcast_point(x: torch.Tensor, owner: int, local_index: int) -> torch.Tensor:
    point = x[local_index].clone() if dist.rank() == owner else torch.empty_like(x[0])
    return dist.broadcast(point, owner)


def _draw(x: torch.Tensor, weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draws one point with probability proportional to ``weights`` across all ranks."""
    sums = dist.all_gather(weights.sum().reshape(1)).cpu()
    total = float(sums.sum())
    if total <= 0:  # all points coincide with centroids: fall back to uniform
        weights = torch.ones_like(weights)
        sums = dist.all_gather(weights.sum().reshape(1)).cpu()
        total = float(sums.sum())
    u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
    cum = sums.cumsum(0)
    owner = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64), right=True)), len(sums) - 1)
    while float(sums[owner]) == 0:  # u landed at the end of an empty rank's range
        owner -= 1
    u_local = u - (float(cum[owner - 1]) if owner > 0 else 0.0)
    local_cum = weights.cumsum(0)
    index = min(int(torch.searchsorted(local_cum, torch.tensor([u_local], dtype=torch.float64, device=x.device),
                                       right=True)), len(weights) - 1) if dist.rank() == owner else 0
    return _broadcast_point(x, owner, index)


def kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with the spherical distance 1 - cos (half the squared chord)."""
    centroids = [_draw(x, torch.ones(x.shape[0], dtype=torch.float64, device=x.device), gen)]
    best = (x @ centroids[0]).double()
    for _ in range(1, k):
        centroids.append(_draw(x, (1 - best).clamp_min(0), gen))
        best = torch.maximum(best, (x @ centroids[-1]).double())
    return torch.stack(centroids)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sims = x @ centroids.T
    best, assign = sims.max(dim=1)
    return assign, best


def _farthest_point(x: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The globally least-similar point (ties: lowest rank, then lowest index)."""
    local_min, local_idx = (best.min(0) if best.numel() else (torch.tensor(float("inf"), device=x.device), torch.tensor(0)))
    mins = dist.all_gather(local_min.reshape(1).float())
    owner = int(torch.argmin(mins))
    return _broadcast_point(x, owner, int(local_idx)), owner, int(local_idx)


def _lloyd(x: torch.Tensor, centroids: torch.Tensor, niter: int) -> torch.Tensor:
    k, d = centroids.shape
    for _ in range(niter):
        assign, best = _assign(x, centroids)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, assign, x.double())
        counts = torch.bincount(assign, minlength=k).double()
        dist.all_reduce_sum(sums)
        dist.all_reduce_sum(counts)
        new = F.normalize(sums, dim=1).float()
        best = best.clone()
        for c in (counts == 0).nonzero().flatten().tolist():  # re-seed empty clusters
            point, owner, idx = _farthest_point(x, best)
            new[c] = point
            if dist.rank() == owner:
                best[idx] = float("inf")
        centroids = new
    return centroids


def spherical_kmeans(x: torch.Tensor, k: int, niter: int = 20, nredo: int = 5, seed: int = 0) -> KMeansResult:
    """Clusters L2-normalised local features ``x`` (n_local, d) jointly with all ranks' features."""
    n_total = sum(_local_counts(x.shape[0], x.device))
    if n_total < k:
        raise ValueError(f"k-means: {n_total} points for {k} clusters")
    x = F.normalize(x.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    best_result: KMeansResult | None = None
    for _ in range(nredo):
        centroids = _lloyd(x, kmeans_plus_plus(x, k, gen), niter)
        assign, sim = _assign(x, centroids)
        objective = float(dist.all_reduce_sum((1 - sim).double().sum().reshape(1)))
        if best_result is None or objective < best_result.objective:
            best_result = KMeansResult(centroids, assign, objective)
    assert best_result is not None
    return best_result


# --------------------------------------------------------------------------- training-time state
@dataclass
class ClusterTargets:
    """Centroids (k, feature_dim) and each batch sample's cluster id (B,): what the cluster loss needs."""

    centroids: torch.Tensor
    assignments: torch.Tensor


@dataclass
class ClusterState:
    """Centroids of the training features and each training sample's cluster, one table per domain."""

    centroids: torch.Tensor
    tables: list[torch.Tensor]  # tables[d][i]: cluster of sample i of training domain d

    @classmethod
    def from_local(cls, result: KMeansResult, domain: torch.Tensor, index: torch.Tensor,
                   domain_sizes: list[int]) -> "ClusterState":
        """Gathers every rank's (domain, index, cluster) rows into full per-domain tables on every rank."""
        rows = dist.gather_variable(torch.stack([domain, index, result.assignments], 1))
        tables = []
        for d, size in enumerate(domain_sizes):
            mine = rows[rows[:, 0] == d]
            table = torch.full((size,), -1, dtype=torch.long, device=result.centroids.device)
            table[mine[:, 1]] = mine[:, 2]
            tables.append(table)
        return cls(result.centroids, tables)

    def targets(self, domain: torch.Tensor, index: torch.Tensor) -> ClusterTargets:
        ids = torch.empty_like(index)
        for d, table in enumerate(self.tables):
            sel = domain == d
            ids[sel] = table[index[sel]]
        return ClusterTargets(self.centroids, ids)


class ClusterSlot:
    """Holds the current :class:`ClusterState` (None before the first clustering); checkpointable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state: ClusterState | None = None

    def state_dict(self) -> dict:
        if self.state is None:
            return {}
        return {"centroids": self.state.centroids.cpu(), "tables": [t.cpu() for t in self.state.tables]}

    def load_state_dict(self, state: dict) -> None:
        self.state = None if not state else ClusterState(
            state["centroids"].to(self.device), [t.to(self.device) for t in state["tables"]])
