"""`dgucdir bench train`: training throughput, data-wait fraction and model FLOP utilisation.

Runs the real Trainer's ``train_step`` on the real loader for a few steps in whatever world it is
launched in (one process, or ``torchrun``/``accelerate launch`` with several), so the figure includes
DALI, the Fourier stage, shuffle-BN, the sharded queues and DDP. FLOPs per sample come from the model
itself (``torch.utils.flop_counter`` over one forward + backward of a training step); the peak is a
matmul measured on the same device in the same precision, so MFU = achieved / measured peak.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from typing import Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import dist
from .config import load_config


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeat: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul (the practical compute limit for this device and dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def endless_batches(trainer) -> Iterator:
    """The trainer's batches epoch after epoch, so any number of steps can be timed on a small data set."""
    for epoch in itertools.count():
        yield from trainer.loader.epoch(epoch, 0, trainer.loader.steps_per_epoch)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """Samples/s, data-wait fraction and MFU of exactly ``steps`` timed training steps after ``warmup`` untimed
    ones (and one more, first, that counts the FLOPs), reading as many epochs as that takes."""
    from .train import Trainer

    if steps < 1 or warmup < 0:
        raise ValueError(f"bench train: --steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*overrides, f"train.output_dir={tmp}/run", "tracking.enabled=false",
                                   "loss.cluster=false"])
        trainer = Trainer(cfg)
        device = trainer.device
        batches = endless_batches(trainer)
        trainer.model.train()
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(next(batches))
        flops_per_sample = counter.get_total_flops() / trainer.rank_batch
        for _ in range(warmup):
            trainer.train_step(next(batches))
        _sync(device)
        start, wait0 = time.perf_counter(), trainer.loader.data_wait_s
        for _ in range(steps):
            trainer.train_step(next(batches))
        _sync(device)
        elapsed = time.perf_counter() - start
        wait = trainer.loader.data_wait_s - wait0
        trainer.close()
    samples_s = steps * cfg.train.batch_size / elapsed  # global samples, all ranks
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision, torch.float32)
    peak = matmul_peak(device, dtype)  # float32 under the run's TF32 setting (train.tf32)
    # every rank's compute counts against every rank's peak: world x peak in all
    mfu = flops_per_sample * samples_s / (peak * dist.world_size())
    fraction = torch.tensor([wait / elapsed], dtype=torch.float64, device=dist.comm_device())
    wait_all = float(dist.all_reduce_sum(fraction)) / dist.world_size()
    return {"world_size": dist.world_size(), "device": str(device), "precision": trainer.precision,
            "tf32": cfg.train.tf32, "image_size": cfg.data.image_size, "arch": cfg.model.arch,
            "global_batch": cfg.train.batch_size, "timed_steps": steps,
            "samples_per_s": samples_s, "data_wait_fraction": wait_all,
            "model_gflops_per_sample": flops_per_sample / 1e9, "matmul_peak_tflops": peak / 1e12, "mfu": mfu}
