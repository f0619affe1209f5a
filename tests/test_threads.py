"""The per-rank thread budget, on simulated machines: a 2-core box and a 64-core node."""

import logging

import torch

from dgucdir.threads import ThreadBudget

TWO, SIXTY_FOUR = range(2), range(64)


def test_a_lone_process_gives_torch_and_each_pipeline_its_cores():
    budget = ThreadBudget.for_rank({}, SIXTY_FOUR)
    assert (budget.cores, budget.torch_threads, budget.dali_threads()) == (64, 64, 64)
    two = ThreadBudget.for_rank({}, TWO)
    assert (two.cores, two.torch_threads, two.dali_threads()) == (2, 2, 2)


def test_local_ranks_slurm_tasks_test_workers_and_concurrent_runs_divide_the_cores():
    assert ThreadBudget.for_rank({"LOCAL_WORLD_SIZE": "8"}, SIXTY_FOUR).cores == 8  # accelerate/torchrun, 8 GPUs
    # SLURM: the task's own --cpus-per-task, not the node divided again by the local ranks
    slurm = ThreadBudget.for_rank({"SLURM_CPUS_PER_TASK": "10", "LOCAL_WORLD_SIZE": "4"}, SIXTY_FOUR)
    assert slurm.cores == 10 and "cpus-per-task=10" in slurm.reason
    assert ThreadBudget.for_rank({"SLURM_CPUS_PER_TASK": "10"}, range(6)).cores == 6  # bound tighter than asked
    assert ThreadBudget.for_rank({"PYTEST_XDIST_WORKER_COUNT": "2"}, TWO).cores == 1
    both = ThreadBudget.for_rank({"PYTEST_XDIST_WORKER_COUNT": "2", "LOCAL_WORLD_SIZE": "2"}, TWO)
    assert both.cores == 1 and both.dali_threads() == 1 and both.torch_threads == 1
    assert ThreadBudget.for_rank({"LOCAL_WORLD_SIZE": "garbage"}, TWO).cores == 2
    # `dgucdir ablate --jobs 4` on a 64-core node: each training 16 cores, and 8 ranks of one of them 2 each
    runs = ThreadBudget.for_rank({"DGUCDIR_CONCURRENT_RUNS": "4"}, SIXTY_FOUR)
    assert runs.cores == 16 and "shared by 4 runs started together by --jobs" in runs.reason
    assert ThreadBudget.for_rank({"DGUCDIR_CONCURRENT_RUNS": "4", "LOCAL_WORLD_SIZE": "8"}, SIXTY_FOUR).cores == 2


def test_an_explicit_omp_setting_and_data_num_threads_win(caplog):
    budget = ThreadBudget.for_rank({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8"}, SIXTY_FOUR)
    assert (budget.cores, budget.torch_threads, budget.dali_threads()) == (8, 1, 8)
    assert budget.dali_threads(configured=6) == 6
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="dgucdir.threads"):
            assert ThreadBudget.for_rank({}, range(4)).apply(2) == 4
        assert torch.get_num_threads() == 4
        assert "4 cores for this rank" in caplog.text and "torch 4, DALI 4 per pipeline x 2 pipelines" in caplog.text
    finally:
        torch.set_num_threads(before)
