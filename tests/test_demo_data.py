"""The embedded demo dataset: four domains, disjoint sources, balanced labels, packed shards."""

import numpy as np
from PIL import Image

from dgucdir.data.demo import DOMAINS, split_disjoint
from dgucdir.data.manifest import Manifest


def test_split_is_disjoint_complete_and_stratified():
    labels = np.repeat(np.arange(10), 37)
    parts = split_disjoint(labels, 4, seed=0)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(set(joined.tolist()))
    for p in parts:
        counts = np.bincount(labels[p], minlength=10)
        assert counts.max() - counts.min() <= 1


def test_demo_domains_are_disjoint_balanced_and_distinct(demo_root, demo_manifest):
    m = Manifest.load(demo_manifest)
    assert list(m.domains) == list(DOMAINS) and m.classes == [str(i) for i in range(10)]
    sources = {}
    for name, dom in m.domains.items():
        recs = dom.samples()
        sources[name] = {r.source.rsplit("/", 1)[1] for r in recs}  # the source digit's number
        assert dom.count == len(recs) >= 440
        assert sum(dom.class_counts) == dom.count
    names = list(sources)
    assert sum(len(s) for s in sources.values()) == 1797
    # label balance: each class is split evenly over the four domains (the source classes have 174-183 scans)
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    counts = np.array([m.domain(d).class_counts for d in names])  # (domains, classes)
    assert (counts.sum(0) == per_class).all()
    assert (counts.max(0) - counts.min(0) <= 1).all()
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not sources[a] & sources[b]
    # the domains look different: mean brightness and colourfulness separate them
    stats = {}
    for name, dom in m.domains.items():
        imgs = [np.asarray(Image.open(demo_root / "images" / r.source), np.float32) for r in dom.samples()[:40]]
        arr = np.stack(imgs)
        stats[name] = (arr.mean(), arr.std(axis=3).mean())
    assert stats["ink"][0] > 150 and stats["neon"][0] < 80 and stats["sketch"][0] > 200
    assert stats["neon"][1] > stats["sketch"][1] + 10


def build(out) -> str:
    """What each of several trainings started together does first: render the demo data if missing."""
    from dgucdir.demo import build_demo_data

    return str(build_demo_data(out))


def test_processes_starting_together_render_the_demo_data_once_and_whole(tmp_path, demo_manifest):
    # `dgucdir ablate --jobs 2` on a fresh clone: two trainings find no data at the same moment;
    # without the build lock they render into the same temporary files and one fails
    from helpers import run_together

    made = Manifest.load(run_together(build, tmp_path / "demo", processes=2)[0])
    reference = Manifest.load(demo_manifest)  # the same renderer's data, built alone
    assert made.fingerprint() == reference.fingerprint()
