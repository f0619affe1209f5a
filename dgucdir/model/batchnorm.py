"""BatchNorm over the global batch of all ranks, on any backend (gloo on the CPU included).

The original ran on one GPU, so each BatchNorm layer normalised over the whole batch. With W
ranks, per-rank BatchNorm normalises over 1/W of it. ``torch.nn.SyncBatchNorm`` restores the
global statistics but runs on CUDA only; :class:`GlobalBatchNorm2d` does the same with one
all-reduce of per-channel sums (float64, so that W ranks match one process to rounding) and an
all-reduce of their gradients in the backward pass, so it also runs, and is tested, on the CPU.
It keeps BatchNorm2d's parameters and buffers, so checkpoints do not depend on the mode.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (every rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return dist.all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce_sum(grad.contiguous().clone())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the concatenated batch of all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_distributed()):
            return super().forward(x)
        local_n = x.shape[0] * x.shape[2] * x.shape[3]
        x64 = x.double()
        stats = torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)),
                           x64.new_tensor([float(local_n)])])
        stats = _AllReduceSum.apply(stats) if torch.is_grad_enabled() else dist.all_reduce_sum(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = torch.rsqrt(var + self.eps)
        y = (x64 - mean[None, :, None, None]) * scale[None, :, None, None]
        y = y.to(x.dtype)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None] if self.affine else y


def to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d of ``module`` (in place) by a :class:`GlobalBatchNorm2d` with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            to_global_batchnorm(child)
    return module


