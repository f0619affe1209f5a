"""Atomic checkpoints over stateful objects: pruning, restoring, falling back from an unreadable latest one."""

import logging

import pytest
import torch

from dgucdir import checkpoint
from dgucdir.checkpoint import Checkpointer, StateFns
from dgucdir.errors import CheckpointError


class Box:
    """A stateful object holding one value."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def meta(step):
    return {"world_size": 1, "config": {}, "mlflow_run_id": f"run-{step}"}


def test_keep_last_n_restore_and_fallback_from_truncated(tmp_path, caplog):
    shared, queue = Box(), {"q": None}
    ckpt = Checkpointer(tmp_path, {"shared": shared},
                        {"queue": StateFns(lambda: {"q": queue["q"]}, lambda s: queue.update(q=s["q"]))}, keep=3)
    for step in (10, 20, 30, 40):
        shared.value, queue["q"] = step, torch.full((3,), step)
        ckpt.save(step, meta(step))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000000020", "ckpt-000000030", "ckpt-000000040"]
    assert not list(tmp_path.glob(".tmp-*"))
    shared.value, queue["q"] = None, None
    path, m = ckpt.load()
    assert path.name == "ckpt-000000040" and m["mlflow_run_id"] == "run-40"
    assert shared.value == 40 and queue["q"].tolist() == [40] * 3
    latest = tmp_path / "ckpt-000000040" / "state.pt"
    latest.write_bytes(latest.read_bytes()[:20])  # truncated
    with caplog.at_level(logging.WARNING):
        path, _ = ckpt.load()
    assert path.name == "ckpt-000000030" and shared.value == 30 and queue["q"].tolist() == [30] * 3
    assert "cannot read checkpoint" in caplog.text and "instead of the unreadable" in caplog.text
    (tmp_path / "ckpt-000000030" / "rank0.pt").unlink()  # a missing rank file counts as unreadable too
    ckpt.load()
    assert shared.value == 20


def test_a_checkpoint_without_a_piece_of_state_is_skipped(tmp_path):
    old = Checkpointer(tmp_path, {"model": Box(1)}, {}, keep=3)
    old.save(5, meta(5))
    new = Checkpointer(tmp_path, {"model": Box(), "clusters": Box()}, {}, keep=3)
    assert new.load() is None  # written before 'clusters' existed: not half-restored
    with pytest.raises(CheckpointError, match="unreadable on at least one rank"):
        new.load(tmp_path / "ckpt-000000005")


def test_world_size_mismatch_is_a_clear_error(tmp_path):
    ckpt = Checkpointer(tmp_path, {"model": Box(1)}, {}, keep=3)
    ckpt.save(5, {**meta(5), "world_size": 4})
    with pytest.raises(CheckpointError, match="written by 4 ranks; this job has 1"):
        ckpt.load()


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(tmp_path / "nothing", {"model": Box()}, {}, keep=1).load() is None


def test_a_checkpoint_left_unfinished_by_a_dead_rank_is_skipped_with_a_warning(tmp_path, caplog):
    """A node that dies while the ranks write ckpt-50 leaves .tmp-ckpt-000000050 with only some files:
    resuming takes the last complete one, says so, and clears the leftover."""
    box = Box()
    ckpt = Checkpointer(tmp_path, {"shared": box}, {}, keep=3)
    box.value = 40
    ckpt.save(40, meta(40))
    half = tmp_path / ".tmp-ckpt-000000050"
    half.mkdir()
    torch.save({"value": 50}, half / "rank0.pt")  # rank 0's part, no state.pt: the rest never came
    box.value = None
    with caplog.at_level(logging.WARNING):
        path, _ = ckpt.load()
    assert path.name == "ckpt-000000040" and box.value == 40
    assert "skipping the unfinished checkpoint" in caplog.text and ".tmp-ckpt-000000050" in caplog.text
    assert not half.exists()
