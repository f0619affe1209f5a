"""`dgucdir search`: the closest gallery images for query images, with a cached gallery embedding."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .checkpoint import SHARED, encoder_from_checkpoint
from .data.fourier import normalize
from .data.manifest import Manifest
from .data.pipeline import PipelineSpec
from .retrieval import extract_features, picture_grid, thumbnail, top_matches

log = logging.getLogger(__name__)


def load_query(path: Path, size: int) -> torch.Tensor:
    """A query image as the eval pipeline shapes it: shorter side to 256/224 * size, centre crop; uint8 CHW."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"query image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"query image {path}: cannot be read as an image ({exc})") from None
    short = round(size * 256 / 224)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def gallery_cache_key(ckpt_state: Path, manifest: Manifest, domain: str, image_size: int) -> str:
    """Changes when the checkpoint's weights, the gallery's shards or the image size change."""
    h = hashlib.sha256()
    with ckpt_state.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    for shard in manifest.domain(domain).shards:
        h.update(shard.sha256.encode())
    h.update(f"{domain}:{image_size}".encode())
    return h.hexdigest()[:20]


def gallery_features(encoder, ckpt: Path, manifest: Manifest, domain: str, image_size: int, batch_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The gallery's features, embedded once and cached next to the checkpoint."""
    state = ckpt / SHARED if ckpt.is_dir() else ckpt
    cache_dir = state.parent / "search_cache"
    path = cache_dir / f"{domain}-{gallery_cache_key(state, manifest, domain, image_size)}.pt"
    if path.is_file():
        cached = torch.load(path, map_location=device)
        return cached["features"], cached["labels"]
    log.info("embedding gallery %r (cached in %s)", domain, path)
    spec = PipelineSpec(image_size, 0, 1, 0 if device.type == "cuda" else None, 2)
    feats, labels = extract_features(encoder, manifest.domain(domain), spec, batch_size, device)
    cache_dir.mkdir(exist_ok=True)
    for stale in cache_dir.glob(f"{domain}-*.pt"):
        stale.unlink()
    tmp = path.with_suffix(".tmp")
    torch.save({"features": feats.cpu(), "labels": labels.cpu()}, tmp)
    tmp.replace(path)
    return feats, labels


@torch.no_grad()
def run_search(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = Path(args.checkpoint)
    encoder, cfg = encoder_from_checkpoint(ckpt)
    encoder = encoder.to(device).eval()
    manifest = Manifest.load(args.manifest or cfg.data.manifest)
    try:
        gallery = manifest.domain(args.gallery)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    size = cfg.data.image_size
    queries = torch.stack([load_query(Path(q), size) for q in args.query]).to(device)
    feats, _ = gallery_features(encoder, ckpt, manifest, args.gallery, size, cfg.eval.batch_size, device)
    feats = feats.to(device)
    q_feat = F.normalize(encoder.pooled(normalize(queries)).float(), dim=1)
    records = gallery.samples()
    rows = []
    for qpath, qf, qimg in zip(args.query, q_feat, queries):
        scores, idx = top_matches(feats, qf, args.top)
        print(f"\nquery {qpath}: top {len(idx)} in {args.gallery!r}")
        print("rank  score   class  index  path")
        tiles = [(Image.fromarray(qimg.permute(1, 2, 0).cpu().numpy()), "blue")]
        for rank, (s, i) in enumerate(zip(scores.tolist(), idx.tolist()), 1):
            rec = records[i]
            print(f"{rank:>4}  {s:6.3f}  {manifest.classes[rec.label]:>5}  {i:>5}  {rec.source}")
            tiles.append((thumbnail(gallery, rec), "gray"))
        rows.append(tiles)
    picture_grid(rows).save(args.out)
    print(f"\npicture: {args.out}")
    return 0
