"""dgucdir pack: both input formats, damaged inputs, idempotence, manifest, DALI and webdataset read-back."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgucdir.data.manifest import Manifest
from dgucdir.data.pack import PackError, pack, read_list, read_tree


def _jpeg(path: Path, seed: int, mode: str = "RGB", fmt: str = "JPEG") -> None:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert(mode).save(path, format=fmt)


@pytest.fixture
def damaged_lists(tmp_path):
    """Two domains in list format (1-based labels), with every kind of damage in domain 'b'."""
    root = tmp_path / "imgs"
    lines = {"a": [], "b": []}
    for d in "ab":
        for i in range(12):
            _jpeg(root / d / f"c{i % 3}" / f"{i}.jpg", hash((d, i)) % 1000)
            lines[d].append(f"{d}/c{i % 3}/{i}.jpg {i % 3 + 1}")
    good = (root / "b/c0/0.jpg").read_bytes()
    (root / "b/trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "b/empty.jpg").write_bytes(b"")
    _jpeg(root / "b/cmyk.jpg", 7, mode="CMYK")
    _jpeg(root / "b/palette.png", 8, mode="P", fmt="PNG")
    lines["b"] += ["b/trunc.jpg 1", "b/empty.jpg 2", "b/missing.jpg 3", "b/cmyk.jpg 1", "b/palette.png 2"]
    lists = {}
    for d, ls in lines.items():
        lists[d] = tmp_path / f"{d}.txt"
        lists[d].write_text("\n".join(ls) + "\n")
    return root, lists


def _read(root, lists):
    return {d: read_list(d, p, root, 1) for d, p in lists.items()}


def test_damaged_inputs_are_reported_and_the_rest_packed(tmp_path, damaged_lists):
    root, lists = damaged_lists
    result = pack(_read(root, lists), tmp_path / "out", label_offset=1, shard_mb=0.01, workers=2, progress=False)
    reasons = {Path(p).name: r for p, r in result.skipped}
    assert set(reasons) == {"trunc.jpg", "empty.jpg", "missing.jpg"}
    assert reasons["empty.jpg"] == "zero-byte file"
    assert reasons["missing.jpg"] == "missing file"
    assert reasons["trunc.jpg"].startswith("undecodable")
    assert result.counts == {"a": 12, "b": 14}  # CMYK and palette are kept, re-encoded
    skipped_tsv = (tmp_path / "out/skipped.tsv").read_text().splitlines()
    assert len(skipped_tsv) == 4
    m = Manifest.load(result.manifest_path)
    assert m.label_offset == 1 and m.classes == ["c0", "c1", "c2"]
    b = m.domain("b")
    assert sum(s.count for s in b.shards) == 14 and len(b.shards) > 1
    assert b.class_counts == [4 + 1, 4 + 1, 4]
    for s in b.shards:
        assert hashlib.sha256(s.path.read_bytes()).hexdigest() == s.sha256
    records = b.samples()
    assert [r.index for r in records] == list(range(14))
    cmyk = next(r for r in records if r.source.endswith("cmyk.jpg"))
    with Image.open(io.BytesIO(b.read_image_bytes(cmyk))) as img:
        assert (img.format, img.mode) == ("PNG", "RGB")
    first = records[0]
    assert b.read_image_bytes(first) == (root / first.source).read_bytes()  # original bytes kept


def test_strict_fails_without_writing_a_manifest(tmp_path, damaged_lists):
    root, lists = damaged_lists
    with pytest.raises(PackError, match="--strict: 3 image"):
        pack(_read(root, lists), tmp_path / "out", label_offset=1, strict=True, workers=1, progress=False)
    assert not (tmp_path / "out/manifest.json").exists()


def test_packing_is_idempotent(tmp_path, damaged_lists):
    root, lists = damaged_lists
    digests = []
    for out in ("o1", "o2"):
        pack(_read(root, lists), tmp_path / out, label_offset=1, shard_mb=0.01, workers=2, progress=False)
        digests.append({p.relative_to(tmp_path / out): p.read_bytes() for p in (tmp_path / out).rglob("*") if p.is_file()})
    assert digests[0].keys() == digests[1].keys()
    assert all(digests[0][k] == digests[1][k] for k in digests[0])
    # re-packing into the same folder leaves no stale or temporary files behind
    pack(_read(root, lists), tmp_path / "o1", label_offset=1, shard_mb=1, workers=1, progress=False)
    names = {p.name for p in (tmp_path / "o1/b").iterdir()}
    assert not any(n.startswith(".tmp") for n in names)
    assert names == {"b-000000.tar", "b-000000.idx", "samples.tsv", "samples.npy"}


@pytest.mark.parametrize("line, message", [
    ("just_a_path.jpg", r"x.txt:2: expected 'relative/path label'"),
    ("a/b.jpg seven", r"x.txt:2: label 'seven' is not an integer"),
    ("a/b.jpg 0", r"x.txt:2: label 0 is below the label offset 1"),
])
def test_malformed_list_line_names_file_and_line(tmp_path, line, message):
    lst = tmp_path / "x.txt"
    lst.write_text(f"a/ok.jpg 1\n{line}\n")
    with pytest.raises(PackError, match=message):
        read_list("x", lst, tmp_path, 1)


def test_tree_input_and_readback_with_webdataset_and_dali(tmp_path):
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def, types

    for d in ("art", "photo"):
        for c in ("dog", "cat", "elephant"):
            for i in range(5):
                _jpeg(tmp_path / "tree" / d / c / f"{i}.jpg", hash((d, c, i)) % 1000)
    domains, classes = read_tree(tmp_path / "tree")
    assert classes == ["cat", "dog", "elephant"]
    result = pack(domains, tmp_path / "out", classes, shard_mb=0.02, workers=1, progress=False)
    m = Manifest.load(result.manifest_path)
    for name in ("art", "photo"):
        dom = m.domain(name)
        seen = []
        for sample in wds.WebDataset([str(s.path) for s in dom.shards], shardshuffle=False):
            seen.append(int.from_bytes(sample["idx"], "little"))
            assert int(sample["cls"]) == int.from_bytes(sample["lbl"], "little")
        assert sorted(seen) == list(range(15))

        @pipeline_def(batch_size=4, num_threads=1, device_id=None)
        def pipe():
            img, idx = fn.readers.webdataset(paths=[str(s.path) for s in dom.shards],
                                             index_paths=[str(s.index_path) for s in dom.shards],
                                             ext=["jpg;png", "idx"], dtypes=[types.UINT8, types.INT32],
                                             pad_last_batch=True, name="r")
            return fn.decoders.image(img), idx

        p = pipe()
        p.build()
        assert p.reader_meta("r")["epoch_size"] == 15
        got = []
        for _ in range(4):
            out = p.run()
            got += [int(np.array(out[1][i])[0]) for i in range(4)]
        assert sorted(got[:15]) == list(range(15))  # every sample exactly once
        assert got[15] == got[14]  # the last batch is padded with the last sample
    labels = json.loads((tmp_path / "out/manifest.json").read_text())["domains"]["art"]["class_counts"]
    assert labels == [5, 5, 5]


def test_decompression_bombs_and_absurd_sizes_are_skipped(tmp_path):
    from dgucdir.data.pack import Item, check_image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 Mpixel, a few kB on disk: PIL's bomb guard trips
    assert bomb.stat().st_size < 100_000
    res = check_image(Item("d", bomb, "bomb.png", 0), max_pixels=40_000_000)
    assert res.data is None and res.reason.startswith("decompression bomb")
    _jpeg(tmp_path / "ok.jpg", 1)
    small_limit = check_image(Item("d", tmp_path / "ok.jpg", "ok.jpg", 0), max_pixels=1000)
    assert small_limit.data is None and small_limit.reason == "absurd size 48x40 (> 1000 pixels)"
    fine = check_image(Item("d", tmp_path / "ok.jpg", "ok.jpg", 0), max_pixels=40_000_000)
    assert fine.data == (tmp_path / "ok.jpg").read_bytes() and fine.ext == "jpg"


def test_bench_photos_are_photo_sized_jpegs_in_four_colour_cast_domains(tmp_path):
    """`dgucdir bench photos`: what the 224 px benchmarks read; the casts are what tell the domains apart."""
    from dgucdir.bench import write_bench_photos

    manifest = Manifest.load(write_bench_photos(tmp_path, per_domain=12))
    assert sorted(manifest.domains) == ["bright", "cool", "dim", "warm"]
    mean_rgb = {}
    for name in manifest.domains:
        domain = manifest.domain(name)
        assert domain.count == 12
        images = [Image.open(io.BytesIO(domain.read_image_bytes(r))) for r in domain.samples()]
        assert all(img.format == "JPEG" and img.size == (400, 300) for img in images)
        assert {r.label for r in domain.samples()} <= {0, 1}  # which of the two bundled photos
        mean_rgb[name] = np.mean([np.asarray(img, np.float64).mean((0, 1)) for img in images], 0)
    # the crops differ per domain; a cast of 1.15/0.8 vs 0.8/1.15 doubles red/blue whatever they show
    assert mean_rgb["warm"][0] / mean_rgb["warm"][2] > 1.5 * mean_rgb["cool"][0] / mean_rgb["cool"][2]
    assert mean_rgb["bright"].mean() > mean_rgb["dim"].mean()


def test_the_memory_mapped_sample_table_is_the_tsv_and_reads_the_same_bytes(demo_manifest, tmp_path):
    """samples.npy (row i = sample i) holds what samples.tsv says; the reader gets every sample's bytes through
    it; a pack without it (an older version's) is read from the tsv, with the same table."""
    import shutil

    from dgucdir.data.reader import SampleReader

    domain = Manifest.load(demo_manifest).domain("neon")
    table = domain.table()
    assert isinstance(table, np.memmap) and len(table) == domain.count
    records = domain.samples()
    names = [s.path.name for s in domain.shards]
    assert [(int(r["label"]), names[int(r["shard"])], int(r["offset"]), int(r["size"])) for r in table] == \
        [(r.label, r.shard.name, r.offset, r.size) for r in records]
    reader = SampleReader([domain])
    for i in (0, 7, domain.count - 1):
        data, label = reader.read(0, i)
        assert bytes(data) == domain.read_image_bytes(records[i]) and label == records[i].label
    old = tmp_path / "old"
    shutil.copytree(demo_manifest.parent, old)
    (old / "neon" / "samples.npy").unlink()
    legacy = Manifest.load(old / "manifest.json").domain("neon").table()
    assert not isinstance(legacy, np.memmap) and np.array_equal(legacy, np.asarray(table))


def test_a_two_million_row_table_opens_at_once_without_reading_it():
    from dgucdir.bench import bench_table

    r = bench_table(2_000_000)
    assert r["open_s"] < 0.5 and r["rss_mb"] < 300, r  # parsing 2M tsv rows into objects takes seconds and GBs
