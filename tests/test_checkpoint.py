"""Atomic checkpoints over stateful objects: pruning, restoring, falling back from an unreadable latest one."""

import logging
from pathlib import Path

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
    with pytest.raises(CheckpointError, match=r"none of the 1 checkpoint\(s\) .*ckpt-000000005.* --overwrite"):
        new.load()  # written before 'clusters' existed: not half-restored, and not a silent fresh start
    assert new.shared["model"].value is None and new.shared["clusters"].value is None
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


# ---------------------------------------------------------------- safe to open
def test_process_rng_round_trips_through_the_safe_loader(tmp_path):
    """The RNG states are plain tensors and values: read with weights_only, every generator continues as before."""
    import random

    import numpy as np

    from dgucdir.seeding import ProcessRNG

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state too
    checkpoint._atomic_save({"rng": ProcessRNG().state_dict()}, tmp_path / "rank0.pt")
    want = (random.random(), np.random.normal(), torch.rand(2).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ProcessRNG().load_state_dict(checkpoint.safe_load(tmp_path / "rank0.pt")["rng"])
    assert (random.random(), np.random.normal(), torch.rand(2).tolist()) == want


def test_a_rank_file_of_the_previous_format_is_still_read_safely(tmp_path):
    """Version 0.1 pickled numpy's state as an ndarray: read through the numpy allow-list, not weights_only=False."""
    import numpy as np

    from dgucdir.seeding import ProcessRNG

    np.random.seed(5)
    torch.save({"rng": {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, tmp_path / "old.pt")
    want = np.random.rand(3).tolist()
    np.random.seed(0)
    ProcessRNG().load_state_dict(checkpoint.safe_load(tmp_path / "old.pt")["rng"])
    assert np.random.rand(3).tolist() == want


class CreatesFile:
    """Unpickled, it opens (creates) ``path``: what a malicious checkpoint could do with any callable."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_the_safe_loader_refuses_a_pickle_that_runs_code(tmp_path):
    live = tmp_path / "live"
    torch.save({"meta": CreatesFile(live)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)  # noqa: S614 - proves the payload really runs
    assert live.exists()
    marker = tmp_path / "marker"
    torch.save({"meta": CreatesFile(marker)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state.pt: refused by the safe loader.*GLOBAL _?io.open") as info:
        checkpoint.read_shared(tmp_path / "state.pt")
    assert "\n" not in str(info.value) and not marker.exists()


def test_a_refused_latest_checkpoint_is_an_error_not_a_fallback(tmp_path):
    """Resuming must not quietly skip a crafted file and restart from an older state (or from scratch)."""
    box = Box(10)
    ckpt = Checkpointer(tmp_path, {"shared": box}, {}, keep=3)
    ckpt.save(10, meta(10))
    crafted = tmp_path / "ckpt-000000020"
    crafted.mkdir()
    torch.save({"meta": CreatesFile(tmp_path / "marker")}, crafted / "state.pt")
    with pytest.raises(CheckpointError, match="refused by the safe loader"):
        ckpt.load()
    assert box.value == 10 and not (tmp_path / "marker").exists()


# ---------------------------------------------------------------- safe to write
def _fail_like_a_full_disk(monkeypatch, on_file: str) -> None:
    """torch.save raising as it does on a full disk: its zip writer's RuntimeError over the OSError."""
    import errno

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(f.name).name == f".{on_file}.tmp":
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    from dgucdir.errors import EXIT_RESUMABLE, CheckpointSpaceError

    box = Box(torch.zeros(1000))
    ckpt = Checkpointer(tmp_path, {"shared": box}, {"own": Box(1)}, keep=1)
    ckpt.save(10, meta(10))
    size = checkpoint.folder_bytes(tmp_path / "ckpt-000000010")
    _fail_like_a_full_disk(monkeypatch, "state.pt")
    box.value = torch.ones(1000)
    with pytest.raises(CheckpointSpaceError) as info:
        ckpt.save(20, meta(20))
    message = str(info.value)
    assert info.value.exit_code == EXIT_RESUMABLE and "\n" not in message
    assert "checkpoint ckpt-000000020 not written: no space left on device" in message
    assert f"about {size / 2**20:.1f} MiB" in message and "MiB free" in message
    assert f"resume from {tmp_path / 'ckpt-000000010'}" in message
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000010"]  # no .tmp-ckpt-*, the last one kept
    box.value = None
    ckpt.load()
    assert torch.equal(box.value, torch.zeros(1000))


def test_other_write_errors_keep_their_own_exception(tmp_path, monkeypatch):
    def broken(obj, f, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(PermissionError):
        Checkpointer(tmp_path, {"shared": Box(1)}, {}, keep=1).save(5, meta(5))
    assert not list(tmp_path.iterdir())


def _rank1_runs_out_of_space(root: str) -> str:
    """On 2 gloo ranks: rank 1's write fails for space; both ranks raise, the folder is cleaned."""
    import errno

    import torch.distributed as tdist

    from dgucdir.errors import CheckpointSpaceError

    real = torch.save

    def save(obj, f, *args, **kwargs):
        if tdist.get_rank() == 1:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real(obj, f, *args, **kwargs)

    torch.save = save
    ckpt = Checkpointer(Path(root), {"shared": Box(1)}, {"own": Box(tdist.get_rank())}, keep=2)
    try:
        ckpt.save(7, meta(7))
    except CheckpointSpaceError as exc:
        return str(exc)
    finally:
        torch.save = real
    return "saved"


def test_a_full_disk_on_another_rank_stops_every_rank(tmp_path):
    from distributed import run_distributed

    msg0, msg1 = run_distributed(_rank1_runs_out_of_space, 2, str(tmp_path))
    assert msg1.startswith("checkpoint ckpt-000000007 not written: disk quota exceeded")
    assert msg0.startswith("checkpoint ckpt-000000007 not written: another rank ran out of space")
    assert "no earlier checkpoint" in msg0 and not list(tmp_path.iterdir())


def test_a_start_without_room_for_one_checkpoint_warns(tmp_path, monkeypatch, caplog):
    ckpt = Checkpointer(tmp_path / "ckpts", {"shared": Box(1)}, {}, keep=1)
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 3 * 2**20)
    with caplog.at_level(logging.WARNING):
        ckpt.warn_if_short_of_space(2 * 2**20)
    assert not caplog.records  # 2 MiB fits in 3
    with caplog.at_level(logging.WARNING):
        ckpt.warn_if_short_of_space(5 * 2**20)
    assert "only 3.0 MiB free for checkpoints" in caplog.text and "about 5.0 MiB" in caplog.text


def _resume_counting_reads(root: str) -> tuple[int, int, int]:
    """On 2 gloo ranks: save, then load, counting this rank's reads of the shared state.pt."""
    import torch.distributed as tdist

    rank = tdist.get_rank()
    Checkpointer(Path(root), {"shared": Box(41)}, {"own": Box(rank)}, keep=2).save(3, {**meta(3), "world_size": 2})
    reads = []
    real = checkpoint.safe_load
    checkpoint.safe_load = lambda path: (reads.append(Path(path).name), real(path))[1]
    shared, own = Box(), Box()
    try:
        Checkpointer(Path(root), {"shared": shared}, {"own": own}, keep=2).load()
    finally:
        checkpoint.safe_load = real
    return reads.count(checkpoint.SHARED), shared.value, own.value


def test_a_resume_reads_the_shared_state_once_on_rank_0_and_broadcasts_it(tmp_path):
    from distributed import run_distributed

    (reads0, shared0, own0), (reads1, shared1, own1) = run_distributed(_resume_counting_reads, 2, str(tmp_path))
    assert (reads0, reads1) == (1, 0)  # not W reads of the large file from the shared filesystem
    assert shared0 == shared1 == 41 and (own0, own1) == (0, 1)
