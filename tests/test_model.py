"""The DG-UCDIR module: a full step on CPU with 1 and 2 gloo ranks, momentum rule, BatchNorm modes."""

import copy

import pytest
import torch

from distributed import run_distributed

B, SIZE = 8, 64


def _model(rank_batch=B, bn="paper", bn_group=None, **loss):
    from dgucdir.config import LossConfig, ModelConfig
    from dgucdir.model.dgucdir import DGUCDIR

    torch.manual_seed(0)
    return DGUCDIR(ModelConfig(arch="resnet_narrow", momentum=0.9, bn=bn, bn_group=bn_group),
                   LossConfig(queue_size=32, **loss), 2, rank_batch, torch.device("cpu"))


def _batch(seed, n=B):
    from dgucdir.data.batches import Batch

    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, SIZE, SIZE, generator=g) for _ in range(4)]
    return Batch(*views, torch.arange(n) % 2, torch.arange(n) + 100 * seed, torch.arange(n) % 5)


def _step_checks(model, batch, clusters=None):
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    ptr_before = model.rgb_queue.ptr.clone()
    out = model(batch, clusters)
    out["loss"].backward()
    names = {"loss", "loss_phase_phase", "loss_rgb_rgb", "loss_phase_rgb", "loss_rgb_phase"}
    assert names <= set(out) and all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder_q.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    m = model.model_cfg.momentum
    for kb, qb, k in zip(k_before, q_before, model.encoder_k.parameters()):
        torch.testing.assert_close(k, m * kb + (1 - m) * qb, rtol=0, atol=1e-6)
    assert (model.rgb_queue.ptr - ptr_before).remainder(model.rgb_queue.shard_size).tolist() == [B // 2, B // 2]
    return out


def test_one_rank_step_losses_grads_momentum_and_queue():
    from dgucdir.cluster import ClusterTargets

    model = _model()
    out = _step_checks(model, _batch(1))
    assert "loss_cluster" not in out
    expected = 0.5 * (out["loss_phase_phase"] + out["loss_rgb_rgb"] + out["loss_phase_rgb"] + out["loss_rgb_phase"])
    torch.testing.assert_close(out["loss"], expected)
    model.zero_grad()
    centroids = torch.nn.functional.normalize(torch.randn(3, model.feature_dim), dim=1)
    out = _step_checks(model, _batch(2), ClusterTargets(centroids, torch.arange(B) % 3))
    # cluster loss: cross-entropy of [q.c_own, q.c_other...] with no temperature, weight 0.1
    assert 0 < float(out["loss_cluster"].detach()) < 2 * torch.log(torch.tensor(3.0)) + 2
    contrast = 0.5 * (out["loss_phase_phase"] + out["loss_rgb_rgb"] + out["loss_phase_rgb"] + out["loss_rgb_phase"])
    torch.testing.assert_close(out["loss"], contrast + 0.1 * out["loss_cluster"])


def test_single_process_shuffle_bn_restores_order():
    model = _model()
    model.encoder_k.eval()  # per-sample keys: any wrong unshuffle would show
    x = torch.randn(6, 3, SIZE, SIZE)
    torch.testing.assert_close(model.shuffled_keys(x), model.encoder_k(x)[0], rtol=0, atol=1e-5)
    model.encoder_k.train()  # in train mode the two halves have their own BN statistics
    assert not torch.allclose(model.shuffled_keys(x), model.encoder_k(x)[0], atol=1e-4)


def test_cross_terms_use_the_configured_negatives():
    from dgucdir.model.queue import sample_ids

    batch = _batch(4)
    ids = sample_ids(batch.domain, batch.index)
    for mode in ("query", "positive"):
        model = _model(cross_negatives=mode)
        model.eval()  # deterministic BN, so the embeddings can be recomputed below
        phase_queue = copy.deepcopy(model.phase_queue)
        rgb_queue = copy.deepcopy(model.rgb_queue)
        with torch.no_grad():
            out = model(batch)
            q, _ = model.encoder_q(torch.cat([batch.q_phase, batch.q_rgb]))
            k, _ = model.encoder_k(torch.cat([batch.k_phase, batch.k_rgb]))
        negatives = phase_queue if mode == "query" else rgb_queue
        want = negatives.infonce(q[:B], k[B:], batch.domain, ids, 0.2).loss
        torch.testing.assert_close(out["loss_phase_rgb"], want, rtol=1e-5, atol=1e-5)


def _naive_rgb_loss(q, k, domain, queue_keys, fresh_negatives):
    """InfoNCE written out per query: [own key, negatives] with the negatives listed by hand."""
    losses = []
    for i in range(len(q)):
        same = (domain == domain[i]).nonzero().flatten().tolist()
        if fresh_negatives:  # the step's keys went in first, over the oldest len(same) slots
            negatives = torch.cat([k[[j for j in same if j != i]], queue_keys[int(domain[i]), len(same):]])
        else:
            negatives = queue_keys[int(domain[i])]
        logits = torch.cat([(q[i] @ k[i])[None], negatives @ q[i]]) / 0.2
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def test_batch_negatives_add_the_steps_other_keys_to_the_queue_negatives():
    batch = _batch(5)
    results = {}
    for fresh in (False, True):
        model = _model(batch_negatives=fresh)
        model.eval()  # BN on running statistics: the embeddings can be recomputed below
        queue_keys = model.rgb_queue.keys.clone()
        with torch.no_grad():
            out = model(batch)
            q, k = model.encoder_q(batch.q_rgb)[0], model.encoder_k(batch.k_rgb)[0]
        results[fresh] = out["loss_rgb_rgb"]
        torch.testing.assert_close(out["loss_rgb_rgb"], _naive_rgb_loss(q, k, batch.domain, queue_keys, fresh),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(results[False], results[True])


def test_rgb_only_and_shared_queue_ablations():
    from dgucdir.config import LossConfig, ModelConfig
    from dgucdir.model.dgucdir import DGUCDIR

    model = DGUCDIR(ModelConfig(arch="resnet_narrow", rgb_only=True), LossConfig(queue_size=32, shared_queue=True), 2, B,
                    torch.device("cpu"))
    assert model.phase_queue is None and model.rgb_queue.n_domains == 1
    out = model(_batch(3))
    assert set(out) == {"loss", "loss_rgb_rgb", "acc_rgb_rgb"}
    assert int(model.rgb_queue.ptr[0]) == B


def _two_rank_step():
    from dgucdir import dist

    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = _batch(10 + dist.rank())
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    out = ddp(batch)
    out["loss"].backward()
    m = model.model_cfg.momentum
    for kb, qb, k in zip(k_before, q_before, model.encoder_k.parameters()):
        torch.testing.assert_close(k, m * kb + (1 - m) * qb, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in model.encoder_k.parameters())
    grads = torch.cat([p.grad.flatten() for p in model.encoder_q.parameters()])
    # shuffle-BN restores order: with BN on running statistics every key depends on its own
    # input only, so the shuffled, gathered and unshuffled keys equal the direct computation
    model.encoder_k.eval()
    for buf in model.encoder_k.buffers():  # as DDP does at every forward: rank 0's BN statistics
        dist.broadcast(buf, 0)
    x = torch.randn(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(dist.rank()))
    shuffled = model.shuffled_keys(x)
    direct = model.encoder_k(x)[0]
    return float(out["loss"].detach()), grads, (shuffled - direct).abs().max().item(), int(model.rgb_queue.ptr[0])


def test_two_rank_step_with_ddp_and_shuffle_bn():
    (loss0, g0, err0, ptr0), (loss1, g1, err1, ptr1) = run_distributed(_two_rank_step, 2)
    assert torch.isfinite(torch.tensor([loss0, loss1])).all() and loss0 != loss1  # each rank its own queries
    torch.testing.assert_close(g0, g1)  # DDP averaged the gradients
    assert err0 < 1e-5 and err1 < 1e-5
    assert ptr0 == ptr1 == B // 2


def test_moco_checkpoint_loads_into_encoder(tmp_path):
    import pytest
    from dgucdir.errors import CheckpointError
    from dgucdir.model.encoder import Encoder, load_moco_v2

    src = Encoder("resnet18")
    state = {f"module.encoder_q.{k}": v for k, v in src.net.state_dict().items()}
    state["module.queue"] = torch.zeros(128, 10)  # MoCo keeps its queue in the state_dict too
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    dst = Encoder("resnet18")
    missing, unexpected = load_moco_v2(dst, tmp_path / "moco.pth.tar")
    assert missing == [] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    src.eval(), dst.eval()
    torch.testing.assert_close(src(x)[1], dst(x)[1])
    with pytest.raises(CheckpointError, match="do not fit this architecture"):
        load_moco_v2(Encoder("resnet_narrow"), tmp_path / "moco.pth.tar")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a MoCo v2 checkpoint"):
        load_moco_v2(dst, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_moco_v2(dst, tmp_path / "junk.pt")


def test_encoder_outputs_are_normalised_with_the_right_widths():
    from dgucdir.model.encoder import Encoder

    for arch, width in [("resnet_narrow", 256), ("resnet18", 512)]:
        enc = Encoder(arch)
        proj, pooled = enc(torch.randn(2, 3, 64, 64))
        assert proj.shape == (2, 128) and pooled.shape == (2, width) and enc.feature_dim == width
        torch.testing.assert_close(proj.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(pooled.norm(dim=1), torch.ones(2))
    assert Encoder("resnet50").feature_dim == 2048


def test_shuffle_bn_permutation_follows_train_seed():
    """The permutation (and so which samples share BN statistics) is drawn from (train.seed, step):
    the same seed reproduces the keys exactly, another seed gives other keys from the same weights."""
    from dgucdir.config import LossConfig, ModelConfig
    from dgucdir.model.dgucdir import DGUCDIR

    def keys(seed):
        torch.manual_seed(0)  # same weights for every model
        model = DGUCDIR(ModelConfig(arch="resnet_narrow"), LossConfig(queue_size=32), 2, B, torch.device("cpu"), seed)
        with torch.no_grad():
            return model.shuffled_keys(_batch(1).k_rgb)

    assert torch.equal(keys(0), keys(0))
    assert not torch.allclose(keys(0), keys(1))


def test_search_cache_key_follows_the_encoder_weights_only(demo_manifest):
    from dgucdir.data.manifest import Manifest
    from dgucdir.model.encoder import Encoder
    from dgucdir.search import gallery_cache_key

    manifest = Manifest.load(demo_manifest)
    torch.manual_seed(0)
    a = Encoder("resnet_narrow")
    b = copy.deepcopy(a)
    assert gallery_cache_key(a, manifest, "sketch", 64) == gallery_cache_key(b, manifest, "sketch", 64)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert gallery_cache_key(a, manifest, "sketch", 64) != gallery_cache_key(b, manifest, "sketch", 64)
    assert gallery_cache_key(a, manifest, "sketch", 64) != gallery_cache_key(a, manifest, "sketch", 32)


STEPS, GLOBAL = 3, 16  # per domain: 8 samples a step, 4 on each of 2 ranks


def _global_batch(step):
    """A step's global batch, rank-major: rank 0's 4 + 4 samples of domains 0 and 1, then rank 1's."""
    from dgucdir.data.batches import Batch

    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(GLOBAL, 3, SIZE, SIZE, generator=g) for _ in range(4)]
    domain = torch.tensor([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4)
    return Batch(*views, domain, torch.arange(GLOBAL) + 100 * step, torch.arange(GLOBAL) % 5)


def _rows(batch, rows):
    from dgucdir.data.batches import Batch

    return Batch(*(t[rows] for t in (batch.q_phase, batch.k_phase, batch.q_rgb, batch.k_rgb, batch.domain,
                                     batch.index, batch.label)))


def _train(model, batches, ddp=False):
    """STEPS SGD steps; returns each step's loss and the final query-encoder weights."""
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.05)
    losses = []
    for batch in batches:
        out = net(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    return losses, torch.cat([p.detach().flatten() for p in model.encoder_q.parameters()])


def _two_rank_training(bn, bn_group=None):
    from dgucdir import dist

    model = _model(rank_batch=GLOBAL // 2, bn=bn, bn_group=bn_group)
    queues = (model.rgb_queue.keys.clone(), model.phase_queue.keys.clone())
    rows = torch.arange(8) + 8 * dist.rank()
    losses, weights = _train(model, [_rows(_global_batch(s), rows) for s in range(STEPS)], ddp=True)
    return losses, weights, queues


def _one_process(bn, shards):
    """The same model on one process, its queues the two ranks' shards interleaved in blocks of one rank's
    enqueue (4 per domain), so that its FIFO evicts and refills exactly the keys the two shards do."""
    model = _model(rank_batch=GLOBAL, bn=bn)
    for queue, parts in ((model.rgb_queue, [q[0] for q in shards]), (model.phase_queue, [q[1] for q in shards])):
        blocks = [torch.stack([p[:, i:i + 4] for p in parts], 1).flatten(1, 2) for i in range(0, parts[0].shape[1], 4)]
        queue.keys.copy_(torch.cat(blocks, 1))
    return _train(model, [_global_batch(s) for s in range(STEPS)])


def test_paper_batchnorm_two_processes_train_as_one_on_the_same_global_batch():
    """model.bn=paper: BatchNorm over the whole global batch, so 2 ranks give the one-process losses
    (the mean of the ranks' losses) and weights, step after step; per-rank BatchNorm does not."""
    (l0, w0, q0), (l1, w1, q1) = run_distributed(_two_rank_training, 2, "paper")
    torch.testing.assert_close(w0, w1, rtol=0, atol=0)
    one_losses, one_weights = _one_process("paper", [q0, q1])
    torch.testing.assert_close(torch.tensor(l0 + l1).view(2, -1).mean(0), torch.tensor(one_losses), rtol=0, atol=2e-5)
    torch.testing.assert_close(w0, one_weights, rtol=0, atol=2e-5)
    (m0, _, p0), (m1, _, p1) = run_distributed(_two_rank_training, 2, "local")  # the control: statistics per rank
    local_mean = torch.tensor(m0 + m1).view(2, -1).mean(0)
    assert (local_mean - torch.tensor(_one_process("local", [p0, p1])[0])).abs().max() > 1e-3


def test_cluster_logits_are_float32_under_bf16_autocast(monkeypatch):
    """The cluster loss's pooled @ centroids runs in float32 even when the step runs under bf16 autocast
    (a .float() inside autocast would still be a bf16 matmul); the reference recomputes it in float32."""
    from dgucdir.cluster import ClusterTargets

    seen = []
    cross_entropy = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda logits, *a, **k: (seen.append(logits),
                        cross_entropy(logits, *a, **k))[1])
    model = _model()
    batch = _batch(3)
    centroids = torch.nn.functional.normalize(torch.randn(3, model.feature_dim), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, pooled = copy.deepcopy(model.encoder_q)(torch.cat([batch.q_phase, batch.q_rgb]))
        model(batch, ClusterTargets(centroids, torch.arange(B) % 3))
    logits, = (t for t in seen if t.shape == (2 * B, 3))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, pooled.float() @ centroids.T, rtol=0, atol=1e-6)


def test_batchnorm_groups_one_group_of_all_ranks_is_global_and_groups_of_one_are_per_rank():
    """model.bn_group: a group of both ranks (one "node") trains exactly as global BatchNorm; groups of one
    rank normalise per rank, as model.bn=local does (to rounding: another implementation)."""
    (g0, gw0, _), (g1, _, _) = run_distributed(_two_rank_training, 2, "paper", 2)
    (p0, pw0, _), (p1, _, _) = run_distributed(_two_rank_training, 2, "paper", None)
    assert g0 + g1 == p0 + p1 and torch.equal(gw0, pw0)
    (o0, _, _), (o1, _, _) = run_distributed(_two_rank_training, 2, "paper", 1)
    (l0, _, _), (l1, _, _) = run_distributed(_two_rank_training, 2, "local", None)
    torch.testing.assert_close(torch.tensor(o0 + o1), torch.tensor(l0 + l1), rtol=0, atol=1e-4)
    assert (torch.tensor(o0 + o1) - torch.tensor(p0 + p1)).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_per_step_match_the_documented_formula(tmp_path, demo_manifest, world):
    """`dgucdir bench comm` at W=2 and W=4 on gloo: 6 InfoNCE collectives a step (against 28 before), and 3
    per BatchNorm layer on the BN group, whatever W."""
    import json
    import subprocess
    import sys

    from helpers import REPO, free_port

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                          "--master_port", str(free_port()), "-m", "dgucdir", "bench", "comm",
                          f"data.manifest={demo_manifest}", "train.batch_size=32", "loss.queue_size=64",
                          "data.image_size=32", "augment.hpf_range=7", "data.num_threads=1",
                          "--config", "configs/demo.yaml", "--steps", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout)
    assert r["world_size"] == world and r["infonce_per_step"] == 6 and r["bn_per_step"] == 3 * r["bn_layers"] == 36
    # all-gathered per rank and step: its B = 32 / W rows of both query sets (2 x 128 fp32), ids and domains
    # (2 int64), and in backward the gradient of its 4 negative sums (the demo's cross_negatives=positive
    # pairs each query set with both queues): bytes in B, so the total gathered grows as W x B, not W^2
    assert r["bytes_per_step"]["all_gather"] == 32 // world * (2 * 128 * 4 + 2 * 8 + 4 * 4)


def _copy_and_pickle_with_bn_groups():
    import pickle

    from dgucdir import dist
    from dgucdir.model.batchnorm import GlobalBatchNorm2d

    model = _model(rank_batch=GLOBAL // 2, bn="paper", bn_group=1)  # a group of its own per rank
    groups = {m.group for m in model.encoder_q.modules() if isinstance(m, GlobalBatchNorm2d)}
    copied = copy.deepcopy(model.encoder_q)  # what logging the MLflow model does
    pickle.dumps(model.encoder_q)
    dist.destroy_batchnorm_groups()
    return len(groups), None not in groups, {m.group for m in copied.modules() if isinstance(m, GlobalBatchNorm2d)}


def test_a_model_with_batchnorm_groups_copies_and_pickles():
    """The process group stays with the process: a copy (the MLflow model) normalises over the default group."""
    for n_groups, has_group, copied in run_distributed(_copy_and_pickle_with_bn_groups, 2):
        assert n_groups == 1 and has_group and copied == {None}
