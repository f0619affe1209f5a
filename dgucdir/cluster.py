"""Distributed k-means in torch: every rank clusters its own shard of features.

Two variants: :func:`euclidean_kmeans`, the original's (faiss ``Clustering`` with ``IndexFlatL2``:
random initialisation, the best of ``nredo`` runs, training on a random subset of
``max_points_per_centroid`` points per centroid, empty clusters split from a large one,
assignment to the nearest unnormalised centroid), and :func:`spherical_kmeans` (k-means++,
cosine assignment, normalised centroids), kept as ``loss.kmeans=spherical``.

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
    centroids: torch.Tensor  # (k, d), L2-normalised (what the cluster loss compares with)
    assignments: torch.Tensor  # (n_local,) cluster id of each local feature
    objective: float  # spherical: sum of (1 - cos); euclidean: sum of squared distances (its training set)


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


SPLIT_EPS = 1 / 1024  # faiss's relative perturbation when a cluster is split to fill an empty one


def _squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)).clamp_min(0)


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each empty cluster takes a copy of a cluster drawn with probability ~ (size - 1), the two nudged
    apart by ±1/1024 in alternating dimensions, and half its points (as faiss's ``split_clusters``).
    ``counts`` are global (all-reduced), ``gen`` shared: every rank makes the same choice."""
    centroids, counts = centroids.clone(), counts.clone()
    sign = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1
    for empty in (counts == 0).nonzero().flatten().tolist():
        weights = (counts - 1).clamp_min(0)
        if weights.sum() <= 0:
            break
        donor = int(torch.multinomial(weights.cpu().double(), 1, generator=gen))
        centroids[empty] = centroids[donor] * (1 + SPLIT_EPS * sign)
        centroids[donor] = centroids[donor] * (1 - SPLIT_EPS * sign)
        counts[empty] = counts[donor] // 2
        counts[donor] -= counts[empty]
    return centroids


def lloyd_l2(x: torch.Tensor, centroids: torch.Tensor, niter: int, gen: torch.Generator) -> torch.Tensor:
    """``niter`` Lloyd iterations in Euclidean distance over every rank's ``x``: assign each point to its
    nearest centroid, move each centroid to the mean of its points (empty ones: :func:`_split_empty`)."""
    k, d = centroids.shape
    for _ in range(niter):
        assign = _squared_distances(x, centroids).argmin(1)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device).index_add_(0, assign, x.double())
        counts = torch.bincount(assign, minlength=k).double()
        dist.all_reduce_sum(sums)
        dist.all_reduce_sum(counts)
        means = (sums / counts.clamp_min(1)[:, None]).float()
        means[counts == 0] = centroids[counts == 0]
        centroids = _split_empty(means, counts, gen) if (counts == 0).any() else means
    return centroids


def _rows_at(x: torch.Tensor, positions: torch.Tensor, offset: int) -> torch.Tensor:
    """Rows at global ``positions`` of the concatenation of all ranks' ``x`` (in rank order), on every rank."""
    out = torch.zeros(len(positions), x.shape[1], dtype=torch.float64, device=x.device)
    mine = (positions >= offset) & (positions < offset + x.shape[0])
    out[mine] = x[(positions[mine] - offset).to(x.device)].double()
    return dist.all_reduce_sum(out).float()


def euclidean_kmeans(x: torch.Tensor, k: int, niter: int = 20, nredo: int = 5, seed: int = 0,
                     max_points_per_centroid: int = 2000) -> KMeansResult:
    """The original's clustering of the L2-normalised local features ``x`` (n_local, d), jointly with all ranks.

    As faiss trains it: when there are more than ``k * max_points_per_centroid`` points, a random
    subset of that many; ``nredo`` runs, each from ``k`` distinct random points, of ``niter`` Lloyd
    iterations; the run with the lowest sum of squared distances wins. Every point is then assigned
    to its nearest (unnormalised) centroid; the centroids returned are normalised for the loss.
    """
    counts = _local_counts(x.shape[0], x.device)
    n_total, offset = sum(counts), sum(counts[: dist.rank()])
    if n_total < k:
        raise ValueError(f"k-means: {n_total} points for {k} clusters")
    x = F.normalize(x.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    train = x
    if n_total > k * max_points_per_centroid:
        chosen = torch.randperm(n_total, generator=gen)[: k * max_points_per_centroid].sort().values
        mine = chosen[(chosen >= offset) & (chosen < offset + x.shape[0])] - offset
        train = x[mine.to(x.device)]
    train_counts = _local_counts(train.shape[0], x.device)
    train_offset = sum(train_counts[: dist.rank()])
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(nredo):
        start = _rows_at(train, torch.randperm(sum(train_counts), generator=gen)[:k], train_offset)
        centroids = lloyd_l2(train, start, niter, gen)
        objective = float(dist.all_reduce_sum(_squared_distances(train, centroids).min(1).values.double().sum()
                                              .reshape(1)))
        if best is None or objective < best[0]:
            best = (objective, centroids)
    assert best is not None
    objective, centroids = best
    return KMeansResult(F.normalize(centroids, dim=1), _squared_distances(x, centroids).argmin(1), objective)


def run_kmeans(kind: str, x: torch.Tensor, k: int, niter: int, nredo: int, seed: int,
               max_points_per_centroid: int) -> KMeansResult:
    """``loss.kmeans``: 'euclidean' (the original's faiss k-means) or 'spherical'."""
    if kind == "euclidean":
        return euclidean_kmeans(x, k, niter, nredo, seed, max_points_per_centroid)
    return spherical_kmeans(x, k, niter, nredo, seed)


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
