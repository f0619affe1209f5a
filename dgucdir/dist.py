"""Small torch.distributed helpers that work the same with one process, gloo and NCCL."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates equal-shaped tensors of all ranks along dim 0 (rank order), no autograd."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def reduce_scatter(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``x`` (W*n, ...) reduced over ranks (sum or max); this rank gets its block of n rows, no autograd.

    One collective: NCCL's reduce-scatter, or on gloo (which has none) an all-reduce and a slice.
    """
    if not is_distributed():
        return x
    n = x.shape[0] // world_size()
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    x = x.contiguous()
    if dist.get_backend() == "nccl":
        out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, op=reduce_op)
        return out
    x = x.clone()
    dist.all_reduce(x, op=reduce_op)
    return x[rank() * n : (rank() + 1) * n]


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return reduce_scatter(grad)


class _ReduceScatterWithGrad(torch.autograd.Function):
    """Sum over ranks of (W*n, ...) rows, this rank's n of them; the backward gathers the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return reduce_scatter(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_gather(grad.contiguous())


def reduce_scatter_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`reduce_scatter` (sum); identity with one process."""
    return _ReduceScatterWithGrad.apply(x) if is_distributed() else x


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (identity with one process)."""
    return _AllGatherWithGrad.apply(x) if is_distributed() else x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Gives every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers only at the start of each forward, so after a step every rank holds the
    statistics of its own last batch. Eval-mode embedding (clustering, retrieval) must use one model
    on all ranks, and the one a checkpoint saves (rank 0's): otherwise a run resumed at an epoch
    boundary clusters with other features than the uninterrupted run did.
    """
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (any picklable value; one process: itself)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


_BATCHNORM_GROUPS: list = []  # created by batchnorm_group(), destroyed by destroy_batchnorm_groups()


def batchnorm_group(size: int | None):
    """The process group of this rank's BatchNorm statistics: its block of ``size`` consecutive ranks (e.g.
    its node's), or all ranks (``size`` None). Under NCCL all ranks get a group of their own too, so that
    the many small BN all-reduces run on their own communicator, beside DDP's gradient buckets; on gloo
    they use the default group. Collective: every rank calls it, in the same order."""
    if not is_distributed():
        return None
    world = world_size()
    if size in (None, world) and dist.get_backend() != "nccl":
        return None
    size = size or world
    mine = None
    for start in range(0, world, size):  # new_group must be called by every rank for every group
        group = dist.new_group(list(range(start, start + size)))
        _BATCHNORM_GROUPS.append(group)
        if start <= rank() < start + size:
            mine = group
    return mine


def destroy_batchnorm_groups() -> None:
    """Tears down the groups :func:`batchnorm_group` made, before the default group goes (a process group
    left to the interpreter's exit can abort it while its threads still run)."""
    while _BATCHNORM_GROUPS:
        group = _BATCHNORM_GROUPS.pop()
        if group not in (None, dist.GroupMember.NON_GROUP_MEMBER):
            dist.destroy_process_group(group)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one tiny all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on all of them."""
    return not any_rank(not flag)


def broadcast(x: torch.Tensor, src: int) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(x, src)
    return x


def gather_variable(x: torch.Tensor, to_all_ranks: bool = True) -> torch.Tensor:
    """Concatenates tensors whose first dimension differs by rank (pads, gathers, trims).

    With ``to_all_ranks=False`` only rank 0 receives the result (others get ``x`` back), so
    the other ranks never hold everything.
    """
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = all_gather(n).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    if to_all_ranks:
        parts = all_gather(padded).split(max(sizes))
    else:
        bufs = [torch.empty_like(padded) for _ in sizes] if rank() == 0 else None
        dist.gather(padded, bufs, dst=0)
        if rank() != 0:
            return x
        parts = bufs
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the GPU under NCCL, the CPU otherwise."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    address: str  # what the hostname resolves to: the address other ranks see in their errors


def peers() -> list[Peer]:
    """Every rank's host and address, gathered once at start-up, so that a failed collective can
    name the rank it lost (gloo and NCCL errors name a peer's address, not its rank)."""
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = host
    if not is_distributed():
        return [Peer(0, host, address)]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (host, address))
    return [Peer(r, h, a) for r, (h, a) in enumerate(gathered)]


def describe_lost_ranks(error: BaseException, everyone: list[Peer], timeout_s: float) -> str | None:
    """For a failed collective: which ranks were lost, from the peer addresses in the error text
    (e.g. gloo's "Connection closed by peer [10.77.0.2]:40123"); None when it was no collective."""
    text = f"{type(error).__name__}: {error}"
    if not isinstance(error, RuntimeError) or not is_distributed():  # torch's DistError is one too
        return None
    addresses = set(re.findall(r"\[([0-9A-Fa-f.:]+)\]:\d+", text))
    lost = [p for p in everyone if p.address in addresses and p.rank != rank()]
    if lost:
        who = ", ".join(f"rank {p.rank} on {p.host} ({p.address})" for p in lost)
        return f"lost {who}: a collective failed ({text.splitlines()[0][:200]})"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"no answer from the other ranks within train.collective_timeout_s={timeout_s:g} s: a rank "
                f"is lost or hung ({text.splitlines()[0][:200]})")
    return None
