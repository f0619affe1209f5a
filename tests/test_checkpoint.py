"""Atomic checkpoints: pruning, and falling back from an unreadable latest one."""

import logging

import torch

from dgucdir import checkpoint


def test_keep_last_n_and_fallback_from_truncated(tmp_path, caplog):
    for step in (10, 20, 30, 40):
        checkpoint.save(tmp_path, step, {"step": step}, {"queue": torch.full((3,), step)}, keep=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000000020", "ckpt-000000030", "ckpt-000000040"]
    assert not list(tmp_path.glob(".tmp-*"))
    path, shared, own = checkpoint.load(tmp_path)
    assert shared["step"] == 40 and own["queue"].tolist() == [40] * 3
    latest = tmp_path / "ckpt-000000040" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:20])  # truncated
    with caplog.at_level(logging.WARNING):
        path, shared, own = checkpoint.load(tmp_path)
    assert path.name == "ckpt-000000030" and shared["step"] == 30
    assert "cannot read checkpoint" in caplog.text and "instead of the unreadable" in caplog.text
    (tmp_path / "ckpt-000000030" / "rank0.pt").unlink()  # a missing rank file counts as unreadable too
    assert checkpoint.load(tmp_path)[1]["step"] == 20


def test_no_checkpoint_gives_none(tmp_path):
    assert checkpoint.load(tmp_path / "nothing") is None
