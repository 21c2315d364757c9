"""File formats both packages read: image suffixes and modes, the shard manifest's name, and MNIST-style idx files.

Low-level on purpose: the shard writer, the loader and zeroshot's benchmark layouts import it, and it imports
nothing of theirs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from vlpretrain.errors import DataError

# Suffixes of the image files we read from folders (lower case; compare with `path.suffix.lower()`).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})

# The writer's record of a shard folder: inputs, counts, shards with their sample counts, skipped rows.
MANIFEST = "_manifest.json"
# The folder make-shards writes a run's shards into before they replace the folder's dataset all at once.
INCOMPLETE = ".make-shards-incomplete"

# PIL's modes for 16-bit grey: "I;16*" (PNG, TIFF), "I" (a 16-bit PGM; 32-bit ints elsewhere, clipped to 16 bits)
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def to_8bit(img: Image.Image) -> Image.Image:
    """`img` with 8-bit samples: 16-bit grey becomes "L" from each value's high byte (v >> 8); other modes as they are.

    A 16-bit PNG or PGM spans 0..65535 from black to white (an 8-bit value v is stored as v * 257), so v >> 8 keeps
    each pixel's brightness, as PIL itself already reads 16-bit colour PNGs. Stretching each image's own min..max
    instead would brighten a dark image and flatten a bright one, unlike every other image. PIL's `convert("RGB")`
    clips every value above 255 to white, which made such images near-white.
    """
    if img.mode not in WIDE_GREY_MODES:
        return img
    values = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """A new 8-bit RGB image of `img`, as `img.convert("RGB")` but with 16-bit grey keeping its brightness."""
    return to_8bit(img).convert("RGB")


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
