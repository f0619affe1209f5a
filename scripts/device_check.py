#!/usr/bin/env python3
"""The GPU path against the CPU path in one command, on a bare PyTorch node (no DALI, no network).

    python scripts/device_check.py --device cuda --data data/demo/shards/manifest.json --out runs/device-check
    python scripts/device_check.py --device cuda --wheelhouse wheelhouse/ --data ... --out ...   # install first
    python scripts/device_check.py --device cpu --size small --out /tmp/check                   # the CPU suite's run

Needs the node's Python, torch and torchvision, plus what `scripts/wheelhouse.py --for device-check`
collects (accelerate, PyYAML, tqdm, safetensors: ~8 MiB) and a packed data set (the demo's shards:
~12 MiB); ``--wheelhouse`` installs the former offline into a venv that sees the node's torch. It
runs from the source tree and never imports DALI: images reach the device through torchvision's
``decode_jpeg(device="cuda")`` in a decoder that lives here (:class:`TorchvisionImages`), not a
second product data path. Every phase compares ``--device`` with the CPU, in a process of its own
with its own timeout, so a phase that fails or hangs does not stop the others:

  fourier     the Fourier stage in every partner mode (per-view raw, bank, shared batch), phase images
  step        two fp32 training steps with TF32 off against the CPU; a bf16 step against fp32
  batchnorm   GlobalBatchNorm2d over a one-rank NCCL (gloo) group against BatchNorm2d: values, time, memory
  kmeans      the original's Euclidean k-means (the distributed code at one rank) against the CPU
  retrieval   P@K / mAP@All at 50k x 50k on the device; exact equality with the CPU on a query subset
  bank        the partner bank on the device: same draws and pixels as on the CPU
  trainer     Trainer.fit with clustering and evaluation, then a stop and an exact resume
  throughput  ResNet-50 at 224 px training steps: samples/s and MFU in bf16 and fp32 (TF32 recorded)

Each phase writes OUT/<phase>.json; OUT/summary.json lists every phase's status and time. The exit
status is 0 only when every phase passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dgucdir.data.batches import DomainViews, EpochReader, RawPartners, TrainingBatches  # noqa: E402 (no DALI)

# seconds per phase at --size full on one H100 (generous: a phase past it is reported as timed out)
PHASES: dict[str, int] = {"fourier": 60, "step": 150, "batchnorm": 120, "kmeans": 90, "retrieval": 120,
                          "bank": 60, "trainer": 240, "throughput": 180}
SIZES = {
    "full": dict(fourier=(128, 224), step=("resnet50", 112, 16), bn=("resnet50", 224, 32), kmeans=(20000, 2048, 50),
                 retrieval=(50000, 128, 2000), bank=(16, 224), trainer_size=64, throughput=("resnet50", 224, 128, 10)),
    "small": dict(fourier=(6, 48), step=("resnet_narrow", 32, 8), bn=("resnet_narrow", 32, 4), kmeans=(600, 64, 6),
                  retrieval=(1500, 32, 300), bank=(8, 32), trainer_size=32, throughput=("resnet_narrow", 32, 8, 2)),
}


# --------------------------------------------------------------------------- the check's image source
class TorchvisionImages:
    """An :class:`~dgucdir.data.spec.ImageSource` that decodes with torchvision (on the GPU when ``device``
    is one): the check's way of feeding the trainer on a node without DALI. One rank, global order only."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def training_batches(self, cfg, manifest, rank_batch, device):
        return TorchvisionBatches(cfg, manifest, rank_batch, self.image_size, device)

    def eval_batches(self, domain, batch_size, device):
        from dgucdir.data.reader import SampleReader

        reader, size = SampleReader([domain]), self.image_size
        for start in range(0, domain.count, batch_size):
            index = list(range(start, min(start + batch_size, domain.count)))
            images = [centre_view(img, size) for img in decode([reader.read(0, i)[0] for i in index], device)]
            labels = [reader.read(0, i)[1] for i in index]
            yield (torch.stack(images), torch.tensor(labels, device=device),
                   torch.tensor(index, device=device))


def decode(encoded: list, device) -> list:
    """JPEG bytes (numpy uint8) -> uint8 (3,H,W) tensors on ``device``: nvJPEG on a GPU, libjpeg on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.from_numpy(e.copy()) for e in encoded]
    if device.type == "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return [decode_jpeg(d, mode=ImageReadMode.RGB) for d in data]


def centre_view(img, size: int):
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(img, round(size * 256 / 224), antialias=True), [size, size])


def raw_view(img, size: int):
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(img, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def random_view(img, size: int, gen) -> torch.Tensor:
    """A random resized crop (scale 0.2-1) and flip: enough augmentation to exercise the training step."""
    from torchvision.transforms.v2 import functional as TF

    _, h, w = img.shape
    area = h * w * (0.2 + 0.8 * float(torch.rand((), generator=gen)))
    ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand((), generator=gen)))
    ch, cw = min(h, max(1, round(math.sqrt(area / ratio)))), min(w, max(1, round(math.sqrt(area * ratio))))
    top, left = int(torch.randint(h - ch + 1, (), generator=gen)), int(torch.randint(w - cw + 1, (), generator=gen))
    view = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    return TF.horizontal_flip(view) if float(torch.rand((), generator=gen)) < 0.5 else view


class TorchvisionEpoch(EpochReader):
    """One epoch of :class:`TorchvisionBatches`: the views and raw partners of each step, decoded by torchvision."""

    def __init__(self, owner, epoch: int) -> None:
        self.owner, self.epoch, self.step = owner, epoch, 0
        self.orders = [owner.epoch_order(epoch, d) for d in range(len(owner.domains))]
        self.partners = owner.partner_draws(epoch) if owner.reads_partners else None

    def read(self):
        o, k, s = self.owner, self.owner.per_domain, self.step
        gen = torch.Generator().manual_seed(o.decoder_seed(self.epoch, f"views-{s}"))
        views = []
        for d, order in enumerate(self.orders):
            index = order[s * k:(s + 1) * k]
            records = [o.reader.read(d, int(i)) for i in index]
            images = decode([r[0] for r in records], o.device)
            views.append(DomainViews(torch.stack([random_view(i, o.image_size, gen) for i in images]),
                                     torch.stack([random_view(i, o.image_size, gen) for i in images]),
                                     torch.tensor([r[1] for r in records], device=o.device),
                                     index.to(o.device),
                                     torch.stack([raw_view(i, o.image_size) for i in images]) if o.bank else None))
        partners = None
        if self.partners is not None:
            n = 2 * k * len(o.domains)
            domain, index = (t[s * n:(s + 1) * n] for t in self.partners)
            partners = RawPartners(o.raw_images(domain, index), domain, index)
        self.step += 1
        return views, partners


class TorchvisionBatches(TrainingBatches):
    """The product's training batches (order, partners, bank, Fourier stage) fed by torchvision's decoder."""

    def __init__(self, cfg, manifest, rank_batch, image_size, device) -> None:
        if cfg.data.order != "global":
            raise ValueError("the device check's decoder reads in data.order=global only")
        super().__init__(cfg, manifest, rank_batch, image_size, 0, 1, device)

    def open_epoch(self, epoch: int):
        return TorchvisionEpoch(self, epoch)

    def raw_images(self, domain, index):
        encoded = [self.reader.read(int(d), int(i))[0] for d, i in zip(domain, index)]
        return torch.stack([raw_view(img, self.image_size) for img in decode(encoded, self.device)])


# --------------------------------------------------------------------------- comparisons
def _close(a, b) -> dict:
    """Differences of two tensors of one shape (b the CPU reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "frac_differing": float((diff > 0).double().mean()),
            "rel_norm": float(diff.norm() / b.norm().clamp_min(1e-30))}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_fourier(device, size: str) -> dict:
    """Each partner mode's mix and both phase images on the device against the CPU, up to one level."""
    from dgucdir.data.batches import random_derangement
    from dgucdir.data.fourier import FourierAugment

    n, s = SIZES[size]["fourier"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, s, s), generator=gen).float()
    partners = torch.randint(0, 256, (n, 3, s, s), generator=gen).float()
    aug = FourierAugment(alpha=1.0, hpf_range=max(3, s * 50 // 224), hpf_alpha=0.4, phase_amplitude=50000.0)
    lam = aug.sample_lambdas(n, gen)
    order = random_derangement(n, gen)
    cases: dict[str, Callable] = {
        "raw_partner_mix (per_view_raw, bank)": lambda t, p: aug.mix(t, p, *lam),
        "shared_batch_mix": lambda t, p: aug.mix_with_partner(t, order.to(t.device), *lam),
        "phase_image": lambda t, p: aug.phase_image(t),
        "color_phase_image": lambda t, p: aug.color_phase_image(t),
    }
    out, ok = {}, True
    for name, fn in cases.items():
        ref = fn(x, partners)
        start = time.perf_counter()
        got = fn(x.to(device), partners.to(device))
        _sync(device)
        out[name] = {**_close(got, ref), "seconds": time.perf_counter() - start}
        ok &= out[name]["max_abs"] <= 1 and out[name]["frac_differing"] < 0.01
    return {"ok": ok, "images": [n, 3, s, s], "cases": out}


def _model_losses(device, arch: str, image: int, batch: int, bf16: bool, steps: int = 2) -> list[float]:
    from dgucdir.config import LossConfig, ModelConfig
    from dgucdir.data.batches import Batch
    from dgucdir.model.dgucdir import DGUCDIR

    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(batch, 3, image, image, generator=gen) for _ in range(4)]
    b = Batch(*[v.to(device) for v in views], (torch.arange(batch) % 2).to(device), torch.arange(batch).to(device),
              torch.zeros(batch, dtype=torch.long, device=device))
    torch.manual_seed(0)
    model = DGUCDIR(ModelConfig(arch=arch), LossConfig(queue_size=4 * batch), 2, batch, device).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    losses = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(b)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out["loss"].detach()))
    return losses


def phase_step(device, size: str) -> dict:
    """fp32 steps (TF32 off) on the device against the CPU; bf16 against fp32 on the device."""
    from dgucdir.numerics import apply_numerics

    arch, image, batch = SIZES[size]["step"]
    apply_numerics(tf32=False, deterministic=False)
    cpu = _model_losses(torch.device("cpu"), arch, image, batch, bf16=False)
    fp32 = _model_losses(device, arch, image, batch, bf16=False)
    bf16 = _model_losses(device, arch, image, batch, bf16=True)
    fp32_rel = max(abs(a - b) / abs(b) for a, b in zip(fp32, cpu))
    bf16_rel = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32))
    return {"ok": fp32_rel < 1e-4 and bf16_rel < 1e-2 and all(math.isfinite(v) for v in bf16),
            "arch": arch, "image_size": image, "batch": batch, "losses_cpu": cpu, "losses_fp32": fp32,
            "losses_bf16": bf16, "fp32_vs_cpu_rel": fp32_rel, "bf16_vs_fp32_rel": bf16_rel}


def phase_batchnorm(device, size: str) -> dict:
    from dgucdir.bench_bn import compare_batchnorm

    arch, image, batch = SIZES[size]["bn"]
    fp32 = compare_batchnorm(device, arch, image, batch, repeat=3)
    bf16 = compare_batchnorm(device, arch, image, batch, repeat=3, dtype=torch.bfloat16)
    ok = fp32["saved_ratio"] <= 1.3 and bf16["saved_ratio"] <= 1.3 and fp32["feature_rel_diff"] < 1e-3 \
        and bf16["bn_output_dtype"] == "bfloat16"
    return {"ok": ok, "fp32": fp32, "bf16": bf16}


def phase_kmeans(device, size: str) -> dict:
    from dgucdir.cluster import run_kmeans

    n, d, k = SIZES[size]["kmeans"]
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(k, d, generator=gen) * 3
    x = torch.nn.functional.normalize(centres[torch.randint(k, (n,), generator=gen)] + torch.randn(n, d, generator=gen),
                                      dim=1)
    runs = {}
    for where in (torch.device("cpu"), device):
        start = time.perf_counter()
        r = run_kmeans("euclidean", x.to(where), k, 20, 2, 7, 2000)
        _sync(where)
        runs[where.type if where.type == "cpu" else "device"] = (r, time.perf_counter() - start)
    (cpu, t_cpu), (dev, t_dev) = runs["cpu"], runs.get("device", runs["cpu"])
    agree = float((cpu.assignments == dev.assignments.cpu()).double().mean())
    rel = abs(cpu.objective - dev.objective) / abs(cpu.objective)
    return {"ok": agree > 0.99 and rel < 1e-4, "points": n, "dim": d, "k": k, "assignment_agreement": agree,
            "objective_rel_diff": rel, "seconds_cpu": t_cpu, "seconds_device": t_dev}


def phase_retrieval(device, size: str) -> dict:
    from dgucdir.retrieval import retrieval_metrics

    n, d, subset = SIZES[size]["retrieval"]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 300, (n,), generator=gen)
    protos = torch.randn(300, d, generator=gen)
    q = protos[labels] + 2.0 * torch.randn(n, d, generator=gen)
    g = protos[labels] + 2.0 * torch.randn(n, d, generator=gen)
    start = time.perf_counter()
    full = retrieval_metrics(q.to(device), labels.to(device), g.to(device), labels.to(device), [1, 5, 15], 200)
    _sync(device)
    seconds = time.perf_counter() - start
    on_device = retrieval_metrics(q[:subset].to(device), labels[:subset].to(device), g.to(device), labels.to(device),
                                  [1, 5, 15], 200)
    on_cpu = retrieval_metrics(q[:subset], labels[:subset], g, labels, [1, 5, 15], 200)
    return {"ok": on_device == on_cpu, "queries": n, "gallery": n, "dim": d, "seconds_full": seconds,
            "full": {"P": full[0], "mAP@All": full[1], "mAP@200": full[2]},
            "subset_queries": subset, "subset_device": list(on_device[:3]), "subset_cpu": list(on_cpu[:3])}


def phase_bank(device, size: str) -> dict:
    from dgucdir.data.partner_bank import PartnerBank

    slots, s = SIZES[size]["bank"]
    banks = [PartnerBank([300, 500], slots, s, where) for where in (torch.device("cpu"), device)]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        for dom in (0, 1):
            images = torch.randint(0, 256, (slots // 2 + 1, 3, s, s), generator=gen, dtype=torch.uint8)
            ids = torch.randint(0, 300, (len(images),), generator=gen)
            for bank in banks:
                bank.add(dom, images.to(bank.images.device), ids)
    draws = [bank.draw(4 * slots, torch.Generator().manual_seed(5)) for bank in banks]
    same_draws = all(torch.equal(a, b) for a, b in zip(*draws))
    pixels = [bank.gather(*draw).cpu() for bank, draw in zip(banks, draws)]
    return {"ok": same_draws and torch.equal(*pixels) and banks[1].images.device.type == device.type,
            "slots_per_domain": slots, "image_size": s, "same_draws": same_draws,
            "same_pixels": torch.equal(*pixels), "bank_device": str(banks[1].images.device)}


def phase_trainer(device, size: str, data: Path) -> dict:
    """Trainer.fit (clustering from epoch 1, evaluation) straight through, and once stopped mid-epoch and resumed."""
    from dgucdir.config import load_config
    from dgucdir.train import Trainer

    image = SIZES[size]["trainer_size"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str, extra: list[str]):
            return load_config(str(ROOT / "configs/demo.yaml"), [
                f"data.manifest={data}", "data.train_domains=[ink,neon]", "data.eval_domains=[photo,sketch]",
                f"data.image_size={image}", "augment.hpf_range=7", "train.batch_size=16", "loss.queue_size=64",
                "loss.num_clusters=4", "loss.kmeans_niter=3", "loss.kmeans_nredo=1", "train.epochs=2",
                "train.warmup_epochs=1", "train.eval_every=2", "train.max_steps_per_epoch=4", "train.log_every=1",
                "train.deterministic=true", "tracking.enabled=false", "eval.picture_queries=0",
                f"train.output_dir={tmp}/{name}", *extra])

        source = TorchvisionImages(image)
        straight = Trainer(config("straight", []), images=source)
        start = time.perf_counter()
        finished = straight.fit()
        results["seconds_fit"] = time.perf_counter() - start
        results["device"] = str(straight.device)
        stopped = Trainer(config("resumed", ["train.max_steps=6"]), images=source)
        stopped_early = not stopped.fit()
        resumed = Trainer(config("resumed", []), resume="latest", images=source)
        resumed.fit()
        a, b = straight.last_report.flat_metrics(), resumed.last_report.flat_metrics()
        weights_equal = all(torch.equal(p, q) for p, q in zip(straight.core.state_dict().values(),
                                                               resumed.core.state_dict().values()))
        results.update(finished=finished, stopped_early=stopped_early, eval_metrics=a,
                       resume_metrics_equal=a == b, resume_weights_equal=weights_equal,
                       clusters_used=straight.clusters.state is not None)
    results["ok"] = finished and stopped_early and results["resume_metrics_equal"] and weights_equal \
        and results["clusters_used"]
    return results


def phase_throughput(device, size: str) -> dict:
    """Training steps of the full model on synthetic batches (no data loading): samples/s and MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from dgucdir.bench_train import matmul_peak
    from dgucdir.config import LossConfig, ModelConfig
    from dgucdir.data.batches import Batch
    from dgucdir.model.dgucdir import DGUCDIR
    from dgucdir.numerics import apply_numerics

    arch, image, batch, steps = SIZES[size]["throughput"]
    out = {"arch": arch, "image_size": image, "batch": batch, "timed_steps": steps, "runs": []}
    for precision, tf32 in (("bf16", False), ("fp32", False), ("fp32", True)):
        apply_numerics(tf32=tf32, deterministic=False)
        torch.manual_seed(0)
        model = DGUCDIR(ModelConfig(arch=arch, channels_last=device.type == "cuda"), LossConfig(queue_size=4 * batch),
                        2, batch, device).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
        views = [torch.randn(batch, 3, image, image, device=device) for _ in range(4)]
        b = Batch(*views, torch.arange(batch, device=device) % 2, torch.arange(batch, device=device),
                  torch.zeros(batch, dtype=torch.long, device=device))
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = model(b)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops() / batch
        for _ in range(2):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        samples_s = steps * batch / (time.perf_counter() - start)
        peak = matmul_peak(device, dtype)
        out["runs"].append({"precision": precision, "tf32": tf32, "samples_per_s": samples_s,
                            "gflops_per_sample": flops / 1e9, "matmul_peak_tflops": peak / 1e12,
                            "mfu": flops * samples_s / peak})
    out["ok"] = all(r["samples_per_s"] > 0 for r in out["runs"])
    return out


# --------------------------------------------------------------------------- driver
def run_phase(name: str, device_name: str, size: str, data: Path | None, out: Path) -> int:
    """The child: one phase, its result as OUT/<name>.json (exceptions included); 0 when it passed."""
    device = torch.device(device_name)
    start = time.perf_counter()
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no CUDA device here")
        fn = globals()[f"phase_{name}"]
        result = fn(device, size, data) if name == "trainer" else fn(device, size)
    except Exception as exc:  # the parent reports it; the other phases go on
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    result.update(phase=name, device=device_name, size=size, seconds=time.perf_counter() - start,
                  dali_imported=any(m == "nvidia.dali" or m.startswith("nvidia.dali.") for m in sys.modules))
    if device.type == "cuda" and torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0 if result["ok"] and not result["dali_imported"] else 1


def install(wheelhouse: Path, out: Path) -> str:
    """Installs the wheelhouse offline into OUT/venv (seeing the node's torch); returns its python."""
    venv = out / "venv"
    if not (venv / "bin/python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin/python"), str(wheelhouse / "install_wheelhouse.py"), str(wheelhouse),
                    "--python", str(venv / "bin/python")], check=True)
    return str(venv / "bin/python")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <phase>.json and summary.json")
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full (one GPU) or small (the CPU suite)")
    parser.add_argument("--data", type=Path, help="a packed manifest.json for the trainer phase (default: the demo, "
                        "built into OUT/demo; that needs scikit-learn)")
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES), help="default: all")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every phase's timeout")
    parser.add_argument("--wheelhouse", type=Path, help="install this wheelhouse (scripts/wheelhouse.py --for "
                        "device-check) offline first, into OUT/venv")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # the child process of one phase
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase:
        return run_phase(args.phase, args.device, args.size, args.data, args.out)
    began = time.perf_counter()
    python = sys.executable
    summary: dict = {"device": args.device, "size": args.size, "phases": {}}
    if args.wheelhouse:
        start = time.perf_counter()
        python = install(args.wheelhouse, args.out)
        summary["install_seconds"] = time.perf_counter() - start
    data = args.data
    if data is None and "trainer" in args.phases:
        data = args.out / "demo" / "shards" / "manifest.json"
        if not data.exists():
            subprocess.run([python, "-c", "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                            "from dgucdir.demo import build_demo_data; build_demo_data(Path(sys.argv[2]))",
                            str(ROOT), str(data.parent.parent)], check=True, capture_output=True)
    for name in args.phases:
        timeout = PHASES[name] * args.timeout_scale
        cmd = [python, __file__, "--phase", name, "--device", args.device, "--size", args.size, "--out", str(args.out)]
        if data is not None:
            cmd += ["--data", str(data)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            status = "passed" if proc.returncode == 0 else "failed"
            tail = (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as exc:
            status, tail = "timed out", f"killed after {timeout:.0f} s: {str(exc.stderr or '')[-1500:]}"
        seconds = time.perf_counter() - start
        result_file = args.out / f"{name}.json"
        entry = {"status": status, "seconds": round(seconds, 2), "result": str(result_file)}
        if status != "passed":
            entry["output_tail"] = tail
            if result_file.exists():
                entry["error"] = json.loads(result_file.read_text()).get("error")
        summary["phases"][name] = entry
        print(f"== {name:<11} {status:<9} {seconds:6.1f} s", flush=True)
    summary["seconds"] = round(time.perf_counter() - began, 2)
    summary["passed"] = all(p["status"] == "passed" for p in summary["phases"].values())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"== total       {'passed' if summary['passed'] else 'FAILED':<9} {summary['seconds']:6.1f} s; "
          f"results in {args.out}", flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
