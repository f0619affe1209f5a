"""Random access to packed samples for DALI's external source: encoded bytes by (domain, index).

One ``pread`` per sample at the offset the domain's sample table records, so a reading order can
be any permutation of the data set, decided per epoch, at the cost of one seek per sample (the
bytes are decoded by DALI as before, on the GPU when there is one). The tables are memory-mapped
(:meth:`Domain.table`): opening one costs nothing at any size, and a rank touches only the rows
it reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .manifest import Domain


class SampleReader:
    """The encoded image, label and index of any sample of some domains; file handles are opened once."""

    def __init__(self, domains: Sequence[Domain]) -> None:
        self.tables = [d.table() for d in domains]
        self.shard_paths = [[s.path for s in d.shards] for d in domains]
        self._files: dict[Path, int] = {}

    def read(self, domain: int, index: int) -> tuple[np.ndarray, int]:
        """(encoded bytes as uint8, label) of sample ``index`` of the ``domain``-th domain."""
        label, shard, offset, size = self.tables[domain][index].tolist()
        path = self.shard_paths[domain][shard]
        fd = self._files.get(path)
        if fd is None:
            fd = self._files[path] = os.open(path, os.O_RDONLY)
        return np.frombuffer(os.pread(fd, size, offset), dtype=np.uint8), label

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:
        self.close()


FIELDS = ("encoded", "label", "index", "domain")


class IndexedSource:
    """Batches for ``fn.external_source(batch=True)``: the ``fields`` (of :data:`FIELDS`) of the samples
    ``(domains[i], indices[i])``, ``batch_size`` at a time, in the given order."""

    def __init__(self, reader: SampleReader, domains: Sequence[int], indices: Sequence[int], batch_size: int,
                 fields: Sequence[str] = FIELDS) -> None:
        if len(domains) != len(indices) or len(indices) % batch_size:
            raise ValueError(f"{len(indices)} samples do not make whole batches of {batch_size}")
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; known: {FIELDS}")
        self.reader = reader
        self.samples = list(zip(map(int, domains), map(int, indices)))
        self.batch_size = batch_size
        self.fields = tuple(fields)
        self.position = 0

    def __iter__(self) -> Iterator[tuple[list, ...]]:
        return self

    def __next__(self) -> tuple[list, ...]:
        if self.position >= len(self.samples):
            raise StopIteration
        batch = self.samples[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        columns: dict[str, list] = {f: [] for f in FIELDS}
        for d, i in batch:
            data, label = self.reader.read(d, i)
            columns["encoded"].append(data)
            columns["label"].append(np.array([label], dtype=np.int32))
            columns["index"].append(np.array([i], dtype=np.int32))
            columns["domain"].append(np.array([d], dtype=np.int32))
        return tuple(columns[f] for f in self.fields)
