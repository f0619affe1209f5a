"""The `dgucdir` command: help texts, config printing, pack, eval and search on a real checkpoint."""

import json
import subprocess
import sys

import pytest
import yaml

from dgucdir.config import to_yaml

from test_train import REPO, run, tiny_config

SUBCOMMANDS = ["config", "pack", "demo-data", "demo", "train", "eval", "search", "bench"]


def cli(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "dgucdir", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_help_explains_every_subcommand():
    top = cli("--help").stdout
    for sub in SUBCOMMANDS + ["submit"]:
        assert sub in top
    for sub in SUBCOMMANDS:
        out = cli(sub, "--help").stdout
        assert out.startswith("usage: dgucdir " + sub) and len(out.splitlines()) > 3
    assert "--dry-run" in cli("submit", "--help").stdout


def test_config_prints_the_resolved_config_and_rejects_bad_keys():
    out = cli("config", "configs/pacs.yaml", "train.epochs=7").stdout
    assert yaml.safe_load(out)["train"]["epochs"] == 7
    bad = cli("config", "configs/pacs.yaml", "train.epochz=7", check=False)
    assert bad.returncode == 2 and "train.epochz" in bad.stderr and "unknown key" in bad.stderr


def test_pack_cli_two_domains_reports_throughput(tmp_path, demo_root):
    args = ["pack", "--root", str(demo_root / "images"), "--out", str(tmp_path / "out"), "--workers", "2"]
    for d in ("ink", "sketch"):
        args += ["--list", f"{d}={demo_root / 'lists' / f'{d}.txt'}"]
    res = cli(*args)
    assert "packed" in res.stdout and "images/s" in res.stdout and "skipped 0" in res.stdout
    assert set(json.loads((tmp_path / "out/manifest.json").read_text())["domains"]) == {"ink", "sketch"}
    (tmp_path / "bad.txt").write_text("ink/0/x.jpg 0\nno-label-here\n")
    bad = cli("pack", "--list", f"ink={tmp_path / 'bad.txt'}", "--out", str(tmp_path / "o2"), check=False)
    assert bad.returncode == 2 and "bad.txt:2" in bad.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_manifest):
    tmp = tmp_path_factory.mktemp("ckpt")
    run(["train", str(tiny_config(tmp, demo_manifest, "c", epochs=1, max_steps_per_epoch=2, eval_every=5))])
    return next((tmp / "c/checkpoints").glob("ckpt-*"))


def test_eval_checkpoint_and_baselines(tmp_path, checkpoint, demo_manifest):
    res = cli("eval", str(checkpoint), "--domains", "ink", "neon", "photo", "--out", str(tmp_path / "e"))
    report = json.loads((tmp_path / "e/retrieval.json").read_text())
    assert len(report["pairs"]) == 6 and {"P@1", "mAP@All"} <= set(report["mean"])
    assert (tmp_path / "e/retrieval_ink_to_photo.png").is_file()
    assert "| ink | — |" in res.stdout
    cfg = checkpoint.parent.parent.parent / "c.yaml"
    cli("eval", "--init", "random", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert json.loads((tmp_path / "r/retrieval.json").read_text())["domains"] == ["photo", "sketch"]
    bad = cli("eval", str(checkpoint), "--config", str(REPO / "configs/pacs.yaml"), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "another architecture" in bad.stderr


def test_search_prints_top_k_caches_the_gallery_and_rejects_bad_input(tmp_path, checkpoint, demo_root):
    query = demo_root / "images" / "photo" / "3" / "0003.jpg"
    out = tmp_path / "s.png"
    res = cli("search", str(checkpoint), "--gallery", "sketch", "--query", str(query), "--top", "4", "--out", str(out))
    rows = [l for l in res.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert len(rows) == 4 and out.is_file()
    scores = [float(r.split()[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    cache = list((checkpoint / "search_cache").glob("sketch-*.pt"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime
    cli("search", str(checkpoint), "--gallery", "sketch", "--query", str(query), "--out", str(out))
    assert cache[0].stat().st_mtime == mtime  # reused, not recomputed
    bad = cli("search", str(checkpoint), "--gallery", "clipart", "--query", str(query), check=False)
    assert bad.returncode == 2 and "domain 'clipart' is not in" in bad.stderr
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    bad = cli("search", str(checkpoint), "--gallery", "sketch", "--query", str(tmp_path / "broken.jpg"), check=False)
    assert bad.returncode == 2 and "cannot be read as an image" in bad.stderr


def test_demo_data_is_rebuilt_only_when_rendered_by_another_version(tmp_path):
    from dgucdir.cli import build_demo_data
    from dgucdir.data.demo import RENDER_VERSION

    manifest = build_demo_data(tmp_path)
    assert (tmp_path / "render_version").read_text().strip() == str(RENDER_VERSION)
    first = manifest.stat().st_mtime_ns
    assert build_demo_data(tmp_path) == manifest and manifest.stat().st_mtime_ns == first  # reused
    (tmp_path / "render_version").write_text("1\n")  # as an older renderer left it
    probe = next((tmp_path / "images" / "ink").rglob("*.jpg"))
    probe.write_bytes(b"stale")
    build_demo_data(tmp_path)
    assert probe.read_bytes()[:2] == b"\xff\xd8"  # rendered again: a JPEG once more
    assert (tmp_path / "render_version").read_text().strip() == str(RENDER_VERSION)


@pytest.mark.parametrize("saved_overrides, data_version, reason", [
    ([], "2", None),  # same settings, same data: resumed in place
    (["optim.lr=0.5"], "2", "optim.lr"),
    ([], "1", "demo data version 1 -> 2"),
    (["unreadable"], "2", "a config this version no longer reads"),
])
def test_demo_sets_aside_a_run_trained_with_other_settings(tmp_path, caplog, saved_overrides, data_version, reason):
    from dgucdir.cli import set_aside_stale_run
    from dgucdir.config import load_config

    out = tmp_path / "demo"
    out.mkdir()
    if saved_overrides == ["unreadable"]:  # written by a version with a key this one lacks
        saved_text = to_yaml(load_config(REPO / "configs" / "demo.yaml")) + "retired_section:\n  knob: 1\n"
    else:
        saved_text = to_yaml(load_config(REPO / "configs" / "demo.yaml", [f"train.output_dir={out}", *saved_overrides]))
    (out / "config.yaml").write_text(saved_text)
    (out / "render_version").write_text(data_version)
    set_aside_stale_run(load_config(REPO / "configs" / "demo.yaml", [f"train.output_dir={out}"]), out)
    moved = list(tmp_path.glob("demo.stale-*"))
    if reason is None:
        assert out.is_dir() and not moved
    else:
        assert not out.exists() and len(moved) == 1 and (moved[0] / "config.yaml").read_text() == saved_text
        assert reason in caplog.text


def test_train_on_the_demo_config_renders_missing_demo_data_first(tmp_path):
    res = subprocess.run([sys.executable, "-m", "dgucdir", "train", str(REPO / "configs" / "demo.yaml"),
                          "train.max_steps=2", "train.output_dir=out", "data.image_size=32", "augment.hpf_range=7"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "data" / "demo" / "shards" / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["ckpt-000000002"]
