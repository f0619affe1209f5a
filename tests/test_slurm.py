"""The SLURM launcher against a real one-node SLURM (scripts/slurm_cluster.sh), CPU tasks on gloo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, history, tiny_config, require_root

pytestmark = pytest.mark.slow  # end-to-end runs; `pytest -m "not slow"` skips them while iterating


@pytest.fixture(scope="module")
def slurm_env():
    """Brings the private cluster up (installing Debian's slurm-wlm and munge if needed)."""
    require_root("a private SLURM cluster: apt installs slurm-wlm and munge, slurmctld runs as root")
    script = REPO / "scripts/slurm_cluster.sh"
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"could not start the test SLURM cluster:\n{up.stdout}\n{up.stderr}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for line in subprocess.run(["bash", str(script), "env"], capture_output=True, text=True).stdout.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.replace("$PATH", os.environ["PATH"])
    yield env
    subprocess.run(["bash", str(script), "down"], capture_output=True, timeout=120)


def submit(env, cfg: Path, folder: Path, *extra: str, wait: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.slurm", str(cfg), "--cpu", "--nodes", "1", "--gpus-per-node", "2",
           "--cpus-per-task", "1", "--mem-gb", "0", "--time", "20", "--folder", str(folder), "--cluster", "slurm",
           *extra]
    if wait:
        cmd.append("--wait")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_two_tasks_train_to_the_end(slurm_env, tmp_path, demo_manifest):
    cfg = tiny_config(tmp_path, demo_manifest, "job", epochs=2)
    res = submit(slurm_env, cfg, tmp_path / "logs")
    assert "'finished': True" in res.stdout and "'world_size': 2" in res.stdout
    run_id, losses = history(tmp_path / "job")
    assert sorted(losses) == list(range(1, 11))
    assert f"'mlflow_run_id': '{run_id}'" in res.stdout


def interrupt_and_wait(env, tmp_path, demo_manifest, name: str, interrupt: list[str]) -> tuple[str, int]:
    """Submits an 8-epoch job, runs ``interrupt`` (with the job id appended) once it has a checkpoint,
    and waits until the restarted job completes; returns (rank-0 log, checkpoint step at the stop)."""
    cfg = tiny_config(tmp_path, demo_manifest, name, epochs=8)
    res = submit(env, cfg, tmp_path / "logs", wait=False)
    job_id = re.search(r"submitted job (\d+)", res.stdout).group(1)
    ckpts = tmp_path / name / "checkpoints"
    deadline = time.time() + 300
    while not list(ckpts.glob("ckpt-*")) and time.time() < deadline:
        time.sleep(0.1)
    subprocess.run([*interrupt, job_id], env=env, check=True)
    stopped_at = None
    while time.time() < deadline:
        state = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
        restarts = int(re.search(r"Restarts=(\d+)", state).group(1))
        if stopped_at is None and restarts >= 1 and "JobState=PENDING" in state:
            stopped_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("ckpt-*"))
            # SLURM holds a requeued job back for about two minutes; the test need not wait for that
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=True)
        if restarts >= 1 and "JobState=COMPLETED" in state:
            break
        assert "JobState=FAILED" not in state and "JobState=CANCELLED" not in state, state
        time.sleep(0.5)
    else:
        pytest.fail("job did not complete after the interruption")
    assert stopped_at is not None
    return (tmp_path / "logs" / job_id / f"{job_id}_0_log.err").read_text(), stopped_at


def _check_resumed_run(out_dir: Path, log: str, stopped_at: int) -> None:
    resumed = re.search(r"resumed from .*ckpt-0+(\d+): epoch", log)
    assert resumed and int(resumed.group(1)) == stopped_at and 5 <= stopped_at < 40
    run_id, losses = history(out_dir)  # one MLflow run across the requeue
    assert sorted(losses) == list(range(1, 41))
    from mlflow.tracking import MlflowClient

    assert MlflowClient(f"sqlite:///{out_dir / 'mlruns.db'}").get_run(run_id).info.status == "FINISHED"


def test_requeue_mid_training_resumes_in_the_same_run(slurm_env, tmp_path, demo_manifest):
    """Preemption: `scontrol requeue` sends SIGTERM; the trainer checkpoints, exits 0, and resumes."""
    log, stopped_at = interrupt_and_wait(slurm_env, tmp_path, demo_manifest, "requeue", ["scontrol", "requeue"])
    assert "received SIGTERM" in log and "checkpoint" in log
    _check_resumed_run(tmp_path / "requeue", log, stopped_at)


def test_time_limit_signal_checkpoints_then_submitit_requeues(slurm_env, tmp_path, demo_manifest):
    """Before a time limit SLURM sends USR2: all ranks stop at one step, checkpoint, and rank 0 hands
    over to submitit, which calls TrainJob.checkpoint() and requeues the job."""
    log, stopped_at = interrupt_and_wait(slurm_env, tmp_path, demo_manifest, "usr2", ["scancel", "--signal=USR2"])
    assert "Caught signal SIGUSR2" in log and "Exiting gracefully after preemption/timeout" in log
    _check_resumed_run(tmp_path / "usr2", log, stopped_at)


def dry_run(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "launch.slurm", str(REPO / "configs/pacs.yaml"), "model.moco_init=none",
                          "--dry-run", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_dry_run_prints_a_multi_node_sbatch_script(tmp_path):
    script = dry_run("--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj", "--qos", "high",
                     "--constraint", "h100", "--mem-gb", "400", "--time", "600", "--folder", str(tmp_path),
                     "--sbatch", "reservation=r1", "--setup", "module load cuda/12")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=h100", "#SBATCH --mem=400GB",
                 "#SBATCH --time=600", "#SBATCH --signal=USR2@120", "#SBATCH --reservation=r1", "module load cuda/12",
                 "srun "):
        assert line in script, line
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written
    default = dry_run("--nodes", "1", "--gpus-per-node", "4")
    assert "#SBATCH --mem=128GB" in default  # launch.mem_gb_per_task (32) x 4 tasks
    assert f"{sys.executable} -u -m submitit.core._submit" in default
    container = dry_run("--python", "apptainer exec --nv img.sif python")
    assert "srun --unbuffered --output" in container and "apptainer exec --nv img.sif python -u -m submitit.core._submit" in container
    assert f"#SBATCH --output={(REPO / 'runs/pacs/slurm').resolve()}/%j" in default  # logs next to the run


def test_sweep_names_are_unique_and_values_keep_their_spaces():
    from dgucdir.submit import slug, sweep_overrides

    assert slug(["optim.lr=0.1"]) != slug(["optim.lr=1.1"])
    assert slug(["optim.lr=0.1"]).startswith("lr-0.1-")
    jobs = sweep_overrides(["train.epochs=5"], ["tracking.run_name=a b;c"], [["data.train_domains=[x,y]"]])
    assert jobs == [["train.epochs=5", "tracking.run_name=a b", "data.train_domains=[x,y]"],
                    ["train.epochs=5", "tracking.run_name=c", "data.train_domains=[x,y]"]]


def test_domain_pair_sweep_gives_one_job_per_split():
    def jobs(*args: str) -> list[str]:
        res = subprocess.run([sys.executable, "-m", "dgucdir", "submit", str(REPO / "configs/pacs.yaml"), "--dry-run",
                              *args, "model.moco_init=none"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return [line for line in res.stdout.splitlines() if line.startswith("# job:")]

    every = jobs("--domain-pairs")
    assert len(every) == 6  # C(4, 2) training pairs of PACS
    assert len({re.search(r"train.output_dir=(\S+)", j).group(1) for j in every}) == 6
    named = jobs("--split", "photo,sketch", "--split", "cartoon,art_painting")
    assert len(named) == 2
    assert "data.train_domains=[photo,sketch] data.eval_domains=[art_painting,cartoon]" in named[0]
    assert "data.train_domains=[cartoon,art_painting] data.eval_domains=[photo,sketch]" in named[1]
    bad = subprocess.run([sys.executable, "-m", "dgucdir", "submit", str(REPO / "configs/pacs.yaml"), "--dry-run",
                          "--split", "photo,clipart", "model.moco_init=none"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--split photo,clipart: expected distinct training domains" in bad.stderr


def test_a_sweep_shares_one_store_under_a_parent_run_and_tabulates(slurm_env, tmp_path, demo_manifest):
    """2 splits x 2 seeds through SLURM: one store, a parent run with 4 tagged children, the paper table."""
    import json
    import statistics

    from mlflow.tracking import MlflowClient

    cfg = tiny_config(tmp_path, demo_manifest, "sweep", epochs=1, max_steps_per_epoch=3, eval_every=1)
    res = submit(slurm_env, cfg, tmp_path / "logs", "--split", "ink,neon", "--split", "photo,sketch",
                 "--sweep", "train.seed=0;1")
    assert res.stdout.count("'finished': True") == 8  # 4 jobs x 2 ranks
    sweep = re.search(r"dgucdir runs --sweep (\S+)", res.stdout).group(1)
    uri = f"sqlite:///{tmp_path / 'sweep' / 'mlruns.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("dgucdir.sweep_parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and len(children) == 4 and len(runs) == 5
    tags = [r.data.tags for r in children]
    assert sorted((t["dgucdir.train_domains"], t["dgucdir.eval_domains"], t["dgucdir.seed"]) for t in tags) == [
        ("ink,neon", "photo,sketch", "0"), ("ink,neon", "photo,sketch", "1"),
        ("photo,sketch", "ink,neon", "0"), ("photo,sketch", "ink,neon", "1")]
    for t in tags:
        assert t["dgucdir.sweep"] == sweep and t["dgucdir.world_size"] == "2" and t["dgucdir.precision"] == "no"
        assert t["slurm.array_job_id"] and t["slurm.array_task_id"] in {"0", "1", "2", "3"} and t["slurm.job_id"]
        assert len(t["mlflow.source.git.commit"]) == 40 and t["dgucdir.git_dirty"] in {"True", "False"}
        assert len(t["dgucdir.manifest_sha256"]) == 64 and t["dgucdir.torch"] and t["dgucdir.dali"]
    png = tmp_path / "sweep.png"
    table = subprocess.run([sys.executable, "-m", "dgucdir", "runs", "--uri", uri, "--sweep", sweep, "--json",
                            "--png", str(png)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    got = json.loads(table.stdout.split("\npicture:")[0])["table"]
    assert set(got) == {"ink+neon", "photo+sketch"}
    for split, unseen in (("ink+neon", ("photo", "sketch")), ("photo+sketch", ("ink", "neon"))):
        pairs = {f"{unseen[0]}_to_{unseen[1]}", f"{unseen[1]}_to_{unseen[0]}"}
        assert set(got[split]) == pairs | {"mean"}
        finals = [100 * r.data.metrics["eval/mean/P_at_1"] for r in children
                  if r.data.tags["dgucdir.train_domains"] == split.replace("+", ",")]
        assert got[split]["mean"]["n"] == 2
        assert got[split]["mean"]["mean"] == pytest.approx(statistics.fmean(finals))
        assert got[split]["mean"]["std"] == pytest.approx(statistics.stdev(finals))
    assert png.stat().st_size > 10_000
    logged = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"sweep.png", "results_P_at_1.md"} <= logged
