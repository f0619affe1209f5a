"""Distributed spherical k-means: planted clusters, 2 ranks == 1 rank, no rank holds all features."""

import torch
import torch.nn.functional as F

from distributed import run_distributed


def _planted(n_per=40, k=5, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, d, generator=g), dim=1)
    x = centers.repeat_interleave(n_per, 0) + 0.15 * torch.randn(k * n_per, d, generator=g)
    perm = torch.randperm(k * n_per, generator=g)
    return F.normalize(x[perm], dim=1), torch.arange(k).repeat_interleave(n_per)[perm]


def test_recovers_planted_clusters():
    from dgucdir.cluster import spherical_kmeans

    x, truth = _planted()
    res = spherical_kmeans(x, 5, niter=20, nredo=3, seed=1)
    for c in range(5):
        members = truth[res.assignments == c]
        assert len(members) == 40 and (members == members[0]).all()
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(5))
    assert abs(res.objective - float((1 - (x * res.centroids[res.assignments]).sum(1)).sum())) < 1e-3


def _two_rank_kmeans(x):
    from dgucdir import cluster, dist

    sizes = []
    real_gather = dist.all_gather

    def spy(t):
        sizes.append(t.numel())
        return real_gather(t)

    cluster.dist.all_gather = spy  # record what crosses ranks
    half = x.shape[0] // 2 + 3  # uneven shards
    local = x[:half] if dist.rank() == 0 else x[half:]
    res = cluster.spherical_kmeans(local, 4, niter=10, nredo=2, seed=7)
    return res.centroids, res.assignments, res.objective, max(sizes), local.numel()


def test_two_ranks_equal_one_rank_and_never_gather_features():
    from dgucdir.cluster import spherical_kmeans

    x, _ = _planted(n_per=30, k=6, seed=3)  # 6 true groups, 4 clusters: not trivially separable
    one = spherical_kmeans(x, 4, niter=10, nredo=2, seed=7)
    (c0, a0, o0, g0, n0), (c1, a1, o1, g1, n1) = run_distributed(_two_rank_kmeans, 2, x)
    torch.testing.assert_close(c0, one.centroids, rtol=0, atol=1e-6)
    torch.testing.assert_close(c1, one.centroids, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([a0, a1]), one.assignments)
    assert abs(o0 - one.objective) < 1e-6 and o0 == o1
    assert max(g0, g1) <= 4  # only scalars (counts, weight sums, minima) are all-gathered
    assert n0 < x.numel() and n1 < x.numel()


def test_empty_cluster_is_reseeded_from_the_farthest_point():
    from dgucdir.cluster import _lloyd

    x = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0]]), dim=1)
    start = F.normalize(torch.tensor([[1.0, 0.0], [0.7, 0.7], [-1.0, 0.0]]), dim=1)
    out = _lloyd(x, start, niter=1)
    # centroid 2 (pointing away from all data) gets no point; it is re-seeded with the point
    # least similar to its centroid: [0, 1] (cos 0.707 to centroid 1)
    torch.testing.assert_close(out[2], x[3])
