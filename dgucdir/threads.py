"""One thread budget per rank: how many cores DALI and torch may use, decided in one place.

A rank's DALI pipelines (one per training domain, all prefetching at once) and torch's intra-op
pool otherwise size themselves without each other: torch takes every core of the machine, so 8
ranks on a 64-core node would run 8 x 64 torch threads beside their pipelines' workers, and two
test workers on two cores the same in miniature.
The budget starts from the cores this process may run on (``os.sched_getaffinity``), takes
SLURM's ``--cpus-per-task`` when the job has one (a task's own share), otherwise divides by the
ranks launched on this host (``LOCAL_WORLD_SIZE``, set by accelerate/torchrun and by
``dgucdir submit``), by the test workers (``PYTEST_XDIST_WORKER_COUNT``) when under pytest-xdist, and
by the trainings `dgucdir ablate/select --jobs` runs at once (``DGUCDIR_CONCURRENT_RUNS``).
Both pools get all of the rank's cores. Torch's intra-op pool, because on a CPU the training step
is the bulk of the work: the demo trained at 140 samples/s with torch on one of 2 cores against
191–202 on both. Each DALI pipeline too, because the pipelines and torch take turns (DALI fills its
prefetch queue while torch computes, then sleeps): 1 or 2 threads per pipeline made no difference
beyond this machine's run-to-run noise (`dgucdir bench train`, BENCHMARKS.md). What the budget
prevents is ranks oversubscribing each other: 8 ranks on a 64-core node get 8 cores each, not 64.
An explicit ``OMP_NUM_THREADS`` (torchrun sets 1 for several local ranks) sets torch's share
instead, and ``data.num_threads`` DALI's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

CONCURRENT_RUNS = "DGUCDIR_CONCURRENT_RUNS"  # set for each training that `--jobs` runs beside others


def _positive_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@dataclass(frozen=True)
class ThreadBudget:
    cores: int  # cores this rank may keep busy
    omp_threads: int | None  # an explicit OMP_NUM_THREADS: torch's share, whatever the split
    reason: str  # where ``cores`` came from, for the log

    @classmethod
    def for_rank(cls, environ: Mapping[str, str] | None = None, affinity: Collection[int] | None = None
                 ) -> "ThreadBudget":
        """The budget of this process from its affinity and the launcher's environment (both injectable for tests)."""
        environ = os.environ if environ is None else environ
        affinity = os.sched_getaffinity(0) if affinity is None else affinity
        cores, reasons = len(affinity), [f"{len(affinity)} cores in the affinity mask"]
        per_task = _positive_int(environ, "SLURM_CPUS_PER_TASK")
        local_ranks = _positive_int(environ, "LOCAL_WORLD_SIZE") or 1
        if per_task is not None:
            cores = min(cores, per_task)
            reasons.append(f"SLURM --cpus-per-task={per_task}")
        elif local_ranks > 1:
            cores //= local_ranks
            reasons.append(f"shared by {local_ranks} ranks on this host")
        for variable, what in (("PYTEST_XDIST_WORKER_COUNT", "test workers"),
                               (CONCURRENT_RUNS, "runs started together by --jobs")):
            sharing = _positive_int(environ, variable) or 1
            if sharing > 1:
                cores //= sharing
                reasons.append(f"shared by {sharing} {what}")
        omp = _positive_int(environ, "OMP_NUM_THREADS")
        if omp is not None:
            reasons.append(f"torch threads from OMP_NUM_THREADS={omp}")
        return cls(max(1, cores), omp, ", ".join(reasons))

    def dali_threads(self, configured: int | None = None) -> int:
        """Worker threads per DALI pipeline: the rank's cores, or ``data.num_threads`` when set."""
        return configured if configured is not None else self.cores

    @property
    def torch_threads(self) -> int:
        """torch's intra-op threads: every core of the rank, or an explicit OMP_NUM_THREADS."""
        return self.omp_threads if self.omp_threads is not None else self.cores

    def apply(self, concurrent_pipelines: int, configured: int | None = None) -> int:
        """Sets torch's intra-op threads, logs the decision (with the pipeline count), returns the DALI threads
        per pipeline."""
        torch_threads = self.torch_threads
        torch.set_num_threads(torch_threads)
        dali = self.dali_threads(configured)
        log.info("threads: %d cores for this rank (%s): torch %d, DALI %d per pipeline x %d pipelines%s",
                 self.cores, self.reason, torch_threads, dali, concurrent_pipelines,
                 " (data.num_threads)" if configured is not None else "")
        return dali
