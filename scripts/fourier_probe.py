"""Whose class does a Fourier-mixed view carry: its own, or its partner's? (the probe in docs/DESIGN.md)

The two-stage Fourier augmentation assumes that the amplitude spectrum holds "style" and the phase
holds the content: a view mixed with another image's amplitude should still be the same object.
This probe measures that assumption on a dataset with a trained encoder as the judge: every
training image is mixed with a partner *of another class* at fixed strengths (lambda_a, lambda_p),
embedded, and classified by the nearest class centroid of the unmixed images' features. It prints
how often the mixed view is still recognised as its own class, and how often as its partner's.

    python scripts/fourier_probe.py runs/ablate-demo/no_fourier-seed0/encoder.safetensors

Judge with an encoder trained *without* Fourier mixing, so it has not learnt to ignore it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F

from dgucdir.data.fourier import FourierAugment, normalize
from dgucdir.data.loader import eval_batches
from dgucdir.data.manifest import Manifest
from dgucdir.data.spec import PipelineSpec
from dgucdir.model.loading import load_encoder


@torch.no_grad()
def probe(encoder_path: str, manifest_path: str | None, lambdas_a: list[float], lambdas_p: list[float],
          windows: list[int] | None, seed: int) -> dict:
    encoder, cfg = load_encoder(encoder_path)
    encoder.eval()
    manifest = Manifest.load(manifest_path or cfg.data.manifest)
    cpu = torch.device("cpu")
    spec = PipelineSpec.for_device(cfg.data.image_size, 2, cpu)
    images, labels = [], []
    for name in cfg.data.train_domains:
        for x, y, _ in eval_batches(manifest.domain(name), spec, 256, cpu):
            images.append(x.float())
            labels.append(y)
    x, y = torch.cat(images), torch.cat(labels)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(encoder.pooled(normalize(b)), dim=1) for b in batch.split(256)])

    feats = embed(x)
    classes = y.unique()
    centroids = F.normalize(torch.stack([feats[y == c].mean(0) for c in classes]), dim=1)
    gen = torch.Generator().manual_seed(seed)
    partner = torch.randperm(len(x), generator=gen)  # redrawn where the partner has the same class
    for _ in range(100):
        same = y[partner] == y
        if not same.any():
            break
        partner[same] = torch.randint(len(x), (int(same.sum()),), generator=gen)
    keep = y[partner] != y
    x, y, p, yp = x[keep], y[keep], x[partner[keep]], y[partner[keep]]
    rows = []
    for window in windows or [cfg.augment.hpf_range]:
        augment = dataclasses.replace(FourierAugment.from_config(cfg.augment), hpf_range=window)
        for lam_p in lambdas_p:
            for lam_a in lambdas_a:
                n = len(x)
                mixed = augment.mix(x, p, torch.full((n,), lam_a), torch.full((n,), lam_p))
                pred = classes[(embed(mixed) @ centroids.T).argmax(1)]
                rows.append({"hpf_range": window, "lambda_a": lam_a, "lambda_p": lam_p,
                             "own_class": float((pred == y).float().mean()),
                             "partner_class": float((pred == yp).float().mean())})
    return {"encoder": encoder_path, "domains": cfg.data.train_domains, "image_size": cfg.data.image_size,
            "pairs": len(x), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("encoder", help="encoder.safetensors of a trained run (its config names data and sizes)")
    parser.add_argument("--manifest", help="default: the manifest in the encoder's config")
    parser.add_argument("--lambda-a", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--lambda-p", type=float, nargs="+", default=[0.0, 0.4])
    parser.add_argument("--hpf-range", type=int, nargs="+", help="phase-mix window sides (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = probe(args.encoder, args.manifest, args.lambda_a, args.lambda_p, args.hpf_range, args.seed)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
