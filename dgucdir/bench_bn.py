"""`dgucdir bench bn`: GlobalBatchNorm2d against nn.BatchNorm2d on one backbone, one device.

The same encoder and batch, once with torch's BatchNorm2d and once with every layer a
:class:`~dgucdir.model.batchnorm.GlobalBatchNorm2d` over a one-rank process group (gloo on the
CPU, NCCL on a GPU), so the global path, its collectives included, runs in one process. Reported:
the largest output and gradient difference, the time of a forward + backward, and the memory
the forward keeps for the backward pass, counted exactly with saved-tensor hooks (on CUDA also
the peak allocated memory). Storage shared by several saved tensors counts once.
"""

from __future__ import annotations

import copy
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed

from .model.batchnorm import to_global_batchnorm
from .model.encoder import Encoder


@contextmanager
def one_rank_group(device: torch.device) -> Iterator[None]:
    """A process group of this process alone (NCCL on CUDA, gloo otherwise), unless one exists already."""
    if torch.distributed.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                             device_id=device if device.type == "cuda" else None)
        try:
            yield
        finally:
            torch.distributed.destroy_process_group()


def saved_activation_bytes(step) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of ``step()``'s graph."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_batchnorm(device: torch.device, arch: str = "resnet50", image_size: int = 224, batch: int = 8,
                      repeat: int = 3, dtype: torch.dtype | None = None) -> dict:
    """BatchNorm2d vs GlobalBatchNorm2d on ``arch`` in training mode: differences, time, memory.

    ``dtype``: bf16 runs both under autocast (the output of each BN layer must stay bf16).
    """
    torch.manual_seed(0)
    plain = Encoder(arch).to(device).train()
    global_bn = to_global_batchnorm(copy.deepcopy(plain)).train()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    # a loss with gradients everywhere (a sum of squares of the L2-normalised outputs would be constant)
    r_proj, r_pooled = torch.randn(batch, 128, device=device), torch.randn(batch, plain.feature_dim, device=device)
    result: dict = {"device": str(device), "arch": arch, "image_size": image_size, "batch": batch,
                    "dtype": str(dtype or torch.float32).removeprefix("torch.")}
    outputs = {}
    with one_rank_group(device):
        for name, model in (("BatchNorm2d", plain), ("GlobalBatchNorm2d", global_bn)):
            def step():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    proj, pooled = model(x)
                return (proj.float() * r_proj).sum() + (pooled.float() * r_pooled).sum()

            model.zero_grad(set_to_none=True)
            saved = saved_activation_bytes(step)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            step().backward()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                features = model(x)[1].float()  # in training mode: normalised with the batch's statistics
            outputs[name] = (features, [p.grad.detach().clone() for p in model.parameters()])
            start = time.perf_counter()
            for _ in range(repeat):
                model.zero_grad(set_to_none=True)
                step().backward()
            _sync(device)
            result[name] = {"saved_for_backward_mib": saved / 2**20, "seconds_per_step": (time.perf_counter() - start) / repeat,
                            "peak_allocated_mib": None if peak is None else peak / 2**20}
        probe = next(m for m in global_bn.modules() if type(m).__name__ == "GlobalBatchNorm2d")
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            result["bn_output_dtype"] = str(probe(torch.randn(2, probe.num_features, 4, 4, device=device)
                                                  .to(dtype or torch.float32)).dtype).removeprefix("torch.")
    (feat_p, grads_p), (feat_g, grads_g) = outputs["BatchNorm2d"], outputs["GlobalBatchNorm2d"]
    result["feature_rel_diff"] = float((feat_g - feat_p).norm() / feat_p.norm())
    result["grad_max_rel_diff"] = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(grads_g, grads_p))
    result["saved_ratio"] = result["GlobalBatchNorm2d"]["saved_for_backward_mib"] / \
        result["BatchNorm2d"]["saved_for_backward_mib"]
    return result
