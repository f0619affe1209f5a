"""Where a training batch's time goes, per Fourier partner mode: the torch profiler's top operators
on the loader's thread and the time spent waiting for DALI.

    python scripts/profile_loader.py data/bench_photos/shards/manifest.json --image-size 224 --batch-size 32

(`dgucdir bench photos --out data/bench_photos --count 300` writes the photo-sized JPEGs.) Threads
follow the rank's budget (dgucdir.threads), as in training.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dgucdir.bench import PARTNER_MODES, loader_config
from dgucdir.data.batches import concurrent_pipelines
from dgucdir.data.loader import MultiDomainLoader
from dgucdir.data.manifest import Manifest
from dgucdir.data.spec import PipelineSpec
from dgucdir.threads import ThreadBudget


def profile_mode(manifest: Manifest, partner: str, size: int, batch: int, steps: int, top: int) -> dict:
    domains = list(manifest.domains)[:2]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = loader_config(domains, size, partner, "global")
    spec = PipelineSpec.for_device(size, ThreadBudget.for_rank().apply(concurrent_pipelines(cfg)), device)
    loader = MultiDomainLoader(cfg, manifest, batch, spec, device)
    it = loader.epoch(0, num_steps=steps + 1)
    next(it)  # pipeline build and first batch
    wait0, start = loader.data_wait_s, time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        count = sum(len(b) for b in it)
    elapsed = time.perf_counter() - start
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"partner": partner, "samples_s": count / elapsed, "step_ms": 1000 * elapsed / steps,
            "dali_wait_ms_per_step": 1000 * (loader.data_wait_s - wait0) / steps,
            "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1000 / steps, 2) for e in ops}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--partners", nargs="+", default=list(PARTNER_MODES), choices=PARTNER_MODES)
    args = parser.parse_args()
    manifest = Manifest.load(args.manifest)
    for partner in args.partners:
        print(json.dumps(profile_mode(manifest, partner, args.image_size, args.batch_size, args.steps, args.top),
                         indent=1))


if __name__ == "__main__":
    main()
