"""Training end to end: exact resume (1 and 2 processes), SIGTERM, MLflow, checkpoints, accelerate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, free_port, history, run, tiny_config

pytestmark = pytest.mark.slow  # end-to-end runs; `pytest -m "not slow"` skips them while iterating


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_manifest):
    tmp = tmp_path_factory.mktemp("full")
    run(["train", str(tiny_config(tmp, demo_manifest, "full"))])
    return tmp / "full"


def test_uninterrupted_run_tracks_everything(uninterrupted, demo_manifest):
    from mlflow.tracking import MlflowClient

    run_id, losses = history(uninterrupted)
    assert sorted(losses) == list(range(1, 16)) and all(v == v for v in losses.values())
    client = MlflowClient(f"sqlite:///{uninterrupted / 'mlruns.db'}")
    r = client.get_run(run_id)
    assert r.data.params["train.batch_size"] == "16" and r.data.params["loss.num_clusters"] == "4"
    from dgucdir.data.manifest import Manifest

    tags = r.data.tags
    assert (tags["dgucdir.precision"], tags["dgucdir.world_size"], tags["dgucdir.seed"]) == ("no", "1", "0")
    assert tags["dgucdir.train_domains"] == "ink,neon" and tags["dgucdir.eval_domains"] == "photo,sketch"
    assert tags["dgucdir.manifest_sha256"] == Manifest.load(demo_manifest).fingerprint()
    assert r.info.run_name == "full:ink+neon:seed0"
    for key in ("train/loss_rgb_phase", "train/acc_rgb_rgb", "train/lr", "train/samples_per_s", "train/data_wait_fraction",
                "eval/photo_to_sketch/P_at_1", "eval/mean/mAP_at_All"):
        assert key in r.data.metrics, key
    _, cluster = history(uninterrupted, "train/loss_cluster")
    assert min(cluster) == 6  # the cluster loss starts after the 1 warm-up epoch (5 steps)
    lr = history(uninterrupted, "train/lr")[1]
    assert lr[1] == pytest.approx(0.05) and lr[6] == pytest.approx(0.05 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 3)).item()))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts
    evals = {a.path for a in client.list_artifacts(run_id, "eval/epoch_0002")}
    assert {"eval/epoch_0002/retrieval.md", "eval/epoch_0002/retrieval.json"} <= evals
    images = [a.path for a in client.list_artifacts(run_id, "images")]  # mlflow.log_image, one per epoch
    assert sum(p.startswith("images/retrieval_photo_to_sketch+step+10+") and p.endswith(".png") for p in images) == 1, images
    assert "model/encoder.safetensors" in {a.path for a in client.list_artifacts(run_id, "model")}
    ckpts = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000000005", "ckpt-000000010", "ckpt-000000015"]
    assert r.info.status == "FINISHED"


def test_stop_at_max_steps_then_resume_is_exact(tmp_path, demo_manifest, uninterrupted):
    cfg = tiny_config(tmp_path, demo_manifest, "split")
    run(["train", str(cfg), "train.max_steps=8"])  # stops mid-epoch 1 (after clustering)
    assert (tmp_path / "split/checkpoints/ckpt-000000008").is_dir()
    run(["train", str(cfg), "--resume"])
    run_id, got = history(tmp_path / "split")
    _, want = history(uninterrupted)
    assert sorted(got) == sorted(want)
    for step in range(9, 16):
        assert got[step] == want[step], (step, got[step], want[step])
    for key in ("eval/mean/P_at_1", "train/loss_cluster"):
        assert history(tmp_path / "split", key)[1] == history(uninterrupted, key)[1]


def test_sigterm_checkpoints_and_exits_zero_then_resume_is_exact(tmp_path, demo_manifest, uninterrupted):
    cfg = tiny_config(tmp_path, demo_manifest, "sig")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dgucdir", "train", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "sig/checkpoints").glob("ckpt-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # during epoch 1
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "received SIGTERM" in out
    stopped = max(int(p.name.split("-")[1]) for p in (tmp_path / "sig/checkpoints").glob("ckpt-*"))
    assert 5 <= stopped < 15
    before = dict(history(tmp_path / "sig")[1])  # what the stopped run logged, before the resume
    assert sorted(before) == list(range(1, stopped + 1))
    run(["train", str(cfg), "--resume"])
    _, got = history(tmp_path / "sig")
    _, want = history(uninterrupted)
    # every step, before the stop as after it: a run that diverged before the signal fails here too
    assert [(s, before.get(s, got[s])) for s in range(1, 16)] == [(s, want[s]) for s in range(1, 16)]
    assert all(got[s] == want[s] for s in range(1, 16))


def test_resume_with_every_checkpoint_unreadable_is_an_error_not_a_fresh_start(tmp_path, demo_manifest, uninterrupted):
    import shutil

    from helpers import cli

    cfg = tiny_config(tmp_path, demo_manifest, "broken")
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "broken/checkpoints")
    for state in (tmp_path / "broken/checkpoints").glob("ckpt-*/state.pt"):
        state.write_bytes(state.read_bytes()[:100])  # truncated, as by a disk that lost the writes
    before = sorted(p.name for p in (tmp_path / "broken/checkpoints").iterdir())
    res = cli("train", str(cfg), "--resume", check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "none of the 3 checkpoint(s)" in res.stderr and "--overwrite" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in (tmp_path / "broken/checkpoints").iterdir()) == before  # nothing written


@pytest.fixture(scope="module")
def uninterrupted_two(tmp_path_factory, demo_manifest):
    """The tiny config trained by 2 processes without a stop: the losses a resumed 2-process run must equal."""
    tmp = tmp_path_factory.mktemp("full2")
    run(["train", str(tiny_config(tmp, demo_manifest, "full2"))], procs=2)
    return tmp / "full2"


@pytest.mark.parametrize("stop_at", [7, 10])
def test_two_processes_stop_and_resume_is_exact(tmp_path, demo_manifest, uninterrupted_two, stop_at):
    """Mid-epoch, and at the end of an evaluated epoch: there the next epoch's clustering embeds with
    the BatchNorm statistics of the checkpoint (rank 0's), which a rank only has if they are broadcast
    (found by the two-host crash test: losses differed by ~1e-4 after such a resume)."""
    split = tiny_config(tmp_path, demo_manifest, "split2")
    run(["train", str(split), f"train.max_steps={stop_at}"], procs=2)
    run(["train", str(split), "--resume"], procs=2)
    _, want = history(uninterrupted_two)
    _, got = history(tmp_path / "split2")
    assert sorted(got) == list(range(1, 16))
    for step in range(stop_at + 1, 16):
        assert got[step] == want[step], step
    # each rank wrote its own queue shard
    assert {p.name for p in (tmp_path / "split2/checkpoints/ckpt-000000015").iterdir()} == {"state.pt", "rank0.pt", "rank1.pt"}


def test_two_processes_with_the_partner_bank_resume_exactly(tmp_path, demo_manifest):
    """augment.partner=bank: each rank's checkpoint keeps its bank's sample ids, not its pixels; the resumed
    ranks decode them again, and every loss after the stop equals the uninterrupted run's."""
    from dgucdir.checkpoint import safe_load

    full = tiny_config(tmp_path, demo_manifest, "bank_full", epochs=2)
    split = tiny_config(tmp_path, demo_manifest, "bank_split", epochs=2)
    run(["train", str(full), "augment.partner=bank"], procs=2)
    run(["train", str(split), "augment.partner=bank", "train.max_steps=7"], procs=2)
    for r in (0, 1):
        bank = safe_load(tmp_path / f"bank_split/checkpoints/ckpt-000000007/rank{r}.pt")["partner_bank"]
        assert bank["written"].tolist() == [7 * 4, 7 * 4]  # 7 steps of 4 images per domain on each rank
        assert bank["ids"].dtype == torch.int64 and (bank["ids"] >= 0).sum() == 2 * 7 * 4
    run(["train", str(split), "augment.partner=bank", "--resume"], procs=2)
    _, want = history(tmp_path / "bank_full")
    _, got = history(tmp_path / "bank_split")
    assert sorted(got) == list(range(1, 11))
    for step in range(8, 11):
        assert got[step] == want[step], step


def test_accelerate_launch_two_processes_end_to_end(tmp_path, demo_manifest):
    cfg = tiny_config(tmp_path, demo_manifest, "acc", epochs=2)
    res = run(["train", str(cfg)], procs=2, launcher="accelerate")
    assert "world size 2" in res.stderr
    run_id, losses = history(tmp_path / "acc")
    assert sorted(losses) == list(range(1, 11))
    # ranks agree on the evaluation (checked by the trainer itself, which fails otherwise)
    assert "retrieval on unseen domains after epoch_0002" in res.stderr
    state = torch.load(tmp_path / "acc/checkpoints/ckpt-000000010/state.pt", weights_only=True)
    assert state["meta"]["world_size"] == 2 and state["meta"]["mlflow_run_id"] == run_id
    assert all((t >= 0).all() for t in state["clusters"]["tables"])  # every training sample has a cluster
    # resuming a finished run changes nothing and still ends cleanly
    run(["train", str(cfg), "--resume"], procs=2, launcher="accelerate")
    assert history(tmp_path / "acc")[1] == losses


def test_batch_that_does_not_split_is_an_error_before_training(tmp_path, demo_manifest):
    cfg = tiny_config(tmp_path, demo_manifest, "bad")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "dgucdir", "train", str(cfg), "train.batch_size=18"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "train.batch_size=18 must be divisible by n_domains x world_size = 2 x 2 = 4" in res.stderr
    assert not (tmp_path / "bad/checkpoints").exists()


def test_tracker_logs_nothing_after_its_run_ended(tmp_path, monkeypatch):
    """MLflow opens a new run for metrics logged with none active; the tracker must not let that happen."""
    from mlflow.tracking import MlflowClient

    from dgucdir.config import load_config
    from dgucdir.tracking import Tracker

    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; scoped here so later subprocesses don't inherit it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "tracking.experiment=tiny"])
    tracker = Tracker(cfg, active=True)
    tracker.start()
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.end()
    tracker.log_metrics({"a": 2.0}, step=2)
    client = MlflowClient(tracker.uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and [m.value for m in client.get_metric_history(runs[0].info.run_id, "a")] == [1.0]


def test_a_stop_on_the_very_last_step_is_a_finished_run_and_every_step_is_logged(tmp_path, demo_manifest):
    """max_steps falling on the last step used to record KILLED; steps after the last log were never logged."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, demo_manifest, "last", epochs=2, max_steps_per_epoch=3, log_every=2, eval_every=1,
                      max_steps=6)
    res = run(["train", str(cfg)])
    run_id, losses = history(tmp_path / "last")
    assert sorted(losses) == [2, 3, 4, 6]  # 3: the end of epoch 0 flushes its last step
    assert MlflowClient(f"sqlite:///{tmp_path / 'last/mlruns.db'}").get_run(run_id).info.status == "FINISHED"
    assert "retrieval on unseen domains after epoch_0002" in res.stderr
    assert "stopped at epoch" not in res.stderr


def test_metric_window_means_across_steps_and_refuses_non_finite():
    from dgucdir.metric_window import MetricWindow

    window = MetricWindow()
    window.add({"loss": torch.tensor(1.0), "acc": torch.tensor(0.5)})
    window.add({"loss": torch.tensor(3.0), "acc": torch.tensor(1.0)})
    got = window.reduce(global_step=2, samples_per_step=10, data_wait_s=0.0)
    assert got["train/loss"] == 2.0 and got["train/acc"] == 0.75 and got["train/samples_per_s"] > 0
    assert window.steps == 0  # a new window
    window.add({"loss": torch.tensor(float("nan")), "acc": torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match="non-finite train/loss in the steps up to global step 3"):
        window.reduce(global_step=3, samples_per_step=10, data_wait_s=0.0)


def test_a_folder_with_checkpoints_is_not_started_over_by_accident(tmp_path, demo_manifest):
    cfg = tiny_config(tmp_path, demo_manifest, "again", epochs=1, max_steps_per_epoch=3, eval_every=5)
    run(["train", str(cfg), "train.max_steps=2"])
    res = subprocess.run([sys.executable, "-m", "dgucdir", "train", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 2 and "already holds checkpoints (ckpt-000000002): --resume" in res.stderr
    assert [p.name for p in (tmp_path / "again/checkpoints").iterdir()] == ["ckpt-000000002"]  # untouched
    res = run(["train", str(cfg), "train.epochs=2", "--resume"])  # a changed config is named on resume
    assert "resuming" in res.stderr and "train.epochs: 1 -> 2" in res.stderr and "train.max_steps: 2 -> None" in res.stderr
    assert sorted(history(tmp_path / "again")[1]) == [1, 2, 3, 4, 5, 6]
    run(["train", str(cfg), "train.max_steps=1", "--overwrite"])
    assert [p.name for p in (tmp_path / "again/checkpoints").iterdir()] == ["ckpt-000000001"]


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs: room for two checkpoints of the tiny config (16 MB each) and not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); test_checkpoint.py injects ENOSPC instead")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_training_resumable_and_resume_is_exact(tmp_path, small_disk, demo_manifest, uninterrupted):
    cfg = tiny_config(tmp_path, demo_manifest, "full-disk", output_dir=str(small_disk / "run"))
    uri = f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"  # the store elsewhere: only checkpoints fill the disk
    res = subprocess.run([sys.executable, "-m", "dgucdir", "train", str(cfg), uri], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 75, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    ckpts = small_disk / "run/checkpoints"
    assert last.startswith("dgucdir train: error: checkpoint ckpt-000000015 not written: no space left on device in "
                           f"{ckpts} (it needs about 15.4 MiB (the last checkpoint's size);"), last
    assert last.endswith(f"MiB free); resume from {ckpts / 'ckpt-000000010'} with --resume once there is room")
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt-000000005", "ckpt-000000010"]  # no .tmp-ckpt-* left
    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
    run(["train", str(cfg), uri, "--resume"])
    _, got = history(tmp_path)
    _, want = history(uninterrupted)
    assert sorted(got) == list(range(1, 16))
    for step in range(11, 16):
        assert got[step] == want[step], step
    assert history(tmp_path, "eval/mean/P_at_1")[1] == history(uninterrupted, "eval/mean/P_at_1")[1]
