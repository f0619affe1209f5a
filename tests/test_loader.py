"""DALI pipelines and the domain-balanced loader on the CPU."""

import math

import numpy as np
import pytest
import torch

from dgucdir.config import load_config
from dgucdir.data.batches import random_derangement
from dgucdir.data.loader import MultiDomainLoader, eval_batches
from dgucdir.data.manifest import Manifest
from dgucdir.data.order import cycled, rank_share
from dgucdir.data.partner_bank import PartnerBank
from dgucdir.data.spec import PipelineSpec
from dgucdir.data.pipeline import partner_pipeline, train_pipeline
from dgucdir.data.reader import IndexedSource, SampleReader

CPU = torch.device("cpu")


def _loader(manifest, rank=0, world=1, seed=0, batch=16, size=48, order="global", partner="bank"):
    cfg = load_config(None, ["data.train_domains=[ink,photo]", "data.eval_domains=[neon,sketch]", "augment.hpf_range=10",
                             f"train.seed={seed}", "data.shuffle_buffer=128", f"data.image_size={size}",
                             f"data.order={order}", f"augment.partner={partner}"])
    return MultiDomainLoader(cfg, Manifest.load(manifest), batch, PipelineSpec(size, rank, world, None, 1), CPU)


def test_batches_are_balanced_shaped_and_cover_every_index(demo_manifest):
    loader = _loader(demo_manifest)
    m = Manifest.load(demo_manifest)
    counts = {0: m.domain("ink").count, 1: m.domain("photo").count}
    assert loader.steps_per_epoch == math.ceil(max(counts.values()) / 8)
    seen = {0: set(), 1: set()}
    for b in loader.epoch(0):
        assert b.q_rgb.shape == b.k_rgb.shape == b.q_phase.shape == b.k_phase.shape == (16, 3, 48, 48)
        assert b.q_rgb.dtype == torch.float32
        assert torch.bincount(b.domain, minlength=2).tolist() == [8, 8]
        for t in (b.q_rgb, b.k_rgb, b.q_phase):  # normalised [0,255] images
            assert t.min() >= -2.2 and t.max() <= 2.7
        assert torch.equal(b.q_phase[:, 0], b.q_phase[:, 0])
        for d in (0, 1):
            seen[d] |= set(b.index[b.domain == d].tolist())
    for d in (0, 1):
        assert seen[d] == set(range(counts[d]))


def _first_steps(loader, epoch, steps, bank_after=None):
    """The first ``steps`` batches of ``epoch``, and the partner bank's state after ``bank_after`` of them."""
    batches, state = [], None
    for step, batch in zip(range(steps), loader.epoch(epoch)):
        batches.append(batch)
        if step + 1 == bank_after:  # the generator is paused after this step: its images are in the bank
            state = loader.bank.state_dict()
    return batches, state


def test_same_seed_same_batches_and_exact_start_step(demo_manifest):
    a, bank = _first_steps(_loader(demo_manifest, seed=3), 2, 4, bank_after=2)
    b = [b for _, b in zip(range(4), _loader(demo_manifest, seed=3).epoch(2))]
    resumed = _loader(demo_manifest, seed=3)
    resumed.bank.load_state_dict(bank)
    c = list(resumed.epoch(2, start_step=2, num_steps=4))
    d = [b for _, b in zip(range(1), _loader(demo_manifest, seed=4).epoch(2))]
    for x, y in zip(a, b):
        assert torch.equal(x.q_rgb, y.q_rgb) and torch.equal(x.k_phase, y.k_phase) and torch.equal(x.index, y.index)
    for x, y in zip(a[2:], c):
        assert torch.equal(x.q_rgb, y.q_rgb) and torch.equal(x.index, y.index)
    assert not torch.equal(a[0].index, d[0].index)


def test_with_shard_order_two_ranks_read_disjoint_fixed_shards(demo_manifest):
    idx = []
    for rank in (0, 1):
        seen = []
        for epoch in (0, 1):
            loader = _loader(demo_manifest, rank=rank, world=2, batch=8, order="shard")
            seen.append({(d, i) for b in loader.epoch(epoch) for d, i in zip(b.domain.tolist(), b.index.tolist())})
        assert seen[0] == seen[1]  # the same share every epoch: what data.order=global changes
        idx.append(seen[0])
    assert not idx[0] & idx[1]
    m = Manifest.load(demo_manifest)
    assert len(idx[0] | idx[1]) == m.domain("ink").count + m.domain("photo").count


def test_rank_shares_are_a_fresh_global_shuffle_each_epoch():
    """DistributedSampler(shuffle=True) + set_epoch: W disjoint shares covering everything, padded with the
    permutation's own first items to a multiple of W, and another split every epoch."""
    count, world = 103, 4
    shares = {e: [rank_share(count, e, 0, "ink", r, world) for r in range(world)] for e in (0, 1)}
    for e, parts in shares.items():
        assert [len(p) for p in parts] == [26] * 4  # ceil(103 / 4)
        flat = torch.stack(parts, 1).reshape(-1)  # rank r holds positions r, r+W, ...: the reading order
        assert sorted(flat[:count].tolist()) == list(range(count))  # one permutation ...
        assert flat[count:].tolist() == flat[: 104 - count].tolist()  # ... padded with its first item
    assert shares[0][0].tolist() != shares[1][0].tolist()  # rank 0's share changes between epochs
    assert set(shares[0][0].tolist()) != set(shares[1][0].tolist())
    assert torch.equal(rank_share(count, 1, 0, "ink", 2, world), shares[1][2])  # a function of (seed, epoch)
    assert rank_share(count, 1, 1, "ink", 2, world).tolist() != shares[1][2].tolist()
    assert rank_share(count, 1, 0, "photo", 2, world).tolist() != shares[1][2].tolist()
    assert cycled(torch.tensor([5, 6, 7]), 8).tolist() == [5, 6, 7, 5, 6, 7, 5, 6]


def test_two_ranks_read_every_sample_of_an_epoch_and_other_shares_the_next(demo_manifest):
    m = Manifest.load(demo_manifest)
    counts = {0: m.domain("ink").count, 1: m.domain("photo").count}
    seen = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            loader = _loader(demo_manifest, rank=rank, world=2, batch=8)
            batches = list(loader.epoch(epoch))
            seen[epoch, rank] = {(d, i) for b in batches for d, i in zip(b.domain.tolist(), b.index.tolist())}
            order = [i for b in batches for i in b.index[b.domain == 0].tolist()]
            want = cycled(rank_share(counts[0], epoch, 0, "ink", rank, 2), len(order))
            assert order == want.tolist()  # read in the share's order
        both = seen[epoch, 0] | seen[epoch, 1]
        assert both == {(d, i) for d in (0, 1) for i in range(counts[d])}
        assert len(seen[epoch, 0] & seen[epoch, 1]) <= 2  # only the padding: one item per odd-sized domain
    assert seen[0, 0] != seen[1, 0] and len(seen[0, 0] & seen[1, 0]) < 0.7 * len(seen[0, 0])


def test_eval_pipeline_each_sample_once_across_two_ranks_in_order(demo_manifest):
    dom = Manifest.load(demo_manifest).domain("sketch")
    per_rank = []
    for rank in (0, 1):
        got = [(img, lab, idx) for img, lab, idx in eval_batches(dom, PipelineSpec(40, rank, 2, None, 1), 64, CPU)]
        imgs = torch.cat([g[0] for g in got])
        assert imgs.shape[1:] == (3, 40, 40) and imgs.dtype == torch.uint8
        per_rank.append(torch.cat([g[2] for g in got]).tolist())
    assert len(per_rank[0]) + len(per_rank[1]) == dom.count
    assert sorted(per_rank[0] + per_rank[1]) == list(range(dom.count))
    labels = {r.index: r.label for r in dom.samples()}
    _, lab, idx = next(eval_batches(dom, PipelineSpec(40, 0, 1, None, 1), 16, CPU))
    assert [labels[i] for i in idx.tolist()] == lab.tolist()
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_moco_views_are_augmented_and_the_grayscale_branch_happens(demo_manifest):
    dom = Manifest.load(demo_manifest).domain("neon")
    pipe = train_pipeline(dom, PipelineSpec(32, 0, 1, None, 1), 64, seed=5, initial_fill=64)
    v1, v2, lab, idx = pipe.run()
    a, b = np.array(v1.as_tensor()).astype(int), np.array(v2.as_tensor()).astype(int)
    assert a.shape == (64, 3, 32, 32) and a.dtype == np.int64
    assert np.abs(a - b).mean() > 10  # two independent views of the same samples differ
    spread = (a.max(axis=1) - a.min(axis=1)).max(axis=(1, 2))  # largest channel difference per view
    gray = spread <= 1  # DALI's saturation-0 rounds to within one level
    assert 2 <= gray.sum() <= 30  # neon images are colourful: gray views come from p=0.2 grayscale
    assert spread[~gray].min() > 30


def test_random_derangement_has_no_fixed_points():
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 17):
        p = random_derangement(n, gen)
        assert sorted(p.tolist()) == list(range(n)) and not (p == torch.arange(n)).any()


def test_partners_are_raw_resized_images_read_by_index(demo_manifest):
    """Un-augmented: equal to a plain bicubic resize of the stored image, read in the order asked for."""
    import io

    from PIL import Image

    m = Manifest.load(demo_manifest)
    domains = [m.domain("ink"), m.domain("photo")]
    records = [{r.index: r for r in d.samples()} for d in domains]
    want_domain, want_index = [1, 0, 1, 1, 0, 0, 1, 0], [5, 17, 300, 5, 0, 399, 2, 44]
    pipe = partner_pipeline(IndexedSource(SampleReader(domains), want_domain, want_index, 8, ("encoded", "index", "domain")),
                            PipelineSpec(40, 1, 2, None, 1), seed=3)
    images, domain, index = pipe.run()
    images = np.array(images.as_tensor()).astype(float)
    assert np.array(domain.as_tensor()).ravel().tolist() == want_domain
    assert np.array(index.as_tensor()).ravel().tolist() == want_index
    for img, d, i in zip(images, want_domain, want_index):
        with Image.open(io.BytesIO(domains[d].read_image_bytes(records[d][i]))) as src:
            want = np.asarray(src.convert("RGB").resize((40, 40), Image.BICUBIC), float).transpose(2, 0, 1)
        assert img.shape == (3, 40, 40) and np.abs(img - want).mean() < 4  # DALI's cubic vs PIL's: a few levels


def test_fourier_off_or_zero_strength_leaves_the_views_alone(demo_manifest):
    """With lambda = 0 the raw-partner mix is the identity, so q_rgb is exactly the MoCo view (and the
    partner pipelines cost nothing when augment.fourier is off)."""
    cfg = load_config(None, ["data.train_domains=[ink,photo]", "data.eval_domains=[neon,sketch]",
                             "augment.alpha=0", "augment.hpf_alpha=0", "data.image_size=32", "augment.hpf_range=7"])
    spec = PipelineSpec(32, 0, 1, None, 1)
    mixed = next(MultiDomainLoader(cfg, Manifest.load(demo_manifest), 8, spec, CPU).epoch(0))
    cfg.augment.fourier = False
    plain_loader = MultiDomainLoader(cfg, Manifest.load(demo_manifest), 8, spec, CPU)
    assert not plain_loader.reads_partners and plain_loader.open_epoch(0).partner_pipes == []
    plain = next(plain_loader.epoch(0))
    assert torch.equal(mixed.q_rgb, plain.q_rgb) and torch.equal(mixed.k_rgb, plain.k_rgb)


@pytest.mark.parametrize("partner", ["per_view_raw", "bank"])
def test_each_view_has_its_own_partner_from_every_domain_and_shard_and_resume_redraws_the_same(demo_manifest, partner):
    """As the original: each of the 2B views draws its own raw partner from the training images of all
    training domains (also other ranks' shards: the bank of rank 1 of 2 after an epoch holds its share of
    a global shuffle); a resumed epoch draws the very same partners (the bank from its saved sample ids)."""
    loader = _loader(demo_manifest, rank=1, world=2, batch=16, partner=partner)
    if partner == "bank":
        for _ in loader.epoch(0):  # an epoch's images in the bank, as from the second epoch of training on
            pass
    batches, bank = _first_steps(loader, 1, 5, bank_after=3 if partner == "bank" else None)
    n = len(batches[0])
    pairs = [torch.stack([b.partner_domain, b.partner_index], 1) for b in batches]
    for p in pairs:
        assert p.shape == (2 * n, 2) and (p[:, 0] >= 0).all()
        same_for_both_views = (p[:n] == p[n:]).all(1).sum().item()
        assert same_for_both_views <= 1  # independent draws from ~900 images: a shared partner is rare
    drawn = torch.cat(pairs)
    for d, name in enumerate(["ink", "photo"]):
        count = Manifest.load(demo_manifest).domain(name).count
        mine = drawn[drawn[:, 0] == d, 1]
        assert 0.3 < len(mine) / len(drawn) < 0.7  # domains of equal size: about half the partners each
        assert mine.min() < count // 2 <= mine.max()  # both ranks' shards
    resumed_loader = _loader(demo_manifest, rank=1, world=2, batch=16, partner=partner)
    if partner == "bank":
        resumed_loader.bank.load_state_dict(bank)
    resumed = list(resumed_loader.epoch(1, start_step=3, num_steps=5))
    assert len(resumed) == 2
    for b, r in zip(batches[3:], resumed):
        assert torch.equal(b.partner_index, r.partner_index) and torch.equal(b.partner_domain, r.partner_domain)
        assert torch.equal(b.q_rgb, r.q_rgb) and torch.equal(b.k_rgb, r.k_rgb)
    other_seed = next(_loader(demo_manifest, rank=1, world=2, batch=16, seed=1, partner=partner).epoch(1))
    assert not torch.equal(other_seed.partner_index, batches[0].partner_index)


def test_bank_partners_are_the_raw_images_of_their_samples(demo_manifest):
    """The bank's images (from the training pipeline's own decode) equal the raw partners the original
    would decode for the same samples (the per-view pipeline), bit for bit: raw, un-augmented."""
    loader = _loader(demo_manifest, batch=16, size=40)
    batch = next(loader.epoch(0))
    domain, slot, index = loader.bank.occupied()
    assert len(index) == 16 and sorted(zip(domain.tolist(), index.tolist())) == sorted(
        zip(batch.domain.tolist(), batch.index.tolist()))
    pipe = partner_pipeline(IndexedSource(loader.reader, domain.tolist(), index.tolist(), 16,
                                          ("encoded", "index", "domain")), PipelineSpec(40, 0, 1, None, 1), seed=9)
    want = torch.from_numpy(np.array(pipe.run()[0].as_tensor()))
    assert torch.equal(loader.bank.gather(domain, slot), want)
    used = {(d, i) for d, i in zip(batch.partner_domain.tolist(), batch.partner_index.tolist())}
    assert used <= set(zip(domain.tolist(), index.tolist()))  # the first step draws from its own images


def test_bank_draws_domains_by_size_and_filled_slots_uniformly():
    """A uniform draw over all training images picks a domain in proportion to its size, whatever the
    bank's (domain-balanced) content; within a domain every filled slot equally, never an empty one."""
    bank = PartnerBank([100, 300, 50], slots_per_domain=8, image_size=4, device=CPU)
    bank.add(0, torch.zeros(5, 3, 4, 4, dtype=torch.uint8), torch.arange(5))
    bank.add(1, torch.ones(12, 3, 4, 4, dtype=torch.uint8), torch.arange(100, 112))  # wraps: keeps the last 8
    assert bank.filled().tolist() == [5, 8, 0]
    assert sorted(bank.ids[1].tolist()) == list(range(104, 112))
    domain, slot = bank.draw(40000, torch.Generator().manual_seed(0))
    share = torch.bincount(domain, minlength=3).double() / len(domain)
    assert abs(share[0] - 0.25) < 0.01 and abs(share[1] - 0.75) < 0.01 and share[2] == 0
    for d, filled in ((0, 5), (1, 8)):
        counts = torch.bincount(slot[domain == d], minlength=8)
        assert counts[filled:].sum() == 0 and counts[:filled].min() > 0.8 * counts[:filled].max()
    assert bank.gather(domain[:3], slot[:3]).shape == (3, 3, 4, 4)
    with pytest.raises(RuntimeError, match="empty"):
        PartnerBank([1], 2, 4, CPU).draw(1, torch.Generator())


def test_colour_jitter_scales_contrast_around_the_image_mean_as_torchvision():
    """On a sketch-like image (white background, dark strokes) the jitter's brightness, contrast and
    saturation match torchvision's adjust_* on the same factors to about a grey level; scaling the
    contrast around 128 instead (DALI's colour_twist) is off by several."""
    import torchvision.transforms.functional as TF
    from nvidia.dali import fn, pipeline_def

    from dgucdir.data import pipeline as dgp

    rng = np.random.default_rng(0)
    images = []
    for _ in range(8):
        img = np.full((48, 48, 3), 245, np.uint8)
        for _ in range(5):
            r, c = rng.integers(4, 44, 2)
            img[r - 2:r + 2, max(c - 15, 0):c + 4] = rng.integers(0, 80)
        images.append(img)
    b, c, s = (rng.uniform(0.6, 1.4, 8).astype(np.float32) for _ in range(3))

    drawn = iter((b, c, s))  # the jitter asks for its factors in this order

    def factors(_strength, _apply):
        values = next(drawn)
        return fn.external_source(source=lambda: [np.float32(v) for v in values], batch=True)

    @pipeline_def(batch_size=8, num_threads=1, device_id=None, seed=0)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return dgp.color_jitter_and_grayscale(x, p_jitter=1.0, p_gray=0.0), fn.color_twist(
            x, brightness=fn.external_source(source=lambda: list(b), batch=True),
            contrast=fn.external_source(source=lambda: list(c), batch=True),
            saturation=fn.external_source(source=lambda: list(s), batch=True))

    original = dgp._jitter_factor
    dgp._jitter_factor = factors
    try:
        p = pipe()
        p.build()
        ours, around_128 = (np.stack([np.array(t) for t in out]).astype(float) for out in p.run())
    finally:
        dgp._jitter_factor = original
    want = np.stack([TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
        torch.from_numpy(img).permute(2, 0, 1), bi), ci), si).permute(1, 2, 0).numpy()
        for img, bi, ci, si in zip(images, b, c, s)]).astype(float)
    assert np.abs(ours - want).mean() < 2.0  # grey images: the hue draw changes nothing
    assert np.abs(around_128 - want).mean() > 5.0
