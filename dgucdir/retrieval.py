"""Cross-domain retrieval: features, exact metrics computed in chunks, tables and pictures.

Metrics for a query domain -> gallery domain pair, with cosine similarity:
- P@K: K is capped at the number of gallery items of the query's class (K' = min(K, n_rel)),
  micro-averaged over queries as the original does: sum of hits in the top K' / sum of K'.
- mAP@All: mean over queries of the standard average precision over the full ranking.
- mAP@K: mean over queries of sum_{j<=K, rel_j} P(j) / min(K, n_rel).
Queries whose class has no gallery item are left out (their K' and AP are undefined).

Rankings are computed per chunk of queries with a stable sort of similarities quantised to
1e-6, so ties go to the lower gallery index, deterministically; no N x N matrix is ever held.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import dist
from .config import EvalConfig
from .data.fourier import normalize
from .data.manifest import Domain, Manifest
from .data.spec import ImageSource

log = logging.getLogger(__name__)

SIM_QUANTUM = 1e6  # similarities are compared at 1e-6 resolution (exact in fp32: < 2**24)
CHUNK_BYTES = 512 * 2**20  # working memory per query chunk; ~24 bytes per (query, gallery) entry


@dataclass
class PairMetrics:
    query: str
    gallery: str
    precision: dict[int, float]
    map_all: float
    map_k: float
    n_queries: int

    def as_dict(self, map_k: int) -> dict[str, float]:
        out = {f"P@{k}": v for k, v in self.precision.items()}
        out["mAP@All"] = self.map_all
        out[f"mAP@{map_k}"] = self.map_k
        return out


def rank_gallery(keys: torch.Tensor) -> torch.Tensor:
    """Gallery indices by descending integer-valued key per row, ties to the lower index.

    On a GPU a stable torch.sort. On a CPU the (key, index) pair is packed into one int64 and
    sorted with numpy's vectorised sort, about 6x faster than torch's stable sort of the keys.
    """
    if keys.device.type != "cpu":
        return torch.sort(keys, dim=1, descending=True, stable=True).indices
    packed = keys.numpy().astype(np.int64)  # in place from here: each full pass costs
    np.negative(packed, out=packed)
    np.left_shift(packed, 32, out=packed)
    np.bitwise_or(packed, np.arange(keys.shape[1], dtype=np.int64), out=packed)  # ascending = key desc, index asc
    packed.sort(axis=1)
    np.bitwise_and(packed, 0xFFFFFFFF, out=packed)
    return torch.from_numpy(packed)


@dataclass
class QueryScores:
    """Per scored query (queries whose class has gallery items), in the order given: what the metrics sum.

    Kept per query so that any split of the queries (over ranks, over chunks) sums to the same figures:
    the counts are integers, the average precisions are summed in query order in float64.
    """

    index: torch.Tensor  # (n,) int64: the query's position (or global index) as given
    hits: torch.Tensor  # (n, len(topk)) int64: relevant items in the top K' = min(K, n_rel)
    k_eff: torch.Tensor  # (n, len(topk)) int64: K'
    ap: torch.Tensor  # (n,) float64: average precision over the full ranking
    ap_k: torch.Tensor  # (n,) float64: average precision in the top map_k

    @classmethod
    def empty(cls, n_topk: int) -> "QueryScores":
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, n_topk, dtype=torch.long),
                   torch.zeros(0, n_topk, dtype=torch.long), torch.zeros(0, dtype=torch.float64),
                   torch.zeros(0, dtype=torch.float64))

    @classmethod
    def cat(cls, parts: list["QueryScores"]) -> "QueryScores":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("index", "hits", "k_eff", "ap", "ap_k")))

    def sorted(self) -> "QueryScores":
        order = torch.argsort(self.index, stable=True)
        return QueryScores(self.index[order], self.hits[order], self.k_eff[order], self.ap[order], self.ap_k[order])

    def metrics(self, topk: list[int]) -> tuple[dict[int, float], float, float, int]:
        """(P@K per K, mAP@All, mAP@map_k, number of scored queries), summed in the order held."""
        hits, denom = self.hits.sum(0), self.k_eff.sum(0)
        precision = {k: float(hits[i]) / max(float(denom[i]), 1.0) for i, k in enumerate(topk)}
        n = max(len(self.index), 1)
        return precision, float(self.ap.sum()) / n, float(self.ap_k.sum()) / n, len(self.index)

    def gathered(self) -> "QueryScores":
        """Every rank's scores on every rank, in index order (the queries' global indices must be distinct)."""
        if not dist.is_distributed():
            return self.sorted()
        device = dist.comm_device()
        ints = dist.gather_variable(torch.cat([self.index[:, None], self.hits, self.k_eff], 1).to(device)).cpu()
        floats = dist.gather_variable(torch.stack([self.ap, self.ap_k], 1).to(device)).cpu()
        k = self.hits.shape[1]
        return QueryScores(ints[:, 0], ints[:, 1:1 + k], ints[:, 1 + k:], floats[:, 0], floats[:, 1]).sorted()


def query_scores(q_feat: torch.Tensor, q_lab: torch.Tensor, g_feat: torch.Tensor, g_lab: torch.Tensor,
                 topk: list[int], map_k: int, chunk_size: int = 1024, q_index: torch.Tensor | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> QueryScores:
    """The per-query figures of ``q_feat`` against the whole gallery, ``chunk_size`` queries at a time and at
    most ``chunk_bytes`` of working memory (about 24 bytes per query-gallery entry); never an N x N matrix."""
    if q_feat.shape[0] == 0:
        return QueryScores.empty(len(topk))
    q_index = torch.arange(q_feat.shape[0]) if q_index is None else q_index.cpu().long()
    q_feat = F.normalize(q_feat.float(), dim=1)
    g_feat = F.normalize(g_feat.float(), dim=1)
    n_gallery = g_feat.shape[0]
    n_classes = int(max(q_lab.max(), g_lab.max())) + 1
    n_rel_of_class = torch.bincount(g_lab, minlength=n_classes)
    chunk = max(1, min(chunk_size, chunk_bytes // (24 * max(n_gallery, 1))))
    positions = torch.arange(1, n_gallery + 1, device=g_feat.device, dtype=torch.float32)
    ks = torch.tensor(topk, device=g_feat.device)
    parts = []
    for start in range(0, q_feat.shape[0], chunk):
        ql = q_lab[start : start + chunk]
        n_rel = n_rel_of_class[ql]
        keep = n_rel > 0
        if not keep.any():
            continue
        ql, n_rel = ql[keep], n_rel[keep]
        sims = q_feat[start : start + chunk][keep] @ g_feat.T
        # Quantise to 1e-6: BLAS may round identical gallery vectors differently by position,
        # which would break exact ties at random instead of towards the lower gallery index.
        order = rank_gallery(sims.mul_(SIM_QUANTUM).round_())
        del sims
        rel = g_lab[order] == ql[:, None]
        del order
        cum = rel.cumsum(1, dtype=torch.int32)
        k_eff = torch.minimum(n_rel[:, None], ks[None, :])
        hits = cum.gather(1, k_eff - 1)
        prec_at_rel = torch.where(rel, cum.float() / positions, 0.0)
        ap = prec_at_rel.sum(1).double() / n_rel
        ap_k = prec_at_rel[:, :map_k].sum(1).double() / n_rel.clamp(max=map_k)
        parts.append(QueryScores(q_index[start : start + chunk][keep.cpu()], hits.long().cpu(), k_eff.long().cpu(),
                                 ap.cpu(), ap_k.cpu()))
    return QueryScores.cat(parts) if parts else QueryScores.empty(len(topk))


def retrieval_metrics(q_feat: torch.Tensor, q_lab: torch.Tensor, g_feat: torch.Tensor, g_lab: torch.Tensor,
                      topk: list[int], map_k: int, chunk_size: int = 1024) -> tuple[dict[int, float], float, float, int]:
    """(P@K per K, mAP@All, mAP@map_k, number of scored queries); features need not be normalised."""
    return query_scores(q_feat, q_lab, g_feat, g_lab, topk, map_k, chunk_size).metrics(topk)


# --------------------------------------------------------------------------- features
def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name ("no", "bf16", "fp16"), as accelerate names them."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def embed_local(encoder: torch.nn.Module, domain: Domain, source: ImageSource, batch_size: int,
                device: torch.device, transform=None, precision: str = "no"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's shard of ``domain``: (L2-normalised pooled features, labels, indices within the domain).

    ``transform`` maps uint8 images to the encoder's input (default: ImageNet normalisation; the
    trainer passes phase images for clustering). ``precision`` is the training run's ("no" = fp32,
    as the original evaluates), so features are embedded the way the model was trained.
    """
    feats, labels, indices = [], [], []
    for images, label, index in source.eval_batches(domain, batch_size, device):
        x = transform(images) if transform is not None else normalize(images)
        with autocast(device, precision):
            feats.append(F.normalize(encoder.pooled(x).float(), dim=1))
        labels.append(label)
        indices.append(index)
    if not feats:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return torch.zeros(0, encoder.feature_dim, device=device), empty, empty
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def extract_features(encoder: torch.nn.Module, domain: Domain, source: ImageSource, batch_size: int,
                     device: torch.device, to_all_ranks: bool = True, precision: str = "no"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``domain`` in dataset order, on every rank (or rank 0 only).

    Each rank embeds its shard; the pieces are gathered and put back in order by their index
    within the domain. Ranks other than 0 get empty tensors when ``to_all_ranks`` is False.
    """
    return in_dataset_order(domain, embed_local(encoder, domain, source, batch_size, device, precision=precision),
                            to_all_ranks)


def in_dataset_order(domain: Domain, local: tuple[torch.Tensor, torch.Tensor, torch.Tensor], to_all_ranks: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (features, labels, indices) of ``domain`` gathered and put in dataset order (on every rank,
    or on rank 0 only: the others get empty tensors)."""
    device = local[0].device
    f_all, l_all, i_all = (dist.gather_variable(t, to_all_ranks) for t in local)
    if not to_all_ranks and dist.rank() != 0:
        return local[0][:0], local[1][:0]
    if i_all.numel() != domain.count or not torch.equal(torch.sort(i_all).values, torch.arange(domain.count, device=device)):
        raise RuntimeError(f"eval of {domain.name}: got {i_all.numel()} samples, expected each of {domain.count} once")
    out_f = torch.empty_like(f_all)
    out_l = torch.empty_like(l_all)
    out_f[i_all] = f_all
    out_l[i_all] = l_all
    return out_f, out_l


# --------------------------------------------------------------------------- reports
@dataclass
class EvalReport:
    domains: list[str]
    topk: list[int]
    map_k: int
    pairs: list[PairMetrics] = field(default_factory=list)

    def metric_names(self) -> list[str]:
        return [f"P@{k}" for k in self.topk] + ["mAP@All", f"mAP@{self.map_k}"]

    def mean(self) -> dict[str, float]:
        names = self.metric_names()
        return {n: sum(p.as_dict(self.map_k)[n] for p in self.pairs) / len(self.pairs) for n in names}

    def flat_metrics(self) -> dict[str, float]:
        """{'ink_to_neon/P@1': ..., 'mean/P@1': ...}, e.g. for MLflow."""
        out = {f"{p.query}_to_{p.gallery}/{n}": v for p in self.pairs for n, v in p.as_dict(self.map_k).items()}
        out.update({f"mean/{n}": v for n, v in self.mean().items()})
        return out

    def markdown(self) -> str:
        lookup = {(p.query, p.gallery): p.as_dict(self.map_k) for p in self.pairs}
        blocks = []
        mean = self.mean()
        for name in self.metric_names():
            head = f"| {name} (query \\ gallery) | " + " | ".join(self.domains) + " | row mean |"
            rows = [head, "|" + "---|" * (len(self.domains) + 2)]
            for q in self.domains:
                vals = [lookup[(q, g)][name] for g in self.domains if g != q]
                cells = ["—" if g == q else f"{100 * lookup[(q, g)][name]:.2f}" for g in self.domains]
                rows.append(f"| {q} | " + " | ".join(cells) + f" | {100 * sum(vals) / len(vals):.2f} |")
            rows.append(f"\n**mean {name} over {len(self.pairs)} ordered pairs: {100 * mean[name]:.2f}**")
            blocks.append("\n".join(rows))
        return "\n\n".join(blocks) + "\n"

    def to_json(self) -> str:
        return json.dumps({"domains": self.domains, "pairs": [{"query": p.query, "gallery": p.gallery,
                           "n_queries": p.n_queries, **p.as_dict(self.map_k)} for p in self.pairs],
                           "mean": self.mean()}, indent=1)

    def save(self, out_dir: Path, stem: str = "retrieval") -> list[Path]:
        """Writes the markdown table, then the JSON, each atomically: a ``<stem>.json`` present is a
        complete evaluation (the trainer redoes a scheduled one whose JSON is missing)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
        atomic_write_text(md, self.markdown())
        atomic_write_text(js, self.to_json() + "\n")
        return [md, js]


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or is untouched: written beside it under a name of this process, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def thumbnail(domain: Domain, record, size: int = 72) -> Image.Image:
    with Image.open(io.BytesIO(domain.read_image_bytes(record))) as img:
        return img.convert("RGB").resize((size, size), Image.BILINEAR)


def picture_grid(rows: list[list[tuple[Image.Image, str]]], size: int = 72, pad: int = 4) -> Image.Image:
    """Rows of (tile, frame colour); the first tile of each row (the query) stands a little apart."""
    cell = size + 2 * pad
    canvas = Image.new("RGB", (max(len(r) for r in rows) * cell + 8, len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for row, tiles in enumerate(rows):
        for col, (tile, color) in enumerate(tiles):
            x, y = col * cell + (8 if col else 0), row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=color)
            canvas.paste(tile.resize((size, size)), (x + pad, y + pad))
    return canvas


def retrieval_picture(q_domain: Domain, g_domain: Domain, q_feat: torch.Tensor, q_lab: torch.Tensor,
                      g_feat: torch.Tensor, g_lab: torch.Tensor, n_queries: int, topk: int, seed: int = 0,
                      size: int = 72, records: dict[str, list] | None = None) -> Image.Image:
    """Rows: a query (blue frame) then its top-k gallery items, framed green if correct, red if not.

    ``records``: the domains' sample tables already read (by domain name), so that the pictures of an
    evaluation parse each domain's table once, not once per pair."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(q_feat.shape[0], generator=gen)[:n_queries].tolist()
    records = {} if records is None else records
    for domain in (q_domain, g_domain):
        if domain.name not in records:
            records[domain.name] = domain.samples()
    q_rec, g_rec = records[q_domain.name], records[g_domain.name]
    g_norm = F.normalize(g_feat.float(), dim=1)
    rows = []
    for qi in picks:
        top = top_matches(g_norm, q_feat[qi], topk)[1].tolist()
        tiles = [(thumbnail(q_domain, q_rec[qi], size), "blue")]
        tiles += [(thumbnail(g_domain, g_rec[gi], size), "green" if g_lab[gi] == q_lab[qi] else "red") for gi in top]
        rows.append(tiles)
    return picture_grid(rows, size)


def top_matches(gallery: torch.Tensor, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, indices) of the k most similar L2-normalised gallery rows; ties to the lower index."""
    sims = gallery @ F.normalize(query.float(), dim=0)
    order = torch.sort(sims.mul(SIM_QUANTUM).round(), descending=True, stable=True).indices[:k]
    return sims[order], order


def evaluate(encoder: torch.nn.Module, manifest: Manifest, domains: list[str], source: ImageSource,
             cfg: EvalConfig, device: torch.device, out_dir: Path | None = None, stem: str = "retrieval",
             precision: str = "no", checkpoint: Callable[[], None] = lambda: None) -> tuple[EvalReport, list[Path]]:
    """Embeds every domain once, scores every ordered pair, saves tables (and pictures) on rank 0.

    Sharded by query: each rank embeds its share of every domain; the features of each domain are
    shared once (the galleries, on every rank); each rank scores only its own queries against them,
    in chunks of at most ``eval.chunk_mib``; the per-query figures are gathered and summed in query
    order, so the metrics equal one process's exactly, at any world size. The scoring work is divided
    by the world size, where it used to be repeated on every rank.

    ``checkpoint()`` is called on every rank after each domain's embedding and each pair's scoring
    (the trainer's stop check, which may raise): a long evaluation is never in the way of a stop.
    """
    manifest.check_domains(domains, "eval domains")
    was_training = encoder.training
    encoder.eval()
    local, feats = {}, {}
    try:
        for d in domains:
            local[d] = embed_local(encoder, manifest.domain(d), source, cfg.batch_size, device, precision=precision)
            feats[d] = in_dataset_order(manifest.domain(d), local[d])
            checkpoint()
    finally:
        encoder.train(was_training)
    report = EvalReport(list(domains), list(cfg.topk), cfg.map_k)
    for q in domains:
        for g in domains:
            if q == g:
                continue
            checkpoint()
            q_feat, q_lab, q_index = local[q]
            scores = query_scores(q_feat, q_lab, *feats[g], cfg.topk, cfg.map_k, cfg.chunk_size, q_index,
                                  cfg.chunk_mib * 2**20).gathered()
            report.pairs.append(PairMetrics(q, g, *scores.metrics(cfg.topk)))
    files: list[Path] = []
    if out_dir is not None and dist.rank() == 0:
        files = report.save(out_dir, stem)
        if cfg.picture_queries > 0:
            records: dict[str, list] = {}
            for p in report.pairs:
                pic = retrieval_picture(manifest.domain(p.query), manifest.domain(p.gallery), *feats[p.query],
                                        *feats[p.gallery], cfg.picture_queries, cfg.picture_topk, records=records)
                path = out_dir / f"{stem}_{p.query}_to_{p.gallery}.png"
                pic.save(path)
                files.append(path)
    return report, files
