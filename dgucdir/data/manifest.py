"""What a packed dataset is: domains, their shards with DALI index files, counts and classes.

``manifest.json`` is the single entry point of a packed dataset; every other file (shards,
index files, per-domain sample tables) is named relative to it, so a packed folder can be
moved or mounted anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

MANIFEST_VERSION = 1
# Components of each webdataset sample. Keys never contain dots (DALI splits at the first one).
IMAGE_EXTS = ("jpg", "png")
LABEL_EXT = "lbl"  # int32 little-endian class id (0-based), read by DALI with dtype INT32
INDEX_EXT = "idx"  # int32 little-endian index of the sample within its domain
CLASS_EXT = "cls"  # the class id as text, the webdataset convention for other readers
PATH_EXT = "txt"  # the source path, for humans and `dgucdir search`
# The per-domain sample table as fixed-width rows in index order (`<domain>/samples.npy`, beside the
# human-readable samples.tsv): opened memory-mapped, so a 10M-row table costs no parsing and only the
# pages a rank reads, shared by the ranks of a node through the page cache.
TABLE_DTYPE = np.dtype([("label", "<i4"), ("shard", "<i4"), ("offset", "<i8"), ("size", "<i8")])


def sample_table(rows: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    """(index, label, shard position, offset, size) rows -> the table in index order (indices 0..n-1 each once)."""
    table = np.zeros(len(rows), dtype=TABLE_DTYPE)
    for index, label, shard, offset, size in rows:
        table[index] = (label, shard, offset, size)
    return table


@dataclass(frozen=True)
class Shard:
    path: Path
    index_path: Path
    count: int
    sha256: str


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample's image bytes lie, for random access (pictures, search)."""

    index: int
    label: int
    shard: Path
    offset: int
    size: int
    source: str


@dataclass(frozen=True)
class Domain:
    name: str
    count: int
    class_counts: list[int]
    shards: list[Shard]
    samples_path: Path

    def samples(self) -> list[SampleRecord]:
        """Reads the per-domain sample table, ordered by index within the domain."""
        rows = []
        root = self.samples_path.parent
        with self.samples_path.open() as fh:
            next(fh)
            for line in fh:
                index, label, shard, offset, size, source = line.rstrip("\n").split("\t", 5)
                rows.append(SampleRecord(int(index), int(label), root / shard, int(offset), int(size), source))
        rows.sort(key=lambda r: r.index)
        return rows

    @property
    def table_path(self) -> Path:
        return self.samples_path.with_suffix(".npy")

    def table(self) -> np.ndarray:
        """The sample table (:data:`TABLE_DTYPE`, row i = sample i), memory-mapped; a pack without one (an
        older version's) gets it built from samples.tsv, in memory."""
        if self.table_path.is_file():
            table = np.load(self.table_path, mmap_mode="r")
            if table.dtype != TABLE_DTYPE or len(table) != self.count:
                raise DataError(f"{self.table_path}: {len(table)} rows of {table.dtype}, expected {self.count} of "
                                f"{TABLE_DTYPE}: pack the data again")
            return table
        position = {s.path.name: i for i, s in enumerate(self.shards)}
        return sample_table([(r.index, r.label, position[r.shard.name], r.offset, r.size) for r in self.samples()])

    def read_image_bytes(self, record: SampleRecord) -> bytes:
        with record.shard.open("rb") as fh:
            fh.seek(record.offset)
            return fh.read(record.size)


@dataclass(frozen=True)
class Manifest:
    path: Path
    classes: list[str]
    label_offset: int
    domains: dict[str, Domain]

    @classmethod
    def load(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"no manifest at {path}; create one with `dgucdir pack` (or `dgucdir demo-data`)")
        raw = json.loads(path.read_text())
        if raw.get("version") != MANIFEST_VERSION:
            raise DataError(f"{path}: manifest version {raw.get('version')!r}, expected {MANIFEST_VERSION}")
        root = path.parent
        domains = {}
        for name, d in raw["domains"].items():
            shards = [Shard(root / s["path"], root / s["index"], s["count"], s["sha256"]) for s in d["shards"]]
            domains[name] = Domain(name, d["count"], d["class_counts"], shards, root / d["samples"])
        return cls(path, raw["classes"], raw["label_offset"], domains)

    def fingerprint(self) -> str:
        """sha256 of manifest.json, which lists every shard's sha256: changes whenever the data does."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def domain(self, name: str) -> Domain:
        if name not in self.domains:
            raise DataError(f"domain {name!r} is not in {self.path}; it has: {', '.join(self.domains)}")
        return self.domains[name]

    def check_domains(self, names: list[str], what: str) -> None:
        missing = [n for n in names if n not in self.domains]
        if missing:
            raise DataError(f"{what}: {missing} not in {self.path}; it has: {', '.join(self.domains)}")
