"""BatchNorm over the global batch of all ranks, on any backend (gloo on the CPU included).

The original ran on one GPU, so each BatchNorm layer normalised over the whole batch. With W
ranks, per-rank BatchNorm normalises over 1/W of it. ``torch.nn.SyncBatchNorm`` restores the
global statistics but runs on CUDA only; :class:`GlobalBatchNorm2d` does the same with one
all-reduce of per-channel sums in the forward pass and one of the gradient sums in the backward
pass, so it also runs, and is tested, on the CPU.

Memory and precision, as ``nn.BatchNorm2d``: the forward pass keeps only its input for the
backward pass (the normalised output is recomputed there), and normalises in the input's dtype
(bf16 under autocast stays bf16). The per-channel sums are accumulated in float64 (so that W
ranks match one process to rounding), a bounded slice of the batch at a time, never as a float64
copy of the activation. It keeps BatchNorm2d's parameters and buffers, so checkpoints do not
depend on the mode.
"""

from __future__ import annotations

import torch
import torch.distributed
from torch import nn

SUMS_SLICE_BYTES = 64 * 2**20  # float64 working memory of one slice of the batch in the channel sums


def _all_reduce(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ``group`` (default: the world; any size, one rank included, so a one-rank NCCL group runs
    it too)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x, group=group)
    return x


def _channel_sums(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Per channel of (N,C,H,W) tensors, float64: [sum(a), sum(a*a)], or [sum(a), sum(a*b)] with ``b``.

    Slices of the batch are cast to float64 one at a time, so the extra memory is bounded by
    :data:`SUMS_SLICE_BYTES`, whatever the activation's size.
    """
    b = a if b is None else b
    per_sample = a[0].numel() * 8 * 2
    step = max(1, SUMS_SLICE_BYTES // max(per_sample, 1))
    out = torch.zeros(2, a.shape[1], dtype=torch.float64, device=a.device)
    for sa, sb in zip(a.split(step), b.split(step)):
        sa64 = sa.double()
        out[0] += sa64.sum((0, 2, 3))
        out[1] += (sa64 * sb.double()).sum((0, 2, 3))
    return out


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the global batch's mean and variance.

    Backward (as SyncBatchNorm's): with xmu = x - mean and N the global count,
    dx = weight * invstd * (dy - sum(dy)/N - xmu * invstd^2 * sum(dy * xmu)/N), the two sums
    over the global batch (one all-reduce); weight and bias get this rank's sums, as DDP expects.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                bn: "GlobalBatchNorm2d") -> torch.Tensor:  # noqa: D401
        local_n = x.shape[0] * x.shape[2] * x.shape[3]
        sums = _channel_sums(x)
        stats = _all_reduce(torch.cat([sums.flatten(), sums.new_tensor([float(local_n)])]), bn.group)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        bn.update_running_stats(mean, var, n)
        stat_dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
        invstd = torch.rsqrt(var + bn.eps).to(stat_dtype)
        mean = mean.to(stat_dtype)
        scale = invstd * weight if weight is not None else invstd
        # computed in float32 (float64 for float64 inputs), rounded once to the input's dtype, as
        # BatchNorm2d does under autocast; the float32 temporaries are not kept for backward
        y = (x.to(stat_dtype) - mean[None, :, None, None]) * scale[None, :, None, None]
        if bias is not None:
            y += bias[None, :, None, None]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.global_n = float(n)
        ctx.group = bn.group
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, invstd = ctx.saved_tensors
        xmu = x.to(mean.dtype) - mean[None, :, None, None]
        local = _channel_sums(dy, xmu)  # [sum(dy), sum(dy * xmu)] of this rank
        sum_dy, sum_dy_xmu = (_all_reduce(local.clone(), ctx.group) / ctx.global_n).to(invstd.dtype)
        scale = invstd * weight if weight is not None else invstd
        dx = None
        if ctx.needs_input_grad[0]:
            k = (invstd * invstd * sum_dy_xmu)[None, :, None, None]
            dx = ((dy.to(xmu.dtype) - sum_dy[None, :, None, None] - xmu * k) * scale[None, :, None, None]).to(dy.dtype)
        dweight = (local[1].to(invstd.dtype) * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = local[0].to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the concatenated batch of all ranks.

    The global path runs in training whenever a process group exists, one rank included (a
    one-rank group is how the device check runs it over NCCL); otherwise this is BatchNorm2d.
    ``group`` (:func:`set_batchnorm_group`) is the process group whose ranks share the statistics:
    its own group, so that with NCCL its many small all-reduces do not queue behind DDP's gradient
    buckets on one communicator; None is the default group (all ranks).
    """

    group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not (self.training and in_group):
            return super().forward(x)
        return _GlobalBatchNorm.apply(x, self.weight if self.affine else None, self.bias if self.affine else None,
                                      self)

    def __getstate__(self) -> dict:
        """Copies and pickles (deepcopy, an MLflow model) leave the process group behind: it belongs to this
        process; a copy normalises over the default group."""
        state = dict(super().__getstate__())
        state.pop("group", None)
        return state

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """As BatchNorm2d: momentum (or cumulative) average of the mean and of the unbiased variance."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def set_batchnorm_group(module: nn.Module, group) -> nn.Module:
    """Makes every GlobalBatchNorm2d of ``module`` share its statistics within ``group``."""
    for m in module.modules():
        if isinstance(m, GlobalBatchNorm2d):
            m.group = group
    return module


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
