"""Retrieval metrics against a naive implementation (full matrix, argsort, loop per query)."""

import numpy as np
import pytest
import torch

from dgucdir.retrieval import EvalReport, PairMetrics, retrieval_metrics


def naive(qf, ql, gf, gl, topk, map_k):
    """How the original computes it: full cosine matrix, full argsort, one query at a time.
    Ties are broken towards the lower gallery index (stable sort of -similarity)."""
    qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    sim = np.round(qf @ gf.T, 9)  # exact ties stay ties despite float64 rounding
    hits = {k: 0 for k in topk}
    denom = {k: 0 for k in topk}
    aps, aps_k = [], []
    for i in range(len(qf)):
        n_rel = int((gl == ql[i]).sum())
        if n_rel == 0:
            continue
        order = np.argsort(-sim[i], kind="stable")
        rel = gl[order] == ql[i]
        for k in topk:
            kk = min(k, n_rel)
            hits[k] += rel[:kk].sum()
            denom[k] += kk
        precisions = [rel[: j + 1].sum() / (j + 1) for j in range(len(rel)) if rel[j]]
        aps.append(np.mean(precisions))
        aps_k.append(sum(rel[: j + 1].sum() / (j + 1) for j in range(min(map_k, len(rel))) if rel[j]) / min(map_k, n_rel))
    return {k: hits[k] / denom[k] for k in topk}, float(np.mean(aps)), float(np.mean(aps_k))


def _compare(qf, ql, gf, gl, topk=(1, 5, 15), map_k=20, chunk=7):
    p, m_all, m_k, n = retrieval_metrics(torch.tensor(qf, dtype=torch.float32), torch.tensor(ql),
                                         torch.tensor(gf, dtype=torch.float32), torch.tensor(gl), list(topk), map_k, chunk)
    rp, rm_all, rm_k = naive(qf.astype(np.float32).astype(np.float64), ql, gf.astype(np.float32).astype(np.float64), gl,
                             topk, map_k)
    for k in topk:
        assert p[k] == pytest.approx(rp[k], abs=1e-9)
    assert m_all == pytest.approx(rm_all, abs=1e-6)
    assert m_k == pytest.approx(rm_k, abs=1e-6)
    return n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_features_few_classes(seed):
    rng = np.random.default_rng(seed)
    qf, gf = rng.normal(size=(53, 8)), rng.normal(size=(71, 8))
    ql, gl = rng.integers(0, 4, 53), rng.integers(0, 4, 71)
    gf[gl == 1] += 1.5  # some structure
    qf[ql == 1] += 1.5
    assert _compare(qf, ql, gf, gl) == 53


def test_ties_go_to_the_lower_gallery_index():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, 4))
    gf = np.repeat(base, 5, axis=0)  # every gallery vector appears 5 times, with mixed labels
    gl = rng.integers(0, 3, len(gf))
    qf = base[rng.integers(0, 6, 20)]
    ql = rng.integers(0, 3, 20)
    _compare(qf, ql, gf, gl, topk=(1, 2, 3, 7))
    # quantised features: many exact ties in the similarities
    qf2 = np.round(rng.normal(size=(30, 3)))
    gf2 = np.round(rng.normal(size=(40, 3)))
    gf2[np.linalg.norm(gf2, axis=1) == 0] = 1
    qf2[np.linalg.norm(qf2, axis=1) == 0] = 1
    _compare(qf2, rng.integers(0, 3, 30), gf2, rng.integers(0, 3, 40), topk=(1, 4))


def test_hand_computed_case():
    # one query of class 0; gallery similarities 0.9 (cls 1), 0.8 (cls 0), 0.5 (cls 0), 0.1 (cls 1)
    q = torch.tensor([[1.0, 0.0]])
    angles = torch.tensor([0.9, 0.8, 0.5, 0.1]).acos()
    g = torch.stack([angles.cos(), angles.sin()], 1)
    gl = torch.tensor([1, 0, 0, 1])
    p, m_all, m_k, n = retrieval_metrics(q, torch.tensor([0]), g, gl, [1, 2, 5], map_k=2)
    # ranking: rel = [0, 1, 1, 0]; P@1 = 0/1; P@2 = 1/2; P@5 -> K' = 2 relevant: 1/2
    assert p == {1: 0.0, 2: 0.5, 5: 0.5}
    assert m_all == pytest.approx((1 / 2 + 2 / 3) / 2)  # precision at the two relevant positions
    assert m_k == pytest.approx((1 / 2) / 2)  # within the top 2: one hit at rank 2, over min(2, 2)


def test_queries_without_relevant_items_are_not_scored():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p, m_all, _, n = retrieval_metrics(q, torch.tensor([0, 5]), q, torch.tensor([0, 1]), [1], 10)
    assert n == 1 and p[1] == 1.0 and m_all == 1.0


def test_report_tables_and_means():
    rep = EvalReport(["a", "b", "c"], [1], 10)
    for i, (q, g) in enumerate([(q, g) for q in "abc" for g in "abc" if q != g]):
        rep.pairs.append(PairMetrics(q, g, {1: i / 10}, 0.5, 0.25, 10))
    assert rep.mean()["P@1"] == pytest.approx(0.25)
    md = rep.markdown()
    assert "| a | — | 0.00 | 10.00 | 5.00 |" in md
    assert "mean P@1 over 6 ordered pairs: 25.00" in md
    assert rep.flat_metrics()["b_to_c/P@1"] == pytest.approx(0.3)


def _sharded_metrics(world_args):
    """On each rank: its every-W-th query (as an eval shard), scored against the whole gallery, gathered."""
    from dgucdir import dist
    from dgucdir.retrieval import query_scores

    q, ql, g, gl, topk = world_args
    mine = torch.arange(dist.rank(), len(q), dist.world_size())
    return query_scores(q[mine], ql[mine], g, gl, topk, 7, chunk_size=5, q_index=mine).gathered().metrics(topk)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_query_sharded_metrics_equal_one_process_exactly(world):
    """Sharded by query over W gloo ranks (uneven shares, chunks of 5, ties in the gallery): the metrics are
    one process's to the last bit, on every rank."""
    from distributed import run_distributed

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(40, 8, generator=gen)
    g[10:14] = g[3]  # exact ties: broken towards the lower gallery index
    gl = torch.randint(0, 4, (40,), generator=gen)
    q = torch.cat([torch.randn(37, 8, generator=gen), g[3:4]])
    ql = torch.cat([torch.randint(0, 5, (37,), generator=gen), gl[3:4]])  # class 4: no gallery item, not scored
    topk = [1, 3, 10]
    expected = retrieval_metrics(q, ql, g, gl, topk, 7)
    results = run_distributed(_sharded_metrics, world, (q, ql, g, gl, topk))
    assert all(r == expected for r in results), (results, expected)
    assert expected[3] == int((ql < 4).sum())
