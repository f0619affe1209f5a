"""The demo's orchestration: data built once per renderer version, stale runs set aside, not fresh ones."""

import subprocess
import sys

import pytest
from dgucdir.config import load_config, to_yaml
from dgucdir.data.demo import RENDER_VERSION
from dgucdir.data.manifest import Manifest
from dgucdir.demo import build_demo_data, set_aside_stale_run, stale_reasons
from dgucdir.train import RUN_INFO, write_run_info
from helpers import REPO


def test_demo_data_is_rebuilt_only_when_rendered_by_another_version(tmp_path):
    manifest = build_demo_data(tmp_path)
    assert (tmp_path / "render_version").read_text().strip() == f"digits {RENDER_VERSION}"
    first = manifest.stat().st_mtime_ns
    assert build_demo_data(tmp_path) == manifest and manifest.stat().st_mtime_ns == first  # reused
    (tmp_path / "render_version").write_text("1\n")  # as an older renderer left it (before sets had names)
    probe = next((tmp_path / "images" / "ink").rglob("*.jpg"))
    probe.write_bytes(b"stale")
    build_demo_data(tmp_path)
    assert probe.read_bytes()[:2] == b"\xff\xd8"  # rendered again: a JPEG once more
    assert (tmp_path / "render_version").read_text().strip() == f"digits {RENDER_VERSION}"


@pytest.mark.parametrize("saved_overrides, same_data, reason", [
    ([], True, None),  # same settings, same data: resumed in place
    (["optim.lr=0.5"], True, "optim.lr"),
    ([], False, "other data (the demo was rendered again since)"),
    ([], None, "unrecorded data"),  # a run from before runs recorded their data
    (["unreadable"], True, "a config this version no longer reads"),
])
def test_demo_sets_aside_a_run_trained_with_other_settings(tmp_path, caplog, demo_manifest, saved_overrides,
                                                           same_data, reason):
    out = tmp_path / "demo"
    out.mkdir()
    base = [f"train.output_dir={out}", f"data.manifest={demo_manifest}"]
    if saved_overrides == ["unreadable"]:  # written by a version with a key this one lacks
        saved_text = to_yaml(load_config(REPO / "configs" / "demo.yaml", base)) + "retired_section:\n  knob: 1\n"
    else:
        saved_text = to_yaml(load_config(REPO / "configs" / "demo.yaml", [*base, *saved_overrides]))
    (out / "config.yaml").write_text(saved_text)
    if same_data is not None:
        write_run_info(out, Manifest.load(demo_manifest))
    if same_data is False:
        (out / RUN_INFO).write_text((out / RUN_INFO).read_text().replace('"manifest_sha256": "', '"manifest_sha256": "0'))
    set_aside_stale_run(load_config(REPO / "configs" / "demo.yaml", base), out)
    moved = list(tmp_path.glob("demo.stale-*"))
    if reason is None:
        assert out.is_dir() and not moved
    else:
        assert not out.exists() and len(moved) == 1 and (moved[0] / "config.yaml").read_text() == saved_text
        assert reason in caplog.text


def test_train_on_the_demo_config_renders_missing_demo_data_and_the_demo_then_resumes_it(tmp_path, monkeypatch):
    overrides = ["train.output_dir=out", "data.image_size=32", "augment.hpf_range=7"]
    res = subprocess.run([sys.executable, "-m", "dgucdir", "train", str(REPO / "configs" / "demo.yaml"),
                          "train.max_steps=2", *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "data" / "demo" / "shards" / "manifest.json").is_file()
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["ckpt-000000002"]
    monkeypatch.chdir(tmp_path)
    # `dgucdir demo` with the same settings must resume this run, not set it aside: before runs
    # recorded their data, only `dgucdir demo` marked it and a run made by `train` was always moved
    cfg = load_config(REPO / "configs" / "demo.yaml", ["train.max_steps=2", *overrides])
    assert stale_reasons(cfg, tmp_path / "out") == []
