"""ShardedQueue: 2 gloo ranks against a single-process, unsharded reference written here."""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed

DIM, K, B_PER_DOMAIN, N_DOM, WORLD, T = 16, 24, 3, 2, 2, 0.2


def _data(step: int, world: int = WORLD):
    """Global keys/queries of one step: (world, n_dom * B_PER_DOMAIN, ...) tensors, seeded."""
    g = torch.Generator().manual_seed(100 + step)
    n = N_DOM * B_PER_DOMAIN
    keys = F.normalize(torch.randn(world, n, DIM, generator=g), dim=2)
    queries = F.normalize(torch.randn(world, n, DIM, generator=g), dim=2)
    domain = torch.arange(N_DOM).repeat_interleave(B_PER_DOMAIN).repeat(world, 1)
    # indices cycle through a small range so that the query's own sample recurs in the queue
    index = (torch.arange(world * n).view(world, n) + 5 * step) % 9
    return keys, queries, domain, index


def reference(steps: int, world: int = WORLD):
    """Unsharded: one queue of K per domain, every rank's keys enqueued in rank order; per-rank
    losses with their gradients with respect to each rank's queries."""
    from dgucdir.model.queue import sample_ids

    queue = {d: [] for d in range(N_DOM)}  # list of (key, id), oldest first, at most K
    results = []
    for step in range(steps):
        keys, queries, domain, index = _data(step, world)
        q = queries.clone().requires_grad_()
        total = 0
        losses = []
        for r in range(world):
            rank_losses = []
            for i in range(q.shape[1]):
                d = int(domain[r, i])
                sid = int(sample_ids(domain[r, i : i + 1], index[r, i : i + 1]))
                neg = [k for k, kid in queue[d] if kid != sid]
                logits = [q[r, i] @ keys[r, i] / T] + [q[r, i] @ k / T for k in neg]
                rank_losses.append(-F.log_softmax(torch.stack(logits), 0)[0])
            losses.append(torch.stack(rank_losses).mean())
            total = total + losses[-1]
        total.backward()
        results.append(([float(x.detach()) for x in losses], q.grad.clone()))
        for r in range(world):
            for i in range(keys.shape[1]):
                d = int(domain[r, i])
                queue[d].append((keys[r, i], int(sample_ids(domain[r, i : i + 1], index[r, i : i + 1]))))
                queue[d] = queue[d][-K:]
    return results


def sharded(steps: int, world: int = WORLD):
    from dgucdir import dist
    from dgucdir.model.queue import ShardedQueue, sample_ids

    r = dist.rank()
    queue = ShardedQueue(N_DOM, K, DIM, B_PER_DOMAIN, torch.device("cpu"))
    out = []
    for step in range(steps):
        keys, queries, domain, index = _data(step, world)
        q = queries[r].clone().requires_grad_()
        ids = sample_ids(domain[r], index[r])
        res = queue.infonce(q, keys[r], domain[r], ids, T)
        res.loss.backward()
        out.append((float(res.loss), q.grad.clone(), int(queue.ptr[0])))
        queue.enqueue(keys[r], ids, domain[r])
    return out, queue.memory_bytes()


@pytest.mark.parametrize("world", [WORLD, 4])
def test_sharded_loss_and_gradients_equal_unsharded_reference(world):
    # Start both after the queue is full (K / (world * B_PER_DOMAIN) steps), so that the
    # initial content does not matter, and run through wrap-arounds of the pointer.
    steps = 14
    ref = reference(steps, world)
    got = run_distributed(sharded, world, steps, world)
    warm = K // (world * B_PER_DOMAIN)
    for step in range(warm, steps):
        for r in range(world):
            loss, grad, _ = got[r][0][step]
            assert abs(loss - ref[step][0][r]) <= 1e-5 * abs(ref[step][0][r])
            torch.testing.assert_close(grad, ref[step][1][r], rtol=1e-5, atol=1e-7)
    if world == WORLD:
        ptrs = [p for _, _, p in got[0][0]]
        assert ptrs[:5] == [0, 3, 6, 9, 0]  # per-rank shard of K/W = 12, wrapping every 4 steps
        # queue memory: keys (2 domains x 12 x 16 fp32) + ids (2 x 12 int64) per rank
        assert got[0][1] == 2 * 12 * 16 * 4 + 2 * 12 * 8


def test_own_sample_is_masked():
    from dgucdir.model.queue import ShardedQueue, sample_ids

    queue = ShardedQueue(1, 4, 2, 2, torch.device("cpu"))
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = sample_ids(torch.zeros(2, dtype=torch.long), torch.tensor([7, 8]))
    queue.enqueue(k, ids, torch.zeros(2, dtype=torch.long))
    queue.enqueue(-k, sample_ids(torch.zeros(2, dtype=torch.long), torch.tensor([1, 2])), torch.zeros(2, dtype=torch.long))
    q = torch.tensor([[1.0, 0.0]])
    res = queue.infonce(q, q, torch.zeros(1, dtype=torch.long), ids[:1], 1.0)
    # negatives: [0,1] (id 8), [-1,0], [0,-1]; the copy of itself (id 7) is masked
    expected = -torch.log(torch.exp(torch.tensor(1.0)) / (torch.exp(torch.tensor(1.0)) + 1 + torch.exp(torch.tensor(-1.0)) + 1))
    assert abs(float(res.loss) - float(expected)) < 1e-6
    assert float(res.accuracy) == 1.0
