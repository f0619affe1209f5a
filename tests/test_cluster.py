"""Distributed k-means (euclidean as the original, spherical): planted clusters, 2 ranks == 1 rank, by-hand Lloyd."""

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


def naive_lloyd(x: list[list[float]], centroids: list[list[float]], niter: int) -> list[list[float]]:
    """Lloyd's algorithm written out by hand: nearest centroid by squared distance, then the means."""
    for _ in range(niter):
        groups: list[list[list[float]]] = [[] for _ in centroids]
        for p in x:
            dists = [sum((a - b) ** 2 for a, b in zip(p, c)) for c in centroids]
            groups[dists.index(min(dists))].append(p)
        centroids = [[sum(col) / len(g) for col in zip(*g)] if g else c for g, c in zip(groups, centroids)]
    return centroids


def test_euclidean_lloyd_equals_a_hand_written_lloyd_from_fixed_centroids():
    from dgucdir.cluster import lloyd_l2

    x, truth = _planted(n_per=15, k=4, d=6, seed=5)
    start = torch.stack([x[truth == c][0] + 0.3 for c in range(4)])  # fixed initial centroids, off the data
    got = lloyd_l2(x, start, niter=6, gen=torch.Generator().manual_seed(0))
    want = torch.tensor(naive_lloyd(x.tolist(), start.tolist(), 6))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got.norm(dim=1), torch.ones(4))  # unnormalised means, as faiss keeps them


def test_euclidean_kmeans_assigns_to_the_nearest_unnormalised_centroid_and_splits_empty_clusters():
    from dgucdir.cluster import _split_empty, euclidean_kmeans

    x, truth = _planted(n_per=40, k=5, d=16, seed=2)
    res = euclidean_kmeans(x, 5, niter=20, nredo=4, seed=1)
    for c in range(5):
        members = truth[res.assignments == c]
        assert len(members) == 40 and (members == members[0]).all()
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(5))  # normalised for the loss
    means = torch.stack([x[res.assignments == c].mean(0) for c in range(5)])
    assert abs(res.objective - float(((x - means[res.assignments]) ** 2).sum())) < 1e-3
    centroids = torch.tensor([[1.0, 2.0], [5.0, 5.0], [9.0, 9.0]])
    split = _split_empty(centroids, torch.tensor([7.0, 0.0, 1.0]), torch.Generator().manual_seed(0))
    # cluster 2 has one point: weight 0, so the donor is cluster 0, nudged apart by 1/1024 per dimension
    torch.testing.assert_close(split[1], torch.tensor([1 + 1 / 1024, 2 * (1 - 1 / 1024)]))
    torch.testing.assert_close(split[0], torch.tensor([1 - 1 / 1024, 2 * (1 + 1 / 1024)]))


def test_euclidean_kmeans_subsamples_to_max_points_per_centroid():
    from dgucdir.cluster import euclidean_kmeans

    x, truth = _planted(n_per=50, k=3, d=8, seed=4)
    small = euclidean_kmeans(x, 3, niter=10, nredo=1, seed=0, max_points_per_centroid=10)
    full = euclidean_kmeans(x, 3, niter=10, nredo=1, seed=0)
    assert len(small.assignments) == 150  # every point is assigned, not only the 30 trained on
    assert small.objective < 0.3 * full.objective  # the objective is over the 30-point subset


def _two_rank_euclidean(x):
    from dgucdir import cluster, dist

    half = x.shape[0] // 2 + 5
    local = x[:half] if dist.rank() == 0 else x[half:]
    res = cluster.euclidean_kmeans(local, 4, niter=8, nredo=3, seed=11, max_points_per_centroid=40)
    return res.centroids, res.assignments, res.objective


def test_euclidean_kmeans_on_two_ranks_equals_one_rank():
    from dgucdir.cluster import euclidean_kmeans

    x, _ = _planted(n_per=40, k=6, seed=8)  # 240 points > 4 * 40: the subsample crosses both shards
    one = euclidean_kmeans(x, 4, niter=8, nredo=3, seed=11, max_points_per_centroid=40)
    (c0, a0, o0), (c1, a1, o1) = run_distributed(_two_rank_euclidean, 2, x)
    torch.testing.assert_close(c0, one.centroids, rtol=0, atol=1e-5)
    torch.testing.assert_close(c1, one.centroids, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([a0, a1]), one.assignments)
    assert abs(o0 - one.objective) < 1e-4 and o0 == o1
