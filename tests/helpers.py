"""Helpers shared by the tests: free ports, tiny training configs, running the CLI, reading MLflow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml


def require_root(what: str) -> None:
    """Skips the calling test, with one clear reason, when it needs root and the suite runs without it."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip(f"needs root ({what}); run as root, as CI does, or skip these with -m 'not slow'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = Path(__file__).parent.parent


def _when_released(target, arg, barrier, results) -> None:
    barrier.wait(timeout=60)
    results.put(target(arg))


def run_together(target, arg, processes: int, timeout: float = 300) -> list:
    """``target(arg)`` in ``processes`` spawned processes released at one moment by a barrier (the race of
    jobs started side by side); asserts every one exited cleanly and returns their results."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_when_released, args=(target, arg, barrier, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * processes
    return [results.get(timeout=5) for _ in range(processes)]


def tiny_config(tmp: Path, manifest: Path, name: str, **train) -> Path:
    cfg = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    cfg["data"].update(manifest=str(manifest), image_size=32, num_threads=1, shuffle_buffer=64,
                       train_domains=["ink", "neon"], eval_domains=["photo", "sketch"])
    cfg["augment"]["hpf_range"] = 7
    cfg["loss"].update(queue_size=64, num_clusters=4, kmeans_niter=3, kmeans_nredo=1)
    cfg["optim"]["lr"] = 0.05
    cfg["train"].update({**dict(epochs=3, batch_size=16, warmup_epochs=1, output_dir=str(tmp / name), checkpoint_every=1,
                                keep_checkpoints=5, eval_every=2, log_every=1, max_steps_per_epoch=5), **train})
    cfg["eval"].update(batch_size=128, picture_queries=2, picture_topk=3)
    cfg["tracking"].update(experiment="tiny", uri=f"sqlite:///{tmp / name / 'mlruns.db'}")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str], procs: int = 1, launcher: str = "torchrun", timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "dgucdir", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(free_port()), "-m", "dgucdir", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch/accelerate/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               "-m", "dgucdir", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def history(out_dir: Path, key: str = "train/loss") -> tuple[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out_dir / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1, "one MLflow run per job, also across a resume"
    values: dict[int, float] = {}
    for m in client.get_metric_history(runs[0].info.run_id, key):
        values[m.step] = m.value  # a step logged again after a resume keeps its last value
    return runs[0].info.run_id, values


def cli(*args, check=True):
    res = subprocess.run([sys.executable, "-m", "dgucdir", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res
