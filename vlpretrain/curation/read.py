"""The samples of input shards, in tar order, for curation: every member's bytes, the image member and the captions.

A sample that has no image or no caption, or a shard cut short, is not an error: it is reported as a `Bad` sample
(with its reason, as the loader names them) and counted; the curated dataset simply leaves it out.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from vlpretrain import storage
from vlpretrain.data import tars
from vlpretrain.data.counts import shards_of
from vlpretrain.data.stages import SampleKeys
from vlpretrain.errors import DataError

IMAGE_KEY = "jpg;jpeg;png;webp;bmp;gif;tiff;tif;ppm;pgm"
TEXT_KEY = "json:captions;txt"
KEYS = SampleKeys.parse(IMAGE_KEY, TEXT_KEY)


@dataclass
class Sample:
    """One sample of a shard: its key, its members (extension -> bytes), which member is the image, its caption."""

    key: str
    members: dict[str, bytes]
    image_ext: str
    caption: str


@dataclass
class Bad:
    """A sample (or the rest of a shard) that cannot be curated, and why."""

    key: str
    reason: str
    detail: str = ""


def input_shards(target: str) -> list[str]:
    """The shards a curation reads: a folder (its .tar files) or a pattern; a DataError when none exist."""
    local = not storage.is_remote(target)
    if local and "{" not in target and "*" not in target and not storage.local_path(target).endswith(".tar"):
        if not os.path.isdir(storage.local_path(target)):
            raise DataError(f"{target}: input shards folder does not exist")
    urls = shards_of(target)
    if not urls:
        raise DataError(f"{target}: names no shards")
    missing = [u for u in urls if not storage.is_remote(u) and not os.path.isfile(storage.local_path(u))]
    if missing:
        raise DataError(f"{missing[0]}: shard does not exist" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                 else ""))
    return urls


def read_samples(url: str) -> Iterator[Sample | Bad]:
    """Each sample of shard `url` in tar order, or why it is unusable; a cut shard ends with one `Bad`."""
    current: dict[str, bytes] = {}
    key: str | None = None
    end = tars.TarEnd()
    try:
        for k, ext, read in tars.stream_members(url, end):
            if key is not None and k != key:
                yield _sample(key, current)
                current = {}
            key = k
            current[ext] = read()
    except (tarfile.TarError, EOFError, OSError) as e:
        yield Bad(key or "?", "truncated tar", f"{url}: {e}")
        return
    if key is not None:
        if not end.clean:
            yield Bad(key, "truncated tar", f"{url}: ends without an end-of-archive block")
            return
        yield _sample(key, current)


def _sample(key: str, members: dict[str, bytes]) -> Sample | Bad:
    ext = next((e for e in KEYS.image if e in members), None)
    if ext is None:
        return Bad(key, "missing image")
    caps = [c.strip() for c in KEYS.captions(members) or [] if c.strip()]
    if not caps:
        return Bad(key, "missing caption")
    return Sample(key, members, ext, caps[0])
