"""The loader's stages, each a small generator over the stream before it: shards -> samples (several shards
interleaved) -> caption -> shuffle -> skip -> decode -> transform -> batches. They run inside one DataLoader worker
and count what they drop.

Randomness is per sample, seeded from the sample's shard seed and key: the caption picked and the augmentation
applied to a sample depend only on (seed, epoch, shard, key), never on what came before it in the stream, which is
what lets a resumed run skip samples without decoding them and still continue exactly.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from functools import partial
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from vlpretrain.data.pixels import decode_rgb
from vlpretrain.data.plan import seed_of
from vlpretrain.data.stats import WorkerStats
from vlpretrain.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm", "pgm")
Sample = dict[str, Any]


def _tar_members(url: str) -> Iterator[tuple[str, str, Callable[[], bytes]]]:
    """(key, extension, read) of each regular file of one shard in tar order; `read()` fetches its bytes.

    Names come before data so that a cut inside a file still lets the previous, complete sample through.
    """
    stream = gopen(url)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        for info in tar:
            key, ext = base_plus_ext(info.name)
            if info.isreg() and key is not None:
                yield key, ext.lower(), partial(_read_member, tar, info)
            tar.members = []  # a streamed archive would otherwise keep every header it has seen
    finally:
        stream.close()


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    assert f is not None
    return f.read()


def _shard_samples(url: str, shard_seed: int, stats: WorkerStats, expected: dict[str, int | None]) -> Iterator[Sample]:
    """Raw samples of one shard; a shard that cannot be opened or ends early has its lost samples counted."""
    count, current = 0, None
    try:
        for key, ext, read in _tar_members(url):
            if current is not None and key != current["__key__"]:
                yield current
                count, current = count + 1, None
            if current is None:
                stats.read(url)
                current = {"__key__": key, "__url__": url, "__seed__": seed_of(shard_seed, key)}
            current[ext] = read()
    except (tarfile.TarError, EOFError) as e:
        stats.skip(url, "truncated tar", f"after {count} samples ({e})", n=max(1, (expected.get(url) or 0) - count))
        return
    except OSError as e:  # missing, unreadable, or an I/O error part way
        stats.skip(url, "unreadable shard", f"after {count} samples ({e.strerror or e})",
                   n=max(1, (expected.get(url) or 0) - count))
        return
    if current is not None:
        yield current
        count += 1
    missing = (expected.get(url) or 0) - count
    if missing > 0:  # a cut exactly between two files reads as a clean end of archive
        stats.skip(url, "truncated tar", f"ends after {count} of {count + missing} samples", n=missing)


def read_shards(shards: Iterable[tuple[str, int]], stats: WorkerStats, expected: dict[str, int | None],
                interleave: int = 1, rng: random.Random | None = None) -> Iterator[Sample]:
    """Raw samples (`__key__`, `__url__`, `__seed__` and one entry per file) of each (url, shard seed).

    `interleave` shards are open at once and each next sample comes from one of them picked by `rng`; when one
    ends the next shard in line takes its place. Every sample of every shard still comes exactly once, so epochs
    stay exact, and the order depends only on the shard list and `rng`, so a resumed run can skip to its place.
    A shard that cannot be opened, or ends early, costs the samples it should still have held (from the writer's
    manifest or a header scan) under "unreadable shard" / "truncated tar"; the partial sample at a cut is dropped.
    """
    assert interleave >= 1 and (interleave == 1 or rng is not None)
    pending = iter(shards)
    open_: list[Iterator[Sample]] = []
    while True:
        while len(open_) < interleave and (nxt := next(pending, None)) is not None:
            open_.append(_shard_samples(*nxt, stats, expected))
        if not open_:
            return
        i = rng.randrange(len(open_)) if rng is not None and len(open_) > 1 else 0
        sample = next(open_[i], None)
        if sample is None:
            open_.pop(i)
            continue
        yield sample


def peek_captions(urls: Iterable[str], per_shard: int) -> list[str]:
    """The first caption of each of the first `per_shard` samples of every shard (a shard that fails gives fewer)."""
    out: list[str] = []
    for url in urls:
        samples: dict[str, Sample] = {}
        try:
            with closing(_tar_members(url)) as members:
                for key, ext, read in members:
                    if key not in samples and len(samples) == per_shard:
                        break
                    sample = samples.setdefault(key, {})
                    if ext in ("txt", "json"):  # image bytes are never read
                        sample[ext] = read()
        except (tarfile.TarError, EOFError, OSError):
            pass
        for sample in samples.values():
            caps = [c.strip() for c in _captions(sample) or [] if c.strip()]
            out += caps[:1]
    return out


def _captions(sample: Sample) -> list[str] | None:
    """All captions of a sample: the .json's `captions` list when there is one, else the .txt; None if neither."""
    if "json" in sample:
        try:
            caps = json.loads(sample["json"]).get("captions")
            if isinstance(caps, list) and caps:
                return [str(c) for c in caps]
        except (ValueError, AttributeError):
            pass
    if "txt" in sample:
        return [sample["txt"].decode("utf-8", errors="replace")]
    return None


def with_caption(samples: Iterable[Sample], stats: WorkerStats) -> Iterator[Sample]:
    """Keep samples with an image and a caption; pick one caption per sample and epoch when there are several."""
    for s in samples:
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        if ext is None:
            stats.skip(s["__url__"], "missing image", s["__key__"])
            continue
        caps = _captions(s)
        if caps is None:
            stats.skip(s["__url__"], "missing caption", s["__key__"])
            continue
        caps = [c.strip() for c in caps if c.strip()]
        if not caps:
            stats.skip(s["__url__"], "empty caption", s["__key__"])
            continue
        caption = caps[0] if len(caps) == 1 else random.Random(s["__seed__"]).choice(caps)
        yield {"__key__": s["__key__"], "__url__": s["__url__"], "__seed__": s["__seed__"], "ext": ext,
               "bytes": s[ext], "caption": caption}


def shuffle(samples: Iterable[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """A shuffle buffer of `size` samples (undecoded, so it is cheap to hold); drained in random order at the end."""
    if size <= 1:
        yield from samples
        return
    buf: list[Sample] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = s
    rng.shuffle(buf)
    yield from buf


class Skipper:
    """How many samples are still to be skipped (shared by the passes over a worker's shards)."""

    def __init__(self, n: int):
        self.remaining = n


def skip(samples: Iterable[Sample], skipper: Skipper) -> Iterator[Sample]:
    """Drop samples a resumed run has already trained on, before any decoding."""
    for s in samples:
        if skipper.remaining > 0:
            skipper.remaining -= 1
            continue
        yield s


def decode(samples: Iterable[Sample], stats: WorkerStats, draft: int | None,
           as_tensor: bool = False) -> Iterator[Sample]:
    """PIL RGB images, or with `as_tensor` uint8 RGB tensors [3, H, W] of the same pixels (`pixels.decode_rgb`);
    a JPEG much larger than `draft` px is decoded at a reduced scale (PIL's draft mode) either way."""
    for s in samples:
        try:
            data = s.pop("bytes")
            if as_tensor:
                s["image"] = decode_rgb(data, draft)
            else:
                img = Image.open(io.BytesIO(data))
                if draft and img.format == "JPEG":
                    img.draft("RGB", (draft, draft))  # picks the largest 1/2^k scale that stays >= draft px
                s["image"] = img.convert("RGB")
        except Exception as e:  # PIL raises many types for bad data
            stats.skip(s["__url__"], "undecodable image", f"{s['__key__']}.{s['ext']}: {type(e).__name__}: {e}")
            continue
        yield s


def transform(samples: Iterable[Sample], fn: Callable[[Any], torch.Tensor],
              keep_global_rng: bool) -> Iterator[Sample]:
    """Apply the image transform with torch's RNG seeded per sample (restored after, in the main process)."""
    for s in samples:
        state = torch.get_rng_state() if keep_global_rng else None
        torch.default_generator.manual_seed(s["__seed__"])
        s["image"] = fn(s["image"])
        if state is not None:
            torch.set_rng_state(state)
        yield s


def repeat_passes(one_pass: Callable[[int], Iterator[Sample]], stats: WorkerStats, where: str) -> Iterator[Sample]:
    """Pass 0, then 1, 2, ... over the same shards (only reached when bad samples left a worker short of batches).

    Each pass is a whole pipeline of its own, shuffle buffer included, so no sample of a later pass can come out
    before the previous pass has been drained.
    """
    for p in itertools.count():
        stats.counting = p == 0
        produced = 0
        for s in one_pass(p):
            produced += 1
            yield s
        if produced == 0:
            raise DataError(f"{where}: no usable sample in its shards; see the skip reasons logged above")


def batches(samples: Iterable[Sample], batch_size: int, count: int,
            tokenizer: Callable[[list[str]], torch.Tensor], stats: WorkerStats) -> Iterator[tuple]:
    """`count` batches of (images [B,3,H,W], tokens [B,ctx], stats since the previous batch)."""
    it = iter(samples)
    for _ in range(count):
        chunk = []
        for s in itertools.islice(it, batch_size):
            stats.ok()
            chunk.append(s)
        assert len(chunk) == batch_size, "worker streams are endless (passes or resampling)"
        # in a worker this stacks straight into shared memory, which the DataLoader would otherwise copy it to
        images = default_collate([s["image"] for s in chunk])
        tokens = tokenizer([s["caption"] for s in chunk])
        yield images, tokens, stats.take()


def resampled_shards(groups: list[list[str]], weights: list[float] | None, rng: random.Random,
                     shard_seed: Callable[[int], int]) -> Iterator[tuple[str, int]]:
    """Endless (url, shard seed) draws with replacement: a group by weight, then a shard of it uniformly."""
    flat = [u for g in groups for u in g]
    for draw in itertools.count():
        if weights is None:
            url = flat[rng.randrange(len(flat))]
        else:
            group = groups[rng.choices(range(len(groups)), weights=weights)[0]]
            url = group[rng.randrange(len(group))]
        yield url, shard_seed(draw)
