"""`dgucdir search`: the closest gallery images for query images, with a cached gallery embedding."""

from __future__ import annotations

import hashlib
import os
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import SHARED, safe_load
from .data.fourier import normalize
from .data.manifest import Manifest, SampleRecord
from .data.spec import PipelineSpec
from .data.image_file import ImageFileError, open_image, read_image_file
from .errors import CheckpointError, DataError, first_line
from .model.loading import encoder_from_checkpoint
from .retrieval import extract_features, picture_grid, thumbnail, top_matches
from .threads import ThreadBudget

log = logging.getLogger(__name__)


def load_query(path: Path, size: int) -> torch.Tensor:
    """A query image as the eval pipeline shapes it: shorter side to 256/224 * size, centre crop; uint8 CHW."""
    try:
        with open_image(read_image_file(path)) as img:  # the same limits as `dgucdir pack`
            img = img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"query image {path}: no such file") from None
    except ImageFileError as exc:
        raise DataError(f"query image {path}: refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever the decoder says, it is one line for the user
        raise DataError(f"query image {path}: cannot be read as an image ({first_line(exc)})") from None
    short = round(size * 256 / 224)
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def weights_digest(encoder: torch.nn.Module) -> str:
    """sha256 of the encoder's tensors: what the gallery features depend on (not the optimizer etc.)."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gallery_cache_key(encoder: torch.nn.Module, manifest: Manifest, domain: str, image_size: int) -> str:
    """Changes when the encoder's weights, the gallery's shards or the image size change."""
    h = hashlib.sha256(weights_digest(encoder).encode())
    for shard in manifest.domain(domain).shards:
        h.update(shard.sha256.encode())
    h.update(f"{domain}:{image_size}".encode())
    return h.hexdigest()[:20]


def gallery_features(encoder: torch.nn.Module, cache_dir: Path, manifest: Manifest, domain: str, image_size: int,
                     batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The gallery's features, embedded once and cached in ``cache_dir``."""
    path = cache_dir / f"{domain}-{gallery_cache_key(encoder, manifest, domain, image_size)}.pt"
    if path.is_file():
        try:
            cached = safe_load(path)
            return cached["features"].to(device), cached["labels"].to(device)
        except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring the gallery cache %s, embedding again (%s)", path, exc)
    log.info("embedding gallery %r (cached in %s)", domain, path)
    spec = PipelineSpec.for_device(image_size, ThreadBudget.for_rank().apply(1), device)
    feats, labels = extract_features(encoder, manifest.domain(domain), spec, batch_size, device)
    cache_dir.mkdir(exist_ok=True)
    for stale in cache_dir.glob(f"{domain}-*.pt"):
        stale.unlink()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")  # never another process's file
    torch.save({"features": feats.cpu(), "labels": labels.cpu()}, tmp)
    tmp.replace(path)
    return feats, labels


@dataclass
class Match:
    rank: int
    score: float
    index: int
    record: SampleRecord
    class_name: str


@dataclass
class SearchResult:
    query: Path
    matches: list[Match]


@torch.no_grad()
def search(checkpoint: Path, gallery: str, queries: list[Path], top: int, manifest_path: str | None = None,
           picture: Path | None = None) -> list[SearchResult]:
    """The ``top`` gallery images closest to each query image; optionally a picture of them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder, cfg = encoder_from_checkpoint(checkpoint)
    encoder = encoder.to(device).eval()
    manifest = Manifest.load(manifest_path or cfg.data.manifest)
    domain = manifest.domain(gallery)
    size = cfg.data.image_size
    images = torch.stack([load_query(q, size) for q in queries]).to(device)
    state = checkpoint / SHARED if checkpoint.is_dir() else checkpoint
    feats, _ = gallery_features(encoder, state.parent / "search_cache", manifest, gallery, size,
                                cfg.eval.batch_size, device)
    feats = feats.to(device)
    q_feat = F.normalize(encoder.pooled(normalize(images)).float(), dim=1)
    records = domain.samples()
    results, rows = [], []
    for qpath, qf, qimg in zip(queries, q_feat, images):
        scores, idx = top_matches(feats, qf, top)
        matches = [Match(r, s, i, records[i], manifest.classes[records[i].label])
                   for r, (s, i) in enumerate(zip(scores.tolist(), idx.tolist()), 1)]
        results.append(SearchResult(qpath, matches))
        rows.append([(Image.fromarray(qimg.permute(1, 2, 0).cpu().numpy()), "blue")]
                    + [(thumbnail(domain, m.record), "gray") for m in matches])
    if picture is not None:
        picture_grid(rows).save(picture)
    return results
