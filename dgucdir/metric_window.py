"""A window of training steps whose metrics are summed on the device and reported as means across ranks.

Summing on the device keeps the step free of host syncs; one all-reduce per report gives every
rank the same numbers. The finiteness check sits here because every step's metrics pass through
a window and every window is reduced before a checkpoint is written (see ``Trainer``): a
non-finite loss can therefore never be saved and then called "the last good state".
"""

from __future__ import annotations

import math
import time

import torch

from . import dist


class MetricWindow:
    def __init__(self) -> None:
        self.reset(0.0)

    def reset(self, data_wait_s: float) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.started = time.perf_counter()
        self.wait_at_start = data_wait_s

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def reduce(self, global_step: int, samples_per_step: int, data_wait_s: float) -> dict[str, float]:
        """Means over the window's steps and all ranks, plus throughput; then starts a new window.

        Collective: every rank calls it at the same step. Raises FloatingPointError naming the
        non-finite metrics.
        """
        names = sorted(self.sums)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        values = torch.stack([self.sums[n] / self.steps for n in names]).to(dist.comm_device())
        values = dist.all_reduce_sum(values) / dist.world_size()
        metrics = {f"train/{n}": float(v) for n, v in zip(names, values)}
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} in the steps up to global step {global_step}")
        metrics["train/samples_per_s"] = self.steps * samples_per_step / elapsed
        metrics["train/data_wait_fraction"] = (data_wait_s - self.wait_at_start) / elapsed
        self.reset(data_wait_s)
        return metrics
