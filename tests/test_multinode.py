"""Two real hosts (scripts/cluster.sh: two network + UTS namespaces, one slurmd each): training across
hosts is distributed-exact, and it survives a killed rank and a lost node.

Every run is compared step by step with a 2-process run of the same config on one host.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, free_port, history, run, tiny_config, require_root

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts/cluster.sh"
CLUSTER_DIR = "/tmp/dgucdir-cluster-test"
ENV = {**os.environ, "DGUCDIR_CLUSTER_DIR": CLUSTER_DIR, "DGUCDIR_CLUSTER_PREFIX": "dgucdir-test",
       "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def cluster(*args: str, timeout: int = 120, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", str(SCRIPT), *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def on(host: str, *cmd: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    return cluster("exec", host, *cmd, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def hosts():
    require_root("two hosts made of network namespaces, and SLURM installed by apt")
    up = cluster("up", timeout=600, check=False)
    if up.returncode != 0:
        pytest.fail(f"could not start the two-host cluster:\n{up.stdout}\n{up.stderr}")
    yield
    cluster("down")
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "dgucdir-test-" not in namespaces and not Path(CLUSTER_DIR).exists()  # nothing left behind
    assert not any(p.name.startswith("dgucdir-test-") for p in Path("/etc/netns").glob("*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_manifest):
    """The same config trained by 2 processes on one host: the losses every multi-host run must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny_config(tmp, demo_manifest, "ref", epochs=6, collective_timeout_s=20)
    run(["train", str(cfg)], procs=2)
    return history(tmp / "ref")[1]


def submit(cfg: Path, logs: Path, *extra: str) -> subprocess.CompletedProcess:
    return on("node0", sys.executable, "-m", "launch.slurm", str(cfg), "--cpu", "--nodes", "2", "--gpus-per-node", "1",
              "--cpus-per-task", "1", "--mem-gb", "0", "--time", "20", "--folder", str(logs), "--cluster", "slurm",
              *extra, timeout=400)


def job_state(job_id: str) -> str:
    return on("node0", "scontrol", "-o", "show", "job", job_id).stdout


def wait_for(predicate, what: str, timeout: float = 240, every: float = 0.3, explain=lambda: ""):
    """``predicate()`` once it is truthy; on timeout the test fails with ``explain()`` (logs to read)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}\n{explain()}")


def test_one_rank_on_each_host_trains_exactly_as_two_processes_on_one(hosts, tmp_path, demo_manifest, reference):
    cfg = tiny_config(tmp_path, demo_manifest, "job", epochs=6, collective_timeout_s=20)
    res = submit(cfg, tmp_path / "logs", "--wait")
    results = [eval(line.split(": ", 1)[1]) for line in res.stdout.splitlines() if line.startswith("job ")]
    ranks = {r["rank"]: r for r in results[0]}
    assert {ranks[0]["hostname"], ranks[1]["hostname"]} == {"node0", "node1"}
    # rendezvous at node0's address, which exists only inside the two namespaces
    assert ranks[0]["master"] == ranks[1]["master"] == "node0 (10.77.0.1)"
    assert all(r["finished"] for r in ranks.values())
    run_id, losses = history(tmp_path / "job")  # one MLflow run, logged by rank 0
    assert ranks[0]["mlflow_run_id"] == run_id
    assert losses == reference  # step by step, exactly: the system is distributed-exact across hosts


def test_accelerate_launch_on_two_machines_without_slurm(hosts, tmp_path, demo_manifest, reference):
    cfg = tiny_config(tmp_path, demo_manifest, "acc", epochs=6, collective_timeout_s=20)
    port = str(free_port())
    procs = [subprocess.Popen(["bash", str(SCRIPT), "exec", host, sys.executable, "-m", "accelerate.commands.launch",
                               "--config_file", str(REPO / "launch/accelerate/cpu_2node.yaml"), "--machine_rank", str(i),
                               "--main_process_ip", "node0", "--main_process_port", port,
                               "-m", "dgucdir", "train", str(cfg)],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, host in enumerate(["node0", "node1"])]
    try:
        outputs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert history(tmp_path / "acc")[1] == reference


def training_pid(host: str) -> int:
    """The pid of the training process (submitit's task) running on ``host``, if any."""
    out = on(host, "sh", "-c", f"for p in $(ip netns pids dgucdir-test-{host}); do "
             "tr '\\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q submitit.core._submit && echo $p; done",
             check=False).stdout.split()
    return int(out[0]) if out else 0


def latest_step(out_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (out_dir / "checkpoints").glob("ckpt-*")]
    return max(steps, default=0)


def test_a_killed_rank_fails_the_job_fast_and_a_resubmission_resumes_exactly(hosts, tmp_path, demo_manifest, reference):
    """kill -9 of the rank on node1 mid-run: rank 0 does not hang (it fails within the collective
    timeout, naming rank 1), and the same job submitted again resumes from the last complete checkpoint."""
    cfg = tiny_config(tmp_path, demo_manifest, "crash", epochs=6, collective_timeout_s=20)
    job_id = re.search(r"submitted job (\d+)", submit(cfg, tmp_path / "logs").stdout).group(1)
    wait_for(lambda: latest_step(tmp_path / "crash") >= 10, "a checkpoint after two epochs")
    killed_at = time.time()
    os.kill(wait_for(lambda: training_pid("node1"), "the rank on node1"), signal.SIGKILL)
    state = wait_for(lambda: (s := job_state(job_id)) and re.search(r"JobState=(FAILED|COMPLETED|CANCELLED)", s) and s,
                     "the job to end", timeout=60)
    assert time.time() - killed_at < 20 + 15  # the collective timeout, plus SLURM's KillWait and polling
    assert "JobState=FAILED" in state
    log0 = (tmp_path / "logs" / job_id / f"{job_id}_0_log.err").read_text()
    assert re.search(r"rank 0 \(node0\): lost rank 1 on node1 \(10\.77\.0\.2\)", log0), log0[-3000:]
    stopped_at = latest_step(tmp_path / "crash")
    assert stopped_at < 30
    res = submit(cfg, tmp_path / "logs", "--wait")
    assert "'finished': True" in res.stdout
    again = re.search(r"submitted job (\d+)", res.stdout).group(1)
    log = (tmp_path / "logs" / again / f"{again}_0_log.err").read_text()
    assert re.search(rf"resumed from .*ckpt-0+{stopped_at}: epoch", log)
    assert history(tmp_path / "crash")[1] == reference


def tails(*paths: Path, chars: int = 3000) -> str:
    """The ends of the logs a failure should show (job logs, the cluster's daemon logs)."""
    return "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-chars:]}" for p in paths if p.exists())


def test_a_lost_node_requeues_the_job_which_waits_for_it_and_resumes_exactly(hosts, tmp_path, demo_manifest, reference):
    """node1 dies (its slurmd and every process on it killed, the node set DOWN) mid-run: SLURM
    requeues the job, which waits for a second node, and resumes exactly once node1 is back.

    node1 comes back drained and is resumed only after SLURM has told it that the job's first run
    is over (scripts/cluster.sh node-up): that message, sent when its slurmd re-registers, would
    otherwise kill the restarted task on node1 if the job started again within the same second."""
    cfg = tiny_config(tmp_path, demo_manifest, "lost", epochs=6, collective_timeout_s=20)
    job_id = re.search(r"submitted job (\d+)", submit(cfg, tmp_path / "logs").stdout).group(1)
    wait_for(lambda: latest_step(tmp_path / "lost") >= 10, "a checkpoint after two epochs")
    cluster("node-down", "node1")
    stopped_at = latest_step(tmp_path / "lost")
    wait_for(lambda: "JobState=PENDING" in job_state(job_id), "the job to be requeued", timeout=90)
    on("node0", "scontrol", "update", f"JobId={job_id}", "StartTime=now")  # skip SLURM's requeue hold-back
    time.sleep(3)
    state = job_state(job_id)  # eligible, but one node is not enough: it waits for nodes
    assert "JobState=PENDING" in state and "Reason=BeginTime" not in state, state
    cluster("node-up", "node1")
    logs = [tmp_path / "logs" / job_id / f"{job_id}_{rank}_log.{kind}" for rank in (0, 1) for kind in ("err", "out")]

    def explain() -> str:
        return tails(*logs, *sorted(Path(CLUSTER_DIR, "log").glob("*.log")))

    def ended() -> bool:  # fails at once, with the logs, if the requeued job fails
        state = job_state(job_id)
        if re.search(r"JobState=(FAILED|CANCELLED|TIMEOUT|NODE_FAIL)", state):
            pytest.fail(f"the requeued job did not complete: {state}\n{explain()}")
        return "JobState=COMPLETED" in state

    wait_for(ended, "the requeued job to complete", timeout=300, every=1, explain=explain)
    assert int(re.search(r"Restarts=(\d+)", job_state(job_id)).group(1)) >= 1
    log = logs[0].read_text()
    resumed = re.findall(r"resumed from .*ckpt-0+(\d+): epoch", log)
    assert resumed and int(resumed[-1]) >= stopped_at
    assert history(tmp_path / "lost")[1] == reference
