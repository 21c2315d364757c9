"""Reading tar shards member by member, and telling a whole archive from one cut short.

A tar archive ends with zero-filled blocks. Python's `tarfile` stops quietly at those, at the end of the data, and at
a partial header alike, so a shard cut on a member boundary looks complete to it. Here the block where reading
stopped is checked: zeros mean the archive was written to its end; anything else means it was cut (`clean` False).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO

from webdataset.tariterators import base_plus_ext

from vlpretrain import storage
from vlpretrain.errors import DataError

BLOCK = 512
# tarfile's stream mode reads in records of 20 blocks; the end-of-archive block lies in the last two read
_TAIL = 4 * tarfile.RECORDSIZE


class _TailReader:
    """A read-only stream that remembers how many bytes passed and the last few of them."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.total, self.tail = raw, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data)[-_TAIL:]
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at `offset` if they were read and are still remembered."""
        start = len(self.tail) - (self.total - offset)
        if start < 0 or self.total < offset + BLOCK:
            return None
        return self.tail[start:start + BLOCK]


@dataclass
class TarEnd:
    """How an archive read ended: `clean` when its end-of-archive block was there."""

    clean: bool = False


def stream_members(url: str, end: TarEnd) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    """(key, extension, read) of each regular file of one shard in tar order; `read()` fetches its bytes.

    Names come before data so that a cut inside a file still lets the previous, complete sample through. When the
    archive has been read to its end, `end.clean` says whether it ended as a tar archive should.
    """
    raw = storage.open_stream(url)
    try:
        stream = _TailReader(raw)
        tar = tarfile.open(fileobj=stream, mode="r|*")  # type: ignore[call-overload]
        for info in tar:
            key, ext = base_plus_ext(info.name)
            if info.isreg() and key is not None:
                yield key, ext.lower(), partial(_read_member, tar, info)
            tar.members = []  # a streamed archive would otherwise keep every header it has seen
        block = stream.block_at(tar.offset)
        end.clean = block is not None and not any(block)
    finally:
        raw.close()


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    assert f is not None
    return f.read()


def scan(url: str) -> tuple[int, bool]:
    """(samples, clean end) of a shard by its headers alone: consecutive files sharing a key are one sample.

    Local files are walked header to header (member data is skipped, not read); remote ones are streamed. A file
    that is not a tar archive at all is a DataError naming it (not a shard of zero samples).
    """
    count, last = 0, None
    try:
        if storage.is_remote(url):
            end = TarEnd()
            for key, _, _ in stream_members(url, end):
                if key != last:
                    count, last = count + 1, key
            return count, end.clean
        path = storage.local_path(url)
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                key, _ = base_plus_ext(info.name)
                if info.isreg() and key is not None and key != last:
                    count, last = count + 1, key
                tar.members = []
            offset = tar.offset
        with open(path, "rb") as f:
            f.seek(offset)
            block = f.read(BLOCK)
        return count, len(block) == BLOCK and not any(block)
    except tarfile.ReadError as e:
        if count == 0 and not _looks_like_tar(url):
            raise DataError(f"{url}: not a tar file ({e}); data.train must name webdataset tar shards") from None
        return count, False
    except (EOFError, OSError, tarfile.TarError):
        return count, False


def _looks_like_tar(url: str) -> bool:
    """A ustar/GNU magic at offset 257 of the first header, or fewer than 512 bytes (a truncated shard)."""
    with storage.open_stream(url) as f:
        head = f.read(BLOCK)
    return len(head) < BLOCK or head[257:262] == b"ustar"
