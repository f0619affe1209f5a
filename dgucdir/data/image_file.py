"""Reading an image file someone named, safely: regular files only, sizes capped before any read.

Shared by ``dgucdir pack`` (every listed image) and ``dgucdir search`` (the query images), so both
refuse the same inputs: a FIFO or device (which would block the read forever), a file larger than
``MAX_FILE_BYTES`` (read whole otherwise), and an image of more than ``MAX_PIXELS`` pixels or one
Pillow flags as a decompression bomb (decoded in full otherwise).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import Image

MAX_FILE_BYTES = 256 * 2**20  # a photo is a few MiB; nothing larger is read
MAX_PIXELS = 40_000_000  # `dgucdir pack --max-pixels`'s default: 40 MP, about 6300 x 6300


class ImageFileError(ValueError):
    """A file that is not an image we will read; the message says why."""


def read_image_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` when it is a regular file of at most ``max_bytes`` (checked before reading)."""
    info = os.stat(path)  # FileNotFoundError / PermissionError for the caller; follows links
    if not stat.S_ISREG(info.st_mode):
        raise ImageFileError("not a regular file (a FIFO, device or folder is never read)")
    if info.st_size > max_bytes:
        raise ImageFileError(f"{info.st_size / 2**20:.0f} MiB, larger than the {max_bytes / 2**20:.0f} MiB read")
    with open(path, "rb") as f:
        return f.read(max_bytes + 1)[:max_bytes + 1]


@contextmanager
def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """The image in ``data``, refused (:class:`ImageFileError`) above ``max_pixels`` or when Pillow calls it a
    decompression bomb, before it is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageFileError(f"absurd size {width}x{height} (> {max_pixels} pixels)")
                yield img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageFileError(f"decompression bomb: {exc}") from None
