"""Image lists / folder trees -> webdataset shards + DALI index files + manifest.json.

Every image is decoded once here, so that training never meets a broken file: missing,
empty, truncated or undecodable images and decompression bombs are skipped and reported.
Images that DALI cannot decode as they are (CMYK, palette, alpha, exotic formats) are
re-encoded losslessly as PNG; everything else keeps its original bytes.

Packing is idempotent (fixed tar metadata, seeded shuffle: the same input gives byte-identical
shards) and atomic (shards are written under temporary names and renamed, and the manifest,
written last, never points at partial shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import DataError
from ..file_lock import FolderLock
from .image_file import MAX_PIXELS, ImageFileError, open_image, read_image_file
from .manifest import CLASS_EXT, INDEX_EXT, LABEL_EXT, MANIFEST_VERSION, PATH_EXT, sample_table

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
PACK_SEED = 20231001  # fixed: shard order must not depend on anything but the input


class PackError(DataError):
    """Bad packing input (malformed list line, unknown folder layout)."""


@dataclass(frozen=True)
class Item:
    """One image to pack: where it is and what it is."""

    domain: str
    source: Path
    rel: str
    label: int


@dataclass(frozen=True)
class Checked:
    """An image after validation: its bytes for the shard, or why it was skipped."""

    item: Item
    data: bytes | None
    ext: str
    reason: str = ""


# --------------------------------------------------------------------------- inputs
def read_list(domain: str, list_file: Path, root: Path, label_offset: int) -> list[Item]:
    """Reads ``relative/path.jpg label`` lines; a malformed line is an error with file:line."""
    items = []
    with list_file.open() as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(None, 1)
            if len(parts) != 2:
                raise PackError(f"{list_file}:{lineno}: expected 'relative/path label', got {text!r}")
            rel, label_text = parts
            try:
                label = int(label_text) - label_offset
            except ValueError:
                raise PackError(f"{list_file}:{lineno}: label {label_text!r} is not an integer") from None
            if label < 0:
                raise PackError(
                    f"{list_file}:{lineno}: label {label_text} is below the label offset {label_offset} "
                    "(PACS lists are 1-based: --label-offset 1; DomainNet lists are 0-based)"
                )
            items.append(Item(domain, root / rel, rel, label))
    return items


def read_tree(root: Path) -> tuple[dict[str, list[Item]], list[str]]:
    """Reads ``root/<domain>/<class>/<image>``; classes are the sorted union of class folders."""
    if not root.is_dir():
        raise PackError(f"{root} is not a folder")
    domains = sorted(p for p in root.iterdir() if p.is_dir())
    if not domains:
        raise PackError(f"{root}: expected root/<domain>/<class>/<image>, found no domain folders")
    classes = sorted({c.name for d in domains for c in d.iterdir() if c.is_dir()})
    label = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[Item]] = {}
    for d in domains:
        items = []
        for c in sorted(p for p in d.iterdir() if p.is_dir()):
            for f in sorted(c.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    items.append(Item(d.name, f, str(f.relative_to(root)), label[c.name]))
        out[d.name] = items
    return out, classes


def class_names_from_paths(items: list[Item], n_classes: int) -> list[str]:
    """Names class k after the folder most of its images sit in (DomainNet's domain/class/x.jpg)."""
    votes: dict[int, Counter] = {}
    for it in items:
        votes.setdefault(it.label, Counter())[Path(it.rel).parent.name] += 1
    names = []
    for k in range(n_classes):
        best = votes[k].most_common(1)[0][0] if k in votes else ""
        names.append(best or f"class_{k}")
    return names


# --------------------------------------------------------------------------- validation
def check_image(item: Item, max_pixels: int) -> Checked:
    """Decodes the image fully; returns its shard bytes or the reason it is skipped."""
    try:
        data = read_image_file(item.source)
    except FileNotFoundError:
        return Checked(item, None, "", "missing file")
    except ImageFileError as exc:
        return Checked(item, None, "", str(exc))
    except OSError as exc:
        return Checked(item, None, "", f"unreadable: {exc}")
    if not data:
        return Checked(item, None, "", "zero-byte file")
    try:
        with open_image(data, max_pixels) as img:
            width, height = img.size
            if width < 2 or height < 2:
                return Checked(item, None, "", f"absurd size {width}x{height}")
            fmt, mode = img.format, img.mode
            img.load()
            if fmt in ("JPEG", "PNG") and mode in ("RGB", "L"):
                return Checked(item, data, "jpg" if fmt == "JPEG" else "png")
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            return Checked(item, buf.getvalue(), "png")
    except ImageFileError as exc:
        return Checked(item, None, "", str(exc))
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a broken image
        return Checked(item, None, "", f"undecodable: {type(exc).__name__}: {exc}")


def _check_chunk(args: tuple[list[Item], int]) -> list[Checked]:
    items, max_pixels = args
    return [check_image(it, max_pixels) for it in items]


def check_all(items: list[Item], workers: int, max_pixels: int, progress: bool) -> list[Checked]:
    """Validates all images on ``workers`` processes, keeping input order."""
    chunk = 64
    chunks = [(items[i : i + chunk], max_pixels) for i in range(0, len(items), chunk)]
    out: list[Checked] = []
    bar = tqdm(total=len(items), desc="checking images", unit="img", disable=not progress)
    if workers <= 1:
        results = map(_check_chunk, chunks)
        for res in results:
            out.extend(res)
            bar.update(len(res))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for res in pool.map(_check_chunk, chunks):
                out.extend(res)
                bar.update(len(res))
    bar.close()
    return out


# --------------------------------------------------------------------------- writing
def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Adds a file with fixed metadata; returns (data offset, size) for the DALI index."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
    start = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return start + header, info.size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_domain(domain: str, samples: list[Checked], out: Path, shard_bytes: int) -> dict:
    """Writes one domain's shards (temporary names) and returns its manifest entry.

    Samples get their index in input order; the shard order is a seeded shuffle, because
    DALI shuffles from a buffer while reading tars in order (nearly sorted early batches otherwise).
    """
    ddir = out / domain
    ddir.mkdir(parents=True, exist_ok=True)
    order = list(range(len(samples)))
    random.Random(f"{PACK_SEED}:{domain}").shuffle(order)
    shards: list[dict] = []
    rows: list[str] = []
    table_rows: list[tuple[int, int, int, int, int]] = []  # (index, label, shard position, offset, size)
    tar = None
    idx_lines: list[str] = []
    size = 0

    def close() -> None:
        nonlocal tar, idx_lines
        if tar is None:
            return
        tar.close()
        name = f"{domain}-{len(shards):06d}"
        tmp_tar, tmp_idx = ddir / f".tmp-{name}.tar", ddir / f".tmp-{name}.idx"
        tmp_idx.write_text(f"v1.2 {len(idx_lines)}\n" + "".join(line + "\n" for line in idx_lines))
        shards.append({"path": f"{domain}/{name}.tar", "index": f"{domain}/{name}.idx", "count": len(idx_lines),
                       "sha256": _sha256(tmp_tar)})
        tar, idx_lines = None, []

    for index in order:
        chk = samples[index]
        if tar is None or size >= shard_bytes:
            close()
            tar = tarfile.open(ddir / f".tmp-{domain}-{len(shards):06d}.tar", "w", format=tarfile.USTAR_FORMAT)
            size = 0
        key = f"{index:08d}"
        components = [
            (chk.ext, chk.data),
            (LABEL_EXT, chk.item.label.to_bytes(4, "little", signed=True)),
            (INDEX_EXT, index.to_bytes(4, "little", signed=True)),
            (CLASS_EXT, str(chk.item.label).encode()),
            (PATH_EXT, chk.item.rel.encode()),
        ]
        parts = []
        for ext, data in components:
            offset, n = _tar_member(tar, f"{key}.{ext}", data)
            parts.append(f"{ext} {offset} {n} {key}.{ext}")
            if ext == chk.ext:
                rows.append(f"{index}\t{chk.item.label}\t{domain}-{len(shards):06d}.tar\t{offset}\t{n}\t{chk.item.rel}")
                table_rows.append((index, chk.item.label, len(shards), offset, n))
        idx_lines.append(" ".join(parts))
        size += sum(512 + -(-len(d) // 512) * 512 for _, d in components)
    close()
    rows.sort(key=lambda r: int(r.split("\t", 1)[0]))
    (ddir / ".tmp-samples.tsv").write_text("index\tlabel\tshard\toffset\tsize\tsource\n" + "".join(r + "\n" for r in rows))
    with open(ddir / ".tmp-samples.npy", "wb") as fh:
        np.save(fh, sample_table(table_rows))
    n_classes = max((s.item.label for s in samples), default=-1) + 1
    class_counts = [0] * n_classes
    for s in samples:
        class_counts[s.item.label] += 1
    return {"count": len(samples), "class_counts": class_counts, "shards": shards, "samples": f"{domain}/samples.tsv"}


def _commit(out: Path, manifest: dict) -> None:
    """Renames temporary files into place, then writes the manifest, then removes stale shards."""
    keep = {out / "manifest.json", out / "skipped.tsv"}
    for d in manifest["domains"].values():
        for s in d["shards"]:
            for key in ("path", "index"):
                final = out / s[key]
                (final.parent / f".tmp-{final.name}").replace(final)
                keep.add(final)
        samples = out / d["samples"]
        (samples.parent / ".tmp-samples.tsv").replace(samples)
        (samples.parent / ".tmp-samples.npy").replace(samples.with_suffix(".npy"))
        keep.update([samples, samples.with_suffix(".npy")])
    tmp = out / ".tmp-manifest.json"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / "manifest.json")
    for name in manifest["domains"]:
        for f in (out / name).iterdir():
            if f not in keep and (f.suffix in (".tar", ".idx") or f.name.startswith(".tmp-")):
                f.unlink()


@dataclass
class PackResult:
    manifest_path: Path
    counts: dict[str, int]
    skipped: list[tuple[str, str]]
    seconds: float

    @property
    def images_per_second(self) -> float:
        total = sum(self.counts.values()) + len(self.skipped)
        return total / max(self.seconds, 1e-9)


def pack(
    domains: dict[str, list[Item]],
    out: Path,
    classes: list[str] | None = None,
    label_offset: int = 0,
    shard_mb: float = 256.0,
    workers: int | None = None,
    max_pixels: int = MAX_PIXELS,
    strict: bool = False,
    progress: bool = True,
) -> PackResult:
    """Validates and packs ``domains`` into ``out``; see the module docstring."""
    start = time.perf_counter()
    if not domains:
        raise PackError("nothing to pack: no domains given")
    for name in domains:
        if not name or "." in name or "/" in name:
            raise PackError(f"domain name {name!r}: must be non-empty, without dots or slashes")
    every = [it for items in domains.values() for it in items]
    n_classes = max((it.label for it in every), default=-1) + 1
    if classes is None:
        classes = class_names_from_paths(every, n_classes)
    elif n_classes > len(classes):
        raise PackError(f"labels go up to {n_classes - 1} but only {len(classes)} class names were given")
    owner = FolderLock(out, "dgucdir pack").acquire()  # a second pack into `out` is refused, not interleaved
    try:
        return _pack_owned(domains, out, classes, label_offset, shard_mb, workers, max_pixels, strict, progress,
                           every, start)
    finally:
        owner.release()


def _pack_owned(domains: dict[str, list[Item]], out: Path, classes: list[str], label_offset: int, shard_mb: float,
                workers: int | None, max_pixels: int, strict: bool, progress: bool, every: list[Item],
                start: float) -> PackResult:
    checked = check_all(every, workers or os.cpu_count() or 1, max_pixels, progress)
    skipped = [(str(c.item.source), c.reason) for c in checked if c.data is None]
    (out / "skipped.tsv").write_text("path\treason\n" + "".join(f"{p}\t{r}\n" for p, r in skipped))
    if strict and skipped:
        raise PackError(f"--strict: {len(skipped)} image(s) skipped, see {out / 'skipped.tsv'}; nothing was packed")
    manifest: dict = {"version": MANIFEST_VERSION, "classes": classes, "label_offset": label_offset, "domains": {}}
    counts = {}
    by_domain: dict[str, list[Checked]] = {name: [] for name in domains}
    for c in checked:
        if c.data is not None:
            by_domain[c.item.domain].append(c)
    for name, samples in tqdm(by_domain.items(), desc="writing shards", unit="domain", disable=not progress):
        if not samples:
            raise PackError(f"domain {name!r}: no valid images")
        entry = write_domain(name, samples, out, int(shard_mb * 2**20))
        entry["class_counts"] += [0] * (len(classes) - len(entry["class_counts"]))
        manifest["domains"][name] = entry
        counts[name] = entry["count"]
    _commit(out, manifest)
    return PackResult(out / "manifest.json", counts, skipped, time.perf_counter() - start)
