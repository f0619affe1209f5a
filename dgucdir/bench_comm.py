"""`dgucdir bench comm`: every collective of a training step, counted, checked against a formula, projected.

Run in the world to measure, e.g. ``torchrun --nproc_per_node 4 -m dgucdir bench comm``: the real
Trainer takes a few steps of the demo on gloo while the Python collectives of ``torch.distributed``
are wrapped and counted per step (operation, bytes, and whether BatchNorm made them).
DDP's gradient all-reduce runs in its C++ reducer, so it is not among them; its bytes (the
trainable parameters, once per step) are added in the projection.

The formula the counts are checked against, per training step with ``model.bn: paper``:
- InfoNCE, whatever the number of loss terms: 4 collectives forward (one all-gather of the
  queries, one of their ids and domains, one reduce-scatter of the per-row negative sums, one of
  the per-row maxima) and 2 backward (an all-gather of the sums' gradient, a reduce-scatter of
  the queries' gradient); gloo has no reduce-scatter, so there it is an all-reduce of W times
  the bytes. 6 in all.
- BatchNorm over the global batch: one all-reduce per BN layer in the query forward, the query
  backward and the key forward, 3 L for L layers (on a process group of their own under NCCL).
- Bookkeeping: one all-reduce of the metric window and one of the stop flag every
  ``train.log_every`` steps.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed

from . import dist
from .config import load_config

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "gather",
           "all_gather_object", "broadcast_object_list", "barrier")


def _bytes(args: tuple, kwargs: dict) -> int:
    """The bytes a collective moves out of this rank: its input tensor (a list's first element)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size()
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return a[0].numel() * a[0].element_size()
    return 0


@contextmanager
def counting() -> Iterator[tuple[Counter, Counter]]:
    """Counts every call of the wrapped collectives: (name, made by BatchNorm) -> calls, and -> bytes.
    BatchNorm's are told apart by where they come from (its all-reduce helper), whatever group they use."""
    from .model import batchnorm

    counts: Counter = Counter()
    nbytes: Counter = Counter()
    originals = {name: getattr(torch.distributed, name) for name in WRAPPED}
    bn_all_reduce, in_bn = batchnorm._all_reduce, [False]

    def wrap(name: str, fn):
        def counted(*args, **kwargs):
            key = (name, in_bn[0])
            counts[key] += 1
            nbytes[key] += _bytes(args, kwargs)
            return fn(*args, **kwargs)
        return counted

    def bn_counted(x: torch.Tensor, group=None) -> torch.Tensor:
        in_bn[0] = True
        try:
            return bn_all_reduce(x, group)
        finally:
            in_bn[0] = False

    for name, fn in originals.items():
        setattr(torch.distributed, name, wrap(name, fn))
    batchnorm._all_reduce = bn_counted
    try:
        yield counts, nbytes
    finally:
        for name, fn in originals.items():
            setattr(torch.distributed, name, fn)
        batchnorm._all_reduce = bn_all_reduce


def count_step_collectives(config: str, overrides: list[str], steps: int) -> dict:
    """Collectives per training step in the world this runs in, with the formula's expectation."""
    from .model.batchnorm import GlobalBatchNorm2d
    from .train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [*overrides, f"train.output_dir={tmp}/run", "tracking.enabled=false",
                                   "loss.cluster=false"])
        trainer = Trainer(cfg)
        batches = trainer.loader.epoch(0, 0, steps + 1)
        trainer.model.train()
        trainer.train_step(next(batches))  # warm-up: DDP's first-step set-up is not a step's cost
        bn_layers = [m for m in trainer.core.encoder_q.modules() if isinstance(m, GlobalBatchNorm2d)]
        with counting() as (counts, nbytes):
            for batch in batches:
                trainer.train_step(batch)
        trainer.close()
    label = {key: f"{key[0]}{' (BatchNorm)' if key[1] else ''}" for key in counts}
    per_step = {label[k]: n / steps for k, n in counts.items()}
    bytes_per_step = {label[k]: n / steps for k, n in nbytes.items()}
    world = dist.world_size()
    infonce = sum(n for (_, on_bn), n in counts.items() if not on_bn) / steps
    bn = sum(n for (_, on_bn), n in counts.items() if on_bn) / steps
    return {"world_size": world, "rank_batch": trainer.rank_batch, "bn_layers": len(bn_layers), "steps": steps,
            "per_step": per_step, "bytes_per_step": bytes_per_step, "infonce_per_step": infonce,
            "bn_per_step": bn, "expected": {"infonce_per_step": 6, "bn_per_step": 3 * len(bn_layers)},
            "params_bytes": sum(p.numel() * p.element_size() for p in trainer.core.parameters() if p.requires_grad)}


# --------------------------------------------------------------------------- projection
def ring_seconds(kind: str, nbytes: float, world: int, alpha: float, beta: float) -> float:
    """alpha-beta cost of a collective over ``world`` ranks. Bandwidth as a ring: an all-reduce moves 2(W-1)/W
    of the bytes, an all-gather or reduce-scatter (W-1)/W of the gathered bytes. Latency: an all-reduce as
    a tree (2 log2 W hops, what NCCL picks for small messages), the others as a ring (W-1 hops)."""
    if world == 1:
        return 0.0
    hops = 2 * math.ceil(math.log2(world)) if kind == "all_reduce" else world - 1
    share = 2 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world
    return hops * alpha + share * nbytes / beta


def project(world: int, rank_batch: int, proj_dim: int, bn_channels: list[int], params_bytes: int,
            links: dict) -> dict:
    """Per-step communication time of InfoNCE, global BatchNorm and DDP's gradients at ``world`` GPUs, from the
    formula (bytes as a function of W and B) and the link figures (alpha seconds, beta bytes/s)."""
    link = links["intra"] if world <= links["gpus_per_node"] else links["inter"]
    a, b = link["alpha_s"], link["beta_Bps"]
    rows = world * rank_batch
    infonce = (ring_seconds("all_gather", rows * 2 * proj_dim * 4, world, a, b)  # both query modalities
               + ring_seconds("all_gather", rows * 2 * 8, world, a, b)  # ids and domains
               + 2 * ring_seconds("reduce_scatter", rows * 2 * 4, world, a, b)  # sums, maxima (2 query sets)
               + ring_seconds("all_gather", rows * 2 * 4, world, a, b)  # backward: the sums' gradient
               + ring_seconds("reduce_scatter", rows * 2 * proj_dim * 4, world, a, b))  # the queries' gradient
    bn = sum(3 * ring_seconds("all_reduce", (2 * c + 1) * 8, world, a, b) for c in bn_channels)
    grads = ring_seconds("all_reduce", params_bytes, world, a, b)
    return {"world": world, "global_batch": rows, "infonce_ms": 1e3 * infonce, "batchnorm_ms": 1e3 * bn,
            "ddp_gradients_ms": 1e3 * grads, "collectives": 6 + 3 * len(bn_channels)}


def resnet50_bn_channels() -> list[int]:
    from torchvision.models import resnet50

    return [m.num_features for m in resnet50().modules() if isinstance(m, torch.nn.BatchNorm2d)]


LINKS = {  # assumptions, not measurements: see BENCHMARKS.md
    "gpus_per_node": 8,
    "intra": {"alpha_s": 5e-6, "beta_Bps": 150e9},  # NVLink/NVSwitch, effective per-GPU ring bandwidth
    "inter": {"alpha_s": 15e-6, "beta_Bps": 25e9},  # 400 Gb/s InfiniBand per GPU, about half of it achieved
}


def bench_comm(config: str, overrides: list[str], steps: int, rank_batch: int = 32) -> dict:
    """The counts of this world, and the projection of the per-step communication for ResNet-50 at 8, 64
    and 512 GPUs with ``rank_batch`` samples per GPU (the global batch growing with W, as it must past
    32 GPUs: the paper's 64 splits into 2 per rank, one per domain, at most)."""
    from .model.encoder import Encoder

    measured = count_step_collectives(config, overrides, steps)
    params = sum(p.numel() * p.element_size() for p in Encoder("resnet50").parameters())
    rows = [project(w, rank_batch, 128, resnet50_bn_channels(), params, LINKS) for w in (8, 64, 512)]
    return {**measured, "projection": {"assumptions": LINKS, "rank_batch": rank_batch, "params_bytes": params,
                                       "rows": rows}}
