"""The run's bookkeeping never costs its work: faults injected into tracking, evaluation, checkpoint
branches, stops, folder ownership, inputs and data, each against what must survive.

The trainings are in-process and tiny (the demo data at 32 px, a few steps an epoch); a fault is a
patched call that raises, or a stop flag set from inside the step where a signal would arrive.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, tiny_config

pytestmark = pytest.mark.slow


def _trainer(tmp_path, demo_manifest, name, resume=None, overrides=(), **train):
    from dgucdir.config import load_config
    from dgucdir.train import Trainer

    cfg = load_config(tiny_config(tmp_path, demo_manifest, name, **train), list(overrides))
    return Trainer(cfg, resume=resume)


def _weights(trainer) -> list[torch.Tensor]:
    return [t.clone() for t in trainer.core.state_dict().values()]


def _steps(path: Path) -> dict[str, dict[int, float]]:
    from dgucdir.metrics_log import read_metrics

    return read_metrics(path)


# --------------------------------------------------------------------------- 1. tracking fails mid-run
def test_a_full_tracking_store_costs_no_step_checkpoint_or_metric(tmp_path, demo_manifest, monkeypatch, capsys):
    """The store says "database or disk is full" from the second epoch on: training finishes, every checkpoint
    is written, metrics.jsonl has every step, the end says where they are, and track-resend restores them."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dgucdir.errors import space_error
    from dgucdir.metrics_log import resend
    from dgucdir.tracking import Tracker

    monkeypatch.setattr(Tracker, "RETRY_WAIT_S", 0.0)
    trainer = _trainer(tmp_path, demo_manifest, "full", epochs=3, eval_every=3, max_steps_per_epoch=3)
    real = mlflow.log_metrics

    def failing(metrics, step=None, **kw):
        if step is not None and step > 3:
            raise mlflow.exceptions.MlflowException("write failed") from sqlite3.OperationalError(
                "database or disk is full")
        return real(metrics, step=step, **kw)

    monkeypatch.setattr(mlflow, "log_metrics", failing)
    assert trainer.fit()
    run_dir = tmp_path / "full"
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("ckpt-*"))] == \
        ["ckpt-000000003", "ckpt-000000006", "ckpt-000000009"]
    local = _steps(run_dir / "metrics.jsonl")
    assert sorted(local["train/loss"]) == list(range(1, 10)) and "eval/mean/P_at_1" in local
    err = capsys.readouterr().err  # the trainer's log lines (setup_logging writes to stderr)
    assert "no space left" in err and "dgucdir track-resend" in err
    client = MlflowClient(trainer.tracker.uri)
    stored = {m.step for m in client.get_metric_history(trainer.tracker.run_id, "train/loss")}
    assert stored == {1, 2, 3}  # what reached the store before it failed
    monkeypatch.setattr(mlflow, "log_metrics", real)
    run_id, sent = resend(run_dir)
    assert run_id == trainer.tracker.run_id and sent > 0
    restored = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert restored == local["train/loss"]
    assert resend(run_dir)[1] == 0  # nothing left to send
    assert space_error(RuntimeError("x")) is None
    assert space_error(sqlite3.OperationalError("database or disk is full")) is not None


# --------------------------------------------------------------------------- 2. an evaluation lost to a kill
def test_an_evaluation_killed_after_its_checkpoint_is_redone_on_resume(tmp_path, demo_manifest, monkeypatch):
    import dgucdir.train as train

    real = train.evaluate
    calls = []

    def killed(*a, **kw):
        calls.append(1)
        raise KeyboardInterrupt  # a kill / Ctrl-C in the middle of the evaluation

    trainer = _trainer(tmp_path, demo_manifest, "ev", epochs=2, eval_every=2, max_steps_per_epoch=3)
    monkeypatch.setattr(train, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    report = tmp_path / "ev" / "eval" / "epoch_0002" / "retrieval.json"
    assert calls and not report.exists() and (tmp_path / "ev" / "checkpoints" / "ckpt-000000006").is_dir()
    monkeypatch.setattr(train, "evaluate", real)
    resumed = _trainer(tmp_path, demo_manifest, "ev", resume="latest", epochs=2, eval_every=2, max_steps_per_epoch=3)
    assert resumed.fit()  # no training left: the evaluation is redone, then the encoder exported
    assert json.loads(report.read_text())["mean"]["P@1"] >= 0
    assert (tmp_path / "ev" / "encoder.safetensors").is_file()


# --------------------------------------------------------------------------- 3. checkpoint branches
@pytest.mark.parametrize("keep", [1, 3])
def test_training_on_from_an_older_checkpoint_loses_nothing_newer(tmp_path, demo_manifest, keep):
    first = _trainer(tmp_path, demo_manifest, "br", epochs=3, eval_every=9, max_steps_per_epoch=3, keep_checkpoints=3)
    assert first.fit()
    root = tmp_path / "br" / "checkpoints"
    before = {p.name: (p / "state.pt").read_bytes() for p in root.glob("ckpt-*")}
    assert sorted(before) == ["ckpt-000000003", "ckpt-000000006", "ckpt-000000009"]
    branch = _trainer(tmp_path, demo_manifest, "br", resume=str(root / "ckpt-000000003"), epochs=3, eval_every=9,
                      max_steps_per_epoch=3, keep_checkpoints=keep)
    assert branch.fit()
    aside, = root.glob("aside-ckpt-000000003-*")
    assert {p.name: (p / "state.pt").read_bytes() for p in aside.glob("ckpt-*")} == \
        {k: v for k, v in before.items() if k != "ckpt-000000003"}  # the old branch, byte for byte
    mine = sorted(p.name for p in root.glob("ckpt-*"))
    assert mine[-1] == "ckpt-000000009" and len(mine) == keep  # the new branch's own, rotated as configured


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    from dgucdir.checkpoint import Checkpointer
    from dgucdir.train import Progress

    progress = Progress()
    ckpt = Checkpointer(tmp_path, {"progress": progress}, {}, keep=1)
    ckpt.save(20, {"world_size": 1})
    written = ckpt.save(10, {"world_size": 1})  # a lower step than a folder already there
    assert written.is_dir()


# --------------------------------------------------------------------------- 4. stops during clustering and eval
def _stop_when(monkeypatch, module, name, trainer_box):
    """Patches ``module.name`` so that its first call sets the trainer's stop flag (a signal arriving then)."""
    real = getattr(module, name)

    def wrapped(*a, **kw):
        trainer_box[0].stop.requested = True
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return real


@pytest.mark.parametrize("during", ["clustering", "evaluation"])
def test_a_stop_during_clustering_or_evaluation_is_prompt_and_resumes_exactly(tmp_path, demo_manifest, monkeypatch,
                                                                               during):
    import dgucdir.cluster_features as cluster_features
    import dgucdir.retrieval as retrieval

    kw = dict(epochs=3, warmup_epochs=1, eval_every=1, max_steps_per_epoch=3)
    straight = _trainer(tmp_path, demo_manifest, "straight", **kw)
    assert straight.fit()
    box = [_trainer(tmp_path, demo_manifest, "stopped", **kw)]
    module, name = (cluster_features, "embed_local") if during == "clustering" else (retrieval, "embed_local")
    real = _stop_when(monkeypatch, module, name, box)
    start = time.perf_counter()
    assert not box[0].fit()  # stopped: `dgucdir train` exits 75
    took = time.perf_counter() - start
    monkeypatch.setattr(module, name, real)
    latest = sorted((tmp_path / "stopped" / "checkpoints").glob("ckpt-*"))[-1]
    assert latest.name == "ckpt-000000003"  # the end of epoch 0: the stop came right after, not an epoch later
    resumed = _trainer(tmp_path, demo_manifest, "stopped", resume="latest", **kw)
    assert resumed.fit()
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed)))
    assert resumed.last_report.flat_metrics() == straight.last_report.flat_metrics()
    assert took < 60


# --------------------------------------------------------------------------- 5. one owner per folder
def test_a_second_trainer_on_a_live_run_folder_is_refused(tmp_path, demo_manifest):
    from dgucdir.file_lock import FolderBusy

    first = _trainer(tmp_path, demo_manifest, "own", epochs=1, max_steps_per_epoch=2)
    with pytest.raises(FolderBusy, match=rf"in use by pid {os.getpid()} on .* \(dgucdir train\)"):
        _trainer(tmp_path, demo_manifest, "own", resume="latest", epochs=1, max_steps_per_epoch=2)
    first.close()
    _trainer(tmp_path, demo_manifest, "own", resume="latest", epochs=1, max_steps_per_epoch=2).close()


def test_a_second_pack_into_a_live_output_is_refused(tmp_path, demo_root):
    from dgucdir.data.pack import pack, read_list
    from dgucdir.file_lock import FolderBusy, FolderLock

    out = tmp_path / "packed"
    holder = FolderLock(out, "dgucdir pack").acquire()  # a pack in progress
    items = read_list("ink", demo_root / "lists" / "ink.txt", demo_root / "images", 0)
    with pytest.raises(FolderBusy, match=r"in use by pid \d+ on .* \(dgucdir pack\)"):
        pack({"ink": items}, out, progress=False)
    holder.release()
    assert pack({"ink": items}, out, progress=False).counts["ink"] == len(items)


# --------------------------------------------------------------------------- 6. inputs that hang or escape
def test_a_fifo_in_a_pack_list_is_refused_at_once(tmp_path, demo_root):
    lines = (demo_root / "lists" / "ink.txt").read_text().splitlines()[:3]
    fifo = tmp_path / "images" / "pipe.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([f"{demo_root / 'images' / line.split()[0]} {line.split()[1]}" for line in lines]
                                 + [f"{fifo} 0"]) + "\n")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dgucdir", "pack", "--out", str(tmp_path / "out"), "--list",
                          f"ink={listing}", "--workers", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 30 and res.returncode == 0, res.stderr
    skipped = (tmp_path / "out" / "skipped.tsv").read_text()
    assert "pipe.jpg\tnot a regular file" in skipped


def test_a_decompression_bomb_query_is_one_line_and_exit_2(tmp_path):
    from PIL import Image

    from dgucdir.data.image_file import ImageFileError, open_image, read_image_file
    from dgucdir.errors import DataError
    from dgucdir.search import load_query

    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP of one bit: a few KiB on disk
    with pytest.raises(DataError, match=r"query image .*bomb.png: refused: absurd size 9000x9000"):
        load_query(bomb, 32)
    with pytest.raises(ImageFileError, match="larger than"):
        read_image_file(bomb, max_bytes=100)
    with open_image(read_image_file(bomb), max_pixels=10**8) as img:  # under a higher limit it opens
        assert img.size == (9000, 9000)


# --------------------------------------------------------------------------- 7. a resume on other data
def test_a_resume_on_repacked_data_is_refused_unless_asked(tmp_path, demo_manifest, capsys):
    import shutil

    from dgucdir.errors import CheckpointError

    data = tmp_path / "data"
    shutil.copytree(demo_manifest.parent, data)
    manifest = data / "manifest.json"
    from dgucdir.config import load_config
    from dgucdir.train import Trainer

    def trainer(resume=None, extra=()):
        cfg = load_config(tiny_config(tmp_path, manifest, "data", epochs=1, max_steps_per_epoch=2, eval_every=9),
                          list(extra))
        return Trainer(cfg, resume=resume)

    assert trainer().fit()
    content = json.loads(manifest.read_text())
    content["repacked"] = True  # what a re-pack changes: the manifest and its fingerprint
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="trained on data with manifest sha256 .*train.resume_on_other_data=true"):
        trainer(resume="latest")
    t = trainer(resume="latest", extra=["train.resume_on_other_data=true"])
    assert t.resumed_on_other_data and "going on, as train.resume_on_other_data=true asks" in capsys.readouterr().err
    t.close()
