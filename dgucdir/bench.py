"""`dgucdir bench aug|loader|eval|photos`: throughput and memory figures as JSON.

Each benchmark runs the project's implementation side by side, in the same process, with a
naive implementation written here the way the original code works (per image, PIL + numpy
float64), so the ratio is measured on the same machine, the same data and the same moment.
"Per core" figures run both with one thread; the DALI/torch path is also measured with all cores.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .config import Config
from .data.fourier import FourierAugment


def _timeit(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _machine() -> dict:
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- naive reference
def naive_fourier(img: np.ndarray, partner: np.ndarray, lam_a: float, lam_p: float, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The original's per-image path: numpy float64 FFTs on HWC, fftshift, mix, uint8; phase image."""
    f1, f2 = np.fft.fft2(img.astype(np.float64), axes=(0, 1)), np.fft.fft2(partner.astype(np.float64), axes=(0, 1))
    abs1, pha1 = np.fft.fftshift(np.abs(f1), axes=(0, 1)), np.fft.fftshift(np.angle(f1), axes=(0, 1))
    abs2, pha2 = np.fft.fftshift(np.abs(f2), axes=(0, 1)), np.fft.fftshift(np.angle(f2), axes=(0, 1))
    amp = (1 - lam_a) * abs1 + lam_a * abs2
    H, W = img.shape[:2]
    r0, r1 = int(np.round((H - w) / 2)), int(np.round((H + w) / 2))
    c0, c1 = int(np.round((W - w) / 2)), int(np.round((W + w) / 2))
    pha1[r0:r1, c0:c1] = (1 - lam_p) * pha1[r0:r1, c0:c1] + lam_p * pha2[r0:r1, c0:c1]
    mixed = np.fft.ifft2(np.fft.ifftshift(amp, axes=(0, 1)) * np.exp(1j * np.fft.ifftshift(pha1, axes=(0, 1))), axes=(0, 1))
    out = np.uint8(np.clip(np.real(mixed), 0, 255))
    gray = np.asarray(Image.fromarray(img).convert("L"), np.float64)
    phase = np.real(np.fft.ifft2(50000.0 * np.exp(1j * np.angle(np.fft.fft2(gray)))))
    return out, np.uint8(np.clip(phase, 0, 255))


def naive_views(data: bytes, partner_path_bytes: bytes, size: int, transform) -> list[np.ndarray]:
    """Per sample, as the original loader: PIL decode, two torchvision MoCo v2 views, each Fourier-
    mixed with a partner image decoded from disk and resized, plus their phase images."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    out = []
    for _ in range(2):
        view = np.asarray(transform(img))
        partner = np.asarray(Image.open(io.BytesIO(partner_path_bytes)).convert("RGB").resize((size, size)))
        out.extend(naive_fourier(view, partner, 0.5, 0.2, int(50 * size / 224)))
    return out


def moco_v2_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=int(0.1 * size) // 2 * 2 + 1, sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
    ])


# --------------------------------------------------------------------------- benchmarks
def bench_aug(size: int, batch: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size)).astype(np.float32))
    partner = torch.arange(batch).roll(1)
    aug = FourierAugment(hpf_range=int(50 * size / 224))
    gen = torch.Generator().manual_seed(0)

    def ours() -> None:
        aug.mix_with_partner(x, partner, *aug.sample_lambdas(batch, gen))
        aug.phase_image(x)

    imgs = x.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    n_naive = max(4, batch // 4)

    def naive() -> None:
        for i in range(n_naive):
            naive_fourier(imgs[i], imgs[(i + 1) % batch], 0.5, 0.2, int(50 * size / 224))

    result = {"image_size": size, "batch": batch}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result["ours_1_thread_img_s"] = batch / _timeit(ours, repeat)
    result["naive_1_thread_img_s"] = n_naive / _timeit(naive, max(1, repeat // 2))
    torch.set_num_threads(threads)
    result[f"ours_{threads}_threads_img_s"] = batch / _timeit(ours, repeat)
    result["speedup_per_core"] = result["ours_1_thread_img_s"] / result["naive_1_thread_img_s"]
    if torch.cuda.is_available():  # the same batched code on cuFFT; synchronised so the time is the GPU's
        x, partner = x.cuda(), partner.cuda()
        result["ours_cuda_img_s"] = batch / _timeit(lambda: (ours(), torch.cuda.synchronize()), repeat)
    return result


def loader_config(domains: list[str], size: int, partner: str, order: str) -> Config:
    """The default config with the benchmark's domains, image size (window scaled as 50 of 224), partners, order."""
    cfg = Config()
    cfg.data.train_domains = domains
    cfg.data.image_size = size
    cfg.data.order = order
    cfg.augment.hpf_range = int(50 * size / 224)
    cfg.augment.partner = partner
    return cfg


PARTNER_MODES = ("bank", "per_view_raw", "shared_batch")


def bench_loader(manifest_path: str, size: int, batch: int, steps: int, rounds: int = 2) -> dict:
    """Training batches per second through the whole loader (read, decode, two views, Fourier, phase images).

    Every partner mode is measured in the same run, ``rounds`` times in turn, and its best round is
    kept: on a shared machine the best is the least disturbed figure, and interleaving keeps a slow
    stretch from landing on one mode. Threads follow the rank's budget (:mod:`dgucdir.threads`).
    """
    from .data.batches import concurrent_pipelines
    from .data.loader import MultiDomainLoader
    from .data.manifest import Manifest
    from .data.spec import PipelineSpec
    from .threads import ThreadBudget

    manifest = Manifest.load(manifest_path)
    domains = list(manifest.domains)[:2]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budget = ThreadBudget.for_rank()
    result: dict = {"image_size": size, "batch": batch, "domains": domains, "steps": steps, "rounds": rounds,
                    "device": device.type, "cores": budget.cores}

    def samples_per_s(cores: int, partner: str, order: str = "global") -> float:
        cfg = loader_config(domains, size, partner, order)
        dali_threads = ThreadBudget(cores, budget.omp_threads, "benchmark").apply(concurrent_pipelines(cfg))
        loader = MultiDomainLoader(cfg, manifest, batch, PipelineSpec.for_device(size, dali_threads, device), device)
        # as many epochs as the steps need (a small benchmark set at a large batch has few steps per epoch)
        it = itertools.islice(itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count()), steps + 1)
        next(it)  # pipeline build and first batch
        start = time.perf_counter()
        count = sum(len(b) for b in it)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the Fourier stage of the last batches may still be queued
        return count / (time.perf_counter() - start)

    best: dict[str, float] = {}
    for _ in range(rounds):
        for partner in PARTNER_MODES:
            best[partner] = max(best.get(partner, 0.0), samples_per_s(budget.cores, partner))
    for partner in PARTNER_MODES:
        result[f"partner_{partner}_samples_s"] = best[partner]
    result["bank_vs_shared_batch"] = best["bank"] / best["shared_batch"]
    result["per_view_raw_vs_shared_batch"] = best["per_view_raw"] / best["shared_batch"]
    # reading by index in a fresh global order (default) vs the shard reader's fixed, buffer-shuffled shards
    result["shard_order_samples_s"] = samples_per_s(budget.cores, "bank", "shard")
    result["ours_1_thread_samples_s"] = samples_per_s(1, "bank")
    torch.set_num_threads(1)
    records = [(manifest.domain(d), r) for d in domains for r in manifest.domain(d).samples()[: max(16, batch // 4)]]
    blobs = [dom.read_image_bytes(r) for dom, r in records]
    transform = moco_v2_transform(size)
    start = time.perf_counter()
    for i, data in enumerate(blobs):
        views = naive_views(data, blobs[(i + 7) % len(blobs)], size, transform)
        [torch.from_numpy(v.copy()) for v in views]
    result["naive_1_thread_samples_s"] = len(blobs) / (time.perf_counter() - start)
    torch.set_num_threads(budget.torch_threads)
    result["speedup_per_core"] = result["ours_1_thread_samples_s"] / result["naive_1_thread_samples_s"]
    return result


def naive_metrics(qf: np.ndarray, ql: np.ndarray, gf: np.ndarray, gl: np.ndarray, topk: list[int]) -> dict:
    """The original's way: full cosine matrix, full argsort, a Python loop per query."""
    qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    sim = qf @ gf.T
    hits = {k: 0 for k in topk}
    denom = {k: 0 for k in topk}
    aps = []
    for i in range(len(qf)):
        order = np.argsort(-sim[i], kind="stable")
        rel = gl[order] == ql[i]
        n_rel = int(rel.sum())
        for k in topk:
            kk = min(k, n_rel)
            hits[k] += int(rel[:kk].sum())
            denom[k] += kk
        positions = np.flatnonzero(rel) + 1
        aps.append(np.mean(np.arange(1, n_rel + 1) / positions))
    return {"precision": {k: hits[k] / denom[k] for k in topk}, "map_all": float(np.mean(aps))}


def _eval_once(n: int, dim: int, classes: int, topk: list[int]) -> dict:
    from .retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, dim, generator=g)
    qf = centers[labels] + 12 * torch.randn(n, dim, generator=g)
    gl = torch.randint(0, classes, (n,), generator=g)
    gf = centers[gl] + 12 * torch.randn(n, dim, generator=g)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    precision, map_all, _, _ = retrieval_metrics(qf, labels, gf, gl, topk, 200)
    return {"n": n, "ours_s": time.perf_counter() - start, "precision": precision, "map_all": map_all,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_mb": rss0 / 1024,
            "qf": qf, "gf": gf, "ql": labels, "gl": gl}


def bench_eval(sizes: list[int], naive_max: int, dim: int = 2048, classes: int = 7) -> dict:
    topk = [1, 5, 15]
    out = {"dim": dim, "classes": classes, "runs": []}
    for n in sizes:
        if n > naive_max:  # a fresh process, so that its peak memory is this run's alone
            cmd = [sys.executable, "-c", f"import json, dgucdir.bench as b; r = b._eval_once({n}, {dim}, {classes}, {topk}); "
                   "print(json.dumps({k: v for k, v in r.items() if k not in ('qf', 'gf', 'ql', 'gl')}))"]
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            out["runs"].append(res)
            continue
        res = _eval_once(n, dim, classes, topk)
        start = time.perf_counter()
        ref = naive_metrics(res["qf"].numpy(), res["ql"].numpy(), res["gf"].numpy(), res["gl"].numpy(), topk)
        naive_s = time.perf_counter() - start
        run = {k: v for k, v in res.items() if k not in ("qf", "gf", "ql", "gl")}
        run.update(naive_s=naive_s, speedup=naive_s / run["ours_s"],
                   same_result=all(abs(run["precision"][k] - ref["precision"][k]) < 1e-9 for k in topk)
                   and abs(run["map_all"] - ref["map_all"]) < 1e-6)
        out["runs"].append(run)
    return out


def write_bench_photos(out: Path, per_domain: int, size: tuple[int, int] = (400, 300), seed: int = 0) -> Path:
    """Photo-sized JPEGs for the throughput benchmarks; returns the manifest path.

    The demo sets are 64 px renderings; a loader benchmark at 224 px needs what users feed it:
    photos of a few hundred pixels. These are random crops of scikit-learn's two bundled photos
    (labelled by photo), in four colour casts as four domains. Nothing to download.
    """
    from sklearn.datasets import load_sample_images

    from .data.pack import pack, read_list

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    casts = {"warm": np.array([1.15, 1.0, 0.8]), "cool": np.array([0.8, 1.0, 1.15]),
             "dim": np.array([0.7, 0.7, 0.7]), "bright": np.array([1.3, 1.3, 1.3])}
    lists = {}
    for domain, cast in casts.items():
        lines = []
        for i in range(per_domain):
            label = int(rng.integers(len(photos)))
            photo = photos[label]
            top, left = (int(rng.integers(photo.shape[k] - size[1 - k] + 1)) for k in (0, 1))
            crop = np.clip(photo[top : top + size[1], left : left + size[0]] * cast, 0, 255).astype(np.uint8)
            rel = f"{domain}/{i:05d}.jpg"
            (out / "images" / domain).mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(out / "images" / rel, quality=90)
            lines.append(f"{rel} {label}\n")
        lists[domain] = out / f"{domain}.txt"
        lists[domain].write_text("".join(lines))
    domains = {d: read_list(d, p, out / "images", 0) for d, p in lists.items()}
    pack(domains, out / "shards", [str(i) for i in range(len(photos))], shard_mb=64.0)
    return out / "shards" / "manifest.json"


def run_bench(what: str, manifest: str, image_size: int, batch_size: int, steps: int, sizes: list[int],
              naive_max: int) -> dict:
    """One benchmark's figures, with the machine they were measured on."""
    if what == "aug":
        result = bench_aug(image_size, batch_size, steps)
    elif what == "loader":
        result = bench_loader(manifest, image_size, batch_size, steps)
    elif what == "table":
        result = bench_table(sizes[0])
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        result = bench_eval_sharded(sizes)
    else:
        result = bench_eval(sizes, naive_max)
    return {"bench": what, "machine": _machine(), **result}


TABLE_PROBE = """
import json, sys, time
import numpy as np
start = time.perf_counter()
table = np.load(sys.argv[1], mmap_mode="r")
opened = time.perf_counter() - start
rows = np.random.default_rng(0).integers(0, len(table), 10000)
labels = [table[int(i)]["label"] for i in rows]
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"open_s": opened, "read_10000_random_rows_s": time.perf_counter() - start - opened,
                  "peak_rss_mb": int(status["VmHWM"].split()[0]) / 1024, "rss_mb": int(status["VmRSS"].split()[0]) / 1024}))
"""  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork and exec)


def bench_table(rows: int) -> dict:
    """A synthetic sample table of ``rows`` rows (the format `dgucdir pack` writes), opened memory-mapped in a
    fresh process that then reads 10000 random rows: the cost of the sample table to one rank."""
    import tempfile

    from .data.manifest import TABLE_DTYPE

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npy"
        table = np.lib.format.open_memmap(path, mode="w+", dtype=TABLE_DTYPE, shape=(rows,))
        table["label"] = np.arange(rows) % 345
        table["shard"] = np.arange(rows) // 10000
        table["offset"] = (np.arange(rows) % 10000) * 25600
        table["size"] = 25000
        table.flush()
        del table
        probe = subprocess.run([sys.executable, "-c", TABLE_PROBE, str(path)], capture_output=True, text=True,
                               check=True)
        return {"rows": rows, "file_mb": path.stat().st_size / 2**20, **json.loads(probe.stdout)}


def bench_eval_sharded(sizes: list[int], dim: int = 2048, classes: int = 7) -> dict:
    """Evaluation sharded by query in the world it is launched in (`torchrun --nproc_per_node W`): every rank
    scores its every-W-th query against the whole gallery; the per-query figures are gathered and summed.
    Reports each rank's seconds (the slowest), to compare with one process's ``ours_s``."""
    import torch.distributed

    from . import dist
    from .retrieval import query_scores

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    topk, out = [1, 5, 15], {"dim": dim, "classes": classes, "world_size": dist.world_size(), "runs": []}
    for n in sizes:
        g = torch.Generator().manual_seed(n)  # the same data as bench_eval's, on every rank
        labels = torch.randint(0, classes, (n,), generator=g)
        centers = torch.randn(classes, dim, generator=g)
        qf = centers[labels] + 12 * torch.randn(n, dim, generator=g)
        gl = torch.randint(0, classes, (n,), generator=g)
        gf = centers[gl] + 12 * torch.randn(n, dim, generator=g)
        mine = torch.arange(dist.rank(), n, dist.world_size())
        dist.barrier()
        start = time.perf_counter()
        precision, map_all, _, _ = query_scores(qf[mine], labels[mine], gf, gl, topk, 200, q_index=mine
                                                ).gathered().metrics(topk)
        seconds = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        slowest = float(dist.all_gather(seconds).max())
        out["runs"].append({"n": n, "per_rank_s": slowest, "precision": precision, "map_all": map_all,
                            "threads_per_rank": torch.get_num_threads()})
    return out
