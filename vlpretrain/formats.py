"""File formats both packages read: image suffixes, the shard manifest's name, and MNIST-style idx files.

Low-level on purpose: the shard writer, the loader and zeroshot's benchmark layouts import it, and it imports
nothing of theirs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from vlpretrain.errors import DataError

# Suffixes of the image files we read from folders (lower case; compare with `path.suffix.lower()`).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})

# The writer's record of a shard folder: inputs, counts, shards with their sample counts, skipped rows.
MANIFEST = "_manifest.json"
# The folder make-shards writes a run's shards into before they replace the folder's dataset all at once.
INCOMPLETE = ".make-shards-incomplete"

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format: magic 0 0 dtype ndim, big-endian int32 dims, data), gzipped or not."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path}: header says {dims} values ({expected} bytes), file holds {len(raw) - offset} "
                        "(truncated?)")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)
