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
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate

from vlpretrain.data import tars
from vlpretrain.data.pixels import decode_rgb
from vlpretrain.data.plan import seed_of
from vlpretrain.data.stats import WorkerStats
from vlpretrain.errors import DataError
from vlpretrain.formats import to_rgb

Sample = dict[str, Any]


def _shard_samples(url: str, shard_seed: int, stats: WorkerStats, expected: dict[str, int | None]) -> Iterator[Sample]:
    """Raw samples of one shard; a shard that cannot be opened or ends early has its lost samples counted.

    With a known count (a manifest, an index or a sidecar), a shard cut short costs exactly what it lacks, and
    one that ends cleanly with another count is a DataError naming both (shard and sidecar disagree). Without
    one, a cut still costs at least the sample it was cut in.
    """
    count, current, end, known = 0, None, tars.TarEnd(), expected.get(url)
    try:
        for key, ext, read in tars.stream_members(url, end):
            if current is not None and key != current["__key__"]:
                if known is not None and count + 1 >= known:  # another sample follows the last one expected
                    raise _disagrees(url, f"more than {known}", known)
                yield current
                count, current = count + 1, None
            if current is None:
                stats.read(url)
                current = {"__key__": key, "__url__": url, "__seed__": seed_of(shard_seed, key)}
            current[ext] = read()
    except (tarfile.TarError, EOFError) as e:
        stats.skip(url, "truncated tar", f"after {count} samples ({e})", n=max(1, (known or 0) - count))
        return
    except OSError as e:  # missing, unreadable, or an I/O error part way
        stats.skip(url, "unreadable shard", f"after {count} samples ({e.strerror or e})",
                   n=max(1, (known or 0) - count))
        return
    total = count + (current is not None)
    if end.clean and known is not None and total != known:
        raise _disagrees(url, str(total), known)
    if current is not None:
        yield current
        count += 1
    if not end.clean:  # a cut on a member boundary reads like a short, complete archive to tarfile
        lost = known - count if known is not None else 1
        if lost > 0:
            stats.skip(url, "truncated tar", f"ends without an end-of-archive block after {count} samples"
                       + (f" of {known}" if known is not None else ""), n=lost)


def _disagrees(url: str, holds: str, known: int) -> DataError:
    return DataError(f"{url}: holds {holds} samples, but its sidecar count (manifest, index, sizes.json or stats) "
                     f"says {known}; fix the sidecar, or re-index the shards (vlpretrain index-shards)")


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


@dataclass(frozen=True)
class SampleKeys:
    """Which members of a sample are its image and its caption (open_clip's --image-key / --text-key): `;`-separated
    alternatives, the first one a sample has wins. A text key `json:FIELD` (dotted for nested fields) takes the
    caption from the json member; a field holding a list gives several captions, one drawn per sample and epoch."""

    image: tuple[str, ...]
    text: tuple[str, ...]

    @classmethod
    def parse(cls, image_key: str, text_key: str) -> SampleKeys:
        def split(spec: str) -> tuple[str, ...]:
            return tuple(k.strip().lower() for k in spec.split(";") if k.strip())

        return cls(split(image_key), split(text_key))

    def text_members(self) -> set[str]:
        """Members a caption may come from (the rest, images above all, need not be read to find captions)."""
        return {k.split(":", 1)[0] for k in self.text}

    def captions(self, sample: Sample) -> list[str] | None:
        """The captions of a sample from its first text key it has; None if it has none of them."""
        for key in self.text:
            member, _, path = key.partition(":")
            if member not in sample:
                continue
            if not path:
                return [sample[member].decode("utf-8", errors="replace")]
            try:
                value: Any = json.loads(sample[member])
                for part in path.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
            except ValueError:
                continue
            if isinstance(value, list) and value:
                return [str(c) for c in value]
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return [str(value)]
        return None


def peek_captions(urls: Iterable[str], per_shard: int, keys: SampleKeys) -> list[str]:
    """The first caption of each of the first `per_shard` samples of every shard (a shard that fails gives fewer)."""
    out: list[str] = []
    wanted = keys.text_members()
    for url in urls:
        samples: dict[str, Sample] = {}
        try:
            with closing(tars.stream_members(url, tars.TarEnd())) as members:
                for key, ext, read in members:
                    if key not in samples and len(samples) == per_shard:
                        break
                    sample = samples.setdefault(key, {})
                    if ext in wanted:  # image bytes are never read
                        sample[ext] = read()
        except (tarfile.TarError, EOFError, OSError):
            pass
        for sample in samples.values():
            caps = [c.strip() for c in keys.captions(sample) or [] if c.strip()]
            out += caps[:1]
    return out


def with_caption(samples: Iterable[Sample], stats: WorkerStats, keys: SampleKeys) -> Iterator[Sample]:
    """Keep samples with an image and a caption; pick one caption per sample and epoch when there are several."""
    for s in samples:
        ext = next((e for e in keys.image if e in s), None)
        if ext is None:
            stats.skip(s["__url__"], "missing image", s["__key__"])
            continue
        caps = keys.captions(s)
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
                s["image"] = to_rgb(img)  # 16-bit grey keeps its brightness
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
