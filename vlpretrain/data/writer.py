"""Write image-caption sources as webdataset tar shards: `{key}.jpg` (or the image's own encoding), `.txt`, `.json`.

Records are written in a random order of the whole source, drawn from the seed (or in source order with
`keep_order`): sources are often sorted by class, date or origin, and a loader that streams shards one after another
would then fill whole batches from one class. Only row indices are shuffled; each record is read when it is written.
Records are prepared (read, checked, optionally resized or re-encoded) in a process pool but written in that order,
and every tar header field that could vary (mtime, owner, mode) is fixed, so the same input and seed give the same
shards byte for byte. Shards and the manifest are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlpretrain.data.plan import seed_of
from vlpretrain.data.sources import (
    Record,
    Skip,
    SourceOptions,
    detect_format,
    load_classes,
    load_templates,
    read_source,
)
from vlpretrain.errors import ConfigError, DataError
from vlpretrain.formats import INCOMPLETE, MANIFEST, WIDE_GREY_MODES, to_8bit
from vlpretrain.progress import progress as progress_bar

log = logging.getLogger(__name__)

MANIFEST_VERSION = 2  # 2: samples in a seeded random order by default, recorded under "order"
# PIL format name -> file extension kept in the shard (and recognised by the loader)
EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
                 "PPM": "ppm"}
_LOSSLESS = {"png", "webp"}


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored: resize above `max_side`, force JPEG with `reencode`."""

    max_side: int | None = None
    reencode: bool = False
    jpeg_quality: int = 95


@dataclass(frozen=True)
class Prepared:
    """A record ready to be written: encoded image, its extension and size, captions and label."""

    source_id: str
    ext: str
    image: bytes
    width: int
    height: int
    captions: tuple[str, ...]
    label: int | None
    classname: str | None


# ---------------------------------------------------------------------------------------------------------------
# one record (runs in the worker processes)


def _encode(img: Image.Image, ext: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (255, 255, 255))
            img.paste(rgba, mask=rgba.getchannel("A"))  # transparent pixels become white, not black
        elif img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format={"png": "PNG", "webp": "WEBP"}[ext], **({"lossless": True} if ext == "webp" else {}))
    return buf.getvalue()


def prepare_record(item: Record | Skip, opts: EncodeOptions) -> Prepared | Skip:
    """Read and check one record's image (a full decode catches truncated files); encode only when needed (16-bit
    grey is always stored as 8-bit, `formats.to_8bit`)."""
    if isinstance(item, Skip):
        return item
    captions = tuple(c.strip() for c in item.captions if c and c.strip())
    if not captions:
        return Skip(item.where, "empty caption")
    raw: bytes | None = None
    if isinstance(item.image, np.ndarray):
        img = Image.fromarray(item.image)
        ext = "jpg" if opts.reencode else "png"  # raw arrays have no encoding of their own: PNG is lossless
        must_encode = True
    else:
        if isinstance(item.image, str):
            try:
                raw = Path(item.image).read_bytes()
            except FileNotFoundError:
                return Skip(item.where, "missing file", item.image)
            except OSError as e:
                return Skip(item.where, "missing file", f"{item.image}: {e.strerror}")
        else:
            raw = item.image
        try:
            img = Image.open(io.BytesIO(raw))
            img.load()
        except Exception as e:  # PIL raises many types for bad data
            return Skip(item.where, "undecodable image", f"{type(e).__name__}: {e}")
        ext = EXT_BY_FORMAT.get(img.format or "", (img.format or "img").lower())
        must_encode = opts.reencode
        if opts.reencode:
            ext = "jpg"
    if img.mode in WIDE_GREY_MODES:  # stored 8-bit, so every reader (ours, PIL's convert) sees its brightness
        img, ext, must_encode = to_8bit(img), "jpg" if opts.reencode else "png", True
    if opts.max_side and max(img.size) > opts.max_side:
        scale = opts.max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        ext = ext if ext in _LOSSLESS and not opts.reencode else "jpg"
        must_encode = True
    data = _encode(img, ext, opts.jpeg_quality) if must_encode else raw
    assert data is not None
    return Prepared(item.source_id, ext, data, img.width, img.height, captions, item.label, item.classname)


# ---------------------------------------------------------------------------------------------------------------
# tar shards


def _member_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512


class ShardSink:
    """Writes samples into numbered tar shards, starting a new one at `shard_size` samples or `shard_bytes`."""

    def __init__(self, outdir: Path, prefix: str, shard_size: int, shard_bytes: int | None):
        self.outdir, self.prefix = outdir, prefix
        self.shard_size, self.shard_bytes = shard_size, shard_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.outdir / f".{name}.tmp"
        self._name = name
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = self._bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self.outdir / self._name)
        self.shards.append({"name": self._name, "samples": self._count,
                            "bytes": (self.outdir / self._name).stat().st_size})
        self._tar = None

    def add(self, key: str, files: list[tuple[str, bytes]]) -> None:
        """Append one sample (its files share `key`), rolling over to a new shard when this one is full."""
        size = sum(_member_bytes(len(data)) for _, data in files)
        full = self._count >= self.shard_size or (
            self.shard_bytes is not None and self._count > 0 and self._bytes + size > self.shard_bytes)
        if self._tar is not None and full:
            self._close()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in files:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def abort(self) -> None:
        """Drop the shard being written (after an error): no half shard is ever left under a final name."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def finish(self) -> list[dict[str, Any]]:
        """Close the last shard; the list of written shards with their sample counts and sizes."""
        self._close()
        return self.shards


def sample_files(p: Prepared) -> list[tuple[str, bytes]]:
    """The tar members of one sample: image, first caption, metadata json (sorted keys: stable bytes)."""
    meta: dict[str, Any] = {"source": p.source_id, "width": p.width, "height": p.height, "captions": list(p.captions)}
    if p.label is not None:
        meta["label"] = p.label
        meta["class"] = p.classname
    return [(p.ext, p.image), ("txt", p.captions[0].encode("utf-8")),
            ("json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"))]


# ---------------------------------------------------------------------------------------------------------------
# the whole job


def _prepare_chunk(items: list[Record | Skip], prepare) -> list[Prepared | Skip]:
    return [prepare(item) for item in items]


def _ordered_map(pool, workers: int, prepare, items, chunk: int = 64) -> Iterator[Prepared | Skip]:
    """Results in source order whatever the scheduling (keeps shards reproducible), with a bounded backlog."""
    pending: collections.deque = collections.deque()
    window = 4 * workers
    it = iter(items)
    while True:
        while len(pending) < window and (part := list(itertools.islice(it, chunk))):
            pending.append(pool.apply_async(_prepare_chunk, (part, prepare)))
        if not pending:
            return
        yield from pending.popleft().get()


def write_order(items: Iterable[Record | Skip], seed: int | None) -> Iterable[Record | Skip]:
    """`items` in source order (seed None) or in a random order drawn from `seed`, the same on every machine.

    A Sequence is permuted by index, so its records are made only as they are written; any other iterable is
    collected first (its records refer to images by path or array view, so no image is decoded to do so).
    """
    if seed is None:
        return items
    rows = items if isinstance(items, Sequence) else list(items)
    # numpy's permutation keeps 8 bytes per row, where a list of Python ints would take about 36
    perm = np.random.Generator(np.random.PCG64(seed_of("write order", seed))).permutation(len(rows))
    return (rows[int(i)] for i in perm)


def _fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _up_to_date(outdir: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest when it was written from the same inputs and all its shards are intact."""
    path = outdir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("inputs") != inputs:
        return None
    for s in manifest.get("shards", []):
        f = outdir / s["name"]
        if not f.is_file() or f.stat().st_size != s["bytes"]:
            return None
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as JSON under a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_shards(source: str | os.PathLike, outdir: str | os.PathLike, format: str | None = None, *,
                 prefix: str = "shard", shard_size: int = 10000, shard_bytes: int | None = None,
                 max_side: int | None = None, reencode: bool = False, jpeg_quality: int = 95, workers: int = 1,
                 seed: int = 0, templates: str | os.PathLike | list[str] | None = None,
                 classes: str | os.PathLike | list[str] | None = None, split: str = "train",
                 image_column: str = "image", caption_column: str = "caption",
                 image_root: str | os.PathLike | None = None, one_sample_per_caption: bool = False,
                 keep_order: bool = False, skip_existing: bool = False, replace: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Write `source` as `outdir/{prefix}-NNNNNN.tar` shards plus `outdir/_manifest.json`; returns the manifest.

    Samples go in a random order of the whole source drawn from `seed`, or in source order with `keep_order`.
    The manifest holds the inputs, that order (`order: {shuffled, seed}`), sample count, each shard's samples and
    bytes, and every skipped source row with its reason. With `skip_existing`, a manifest written from the same
    inputs whose shards are intact is returned without writing anything. Writing is all or nothing: shards are
    staged and replace the folder's dataset at the end; a folder holding another dataset is refused unless
    `replace`, which deletes only the shards the previous manifest lists (other tar files stay, and a warning names
    them).
    """
    if shard_size < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise ConfigError("shard_size and shard_bytes must be positive")
    src = Path(source)
    out = Path(outdir)
    tmpl = list(templates) if isinstance(templates, list) else load_templates(templates) if templates else []
    names = list(classes) if isinstance(classes, list) else load_classes(classes) if classes else None
    opts = SourceOptions(image_column, caption_column, str(image_root) if image_root else None,
                         one_sample_per_caption, tmpl, names, split, seed)
    if not src.exists():
        raise DataError(f"{source}: source does not exist")
    fmt = format or detect_format(src)
    inputs = {"source": str(src.resolve()), "source_stat": _fingerprint(src), "format": fmt, "prefix": prefix,
              "shard_size": shard_size, "shard_bytes": shard_bytes, "max_side": max_side, "reencode": reencode,
              "jpeg_quality": jpeg_quality, "seed": seed, "split": split, "classes": names,
              "templates_sha256": hashlib.sha256("\n".join(tmpl).encode()).hexdigest() if tmpl else None,
              "image_column": image_column, "caption_column": caption_column,
              "image_root": str(Path(image_root).resolve()) if image_root else None,
              "one_sample_per_caption": one_sample_per_caption, "keep_order": keep_order}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{outdir}: exists and is not a folder (OUTDIR is the folder the shards go into)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{outdir}: cannot create the shard folder ({e.strerror or e})") from None
    if skip_existing and (manifest := _up_to_date(out, inputs)) is not None:
        log.info("%s: shards already written from the same inputs; nothing to do", out)
        return manifest
    previous, loose = check_replaceable(out, inputs, replace)
    _, records = read_source(src, fmt, opts)
    # this run's shards go to a staging folder and replace the folder's dataset only once all are written, so an
    # interrupted run leaves the previous dataset whole (and no mix of the two)
    staging = out / INCOMPLETE
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    sink = ShardSink(staging, prefix, shard_size, shard_bytes)
    skipped: list[dict[str, str]] = []
    prepare = functools.partial(prepare_record, opts=EncodeOptions(max_side, reencode, jpeg_quality))
    pool = multiprocessing.Pool(workers, initializer=_ignore_sigint) if workers > 1 else None
    try:
        with _sigterm_as_interrupt():
            items = write_order(records.items, None if keep_order else seed)
            results = _ordered_map(pool, workers, prepare, items) if pool else map(prepare, items)
            n = 0
            with progress_bar(records.total, f"make-shards {out}", "img", enabled=progress) as bar:
                for r in results:
                    bar.update(1)
                    if isinstance(r, Skip):
                        skipped.append({"where": r.where, "reason": r.reason, "detail": r.detail})
                        continue
                    sink.add(f"{n:09d}", sample_files(r))
                    n += 1
            shards = sink.finish()
    except BaseException:
        sink.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.terminate()
    by_reason: dict[str, int] = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    order = {"shuffled": False} if keep_order else {"shuffled": True, "seed": seed}
    manifest = {"version": MANIFEST_VERSION, "inputs": inputs, "order": order, "samples": n, "shards": shards,
                "skipped": {"count": len(skipped), "by_reason": by_reason, "rows": skipped}}
    swap_in(out, staging, previous, shards, manifest)
    if left := sorted(set(loose) - {s["name"] for s in shards}):
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        log.warning("%s: left in place %d tar file(s) no previous manifest listed (%s); the loader refuses tar files "
                    "%s does not list, so move them out of this folder", out, len(left), shown, MANIFEST)
    if skipped:
        log.warning("%s: skipped %d source rows (%s); see %s", src, len(skipped),
                    ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items())), out / MANIFEST)
    return manifest


def swap_in(out: Path, staging: Path, previous: set[str], shards: list[dict[str, Any]],
            manifest: dict[str, Any]) -> None:
    """Replace the folder's dataset by the staged one: the old manifest goes first (a folder without one, beside a
    staging folder, is refused by the loader), then the old shards, then the new ones, then their manifest."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in previous:
        (out / name).unlink(missing_ok=True)
    for s in shards:
        os.replace(staging / s["name"], out / s["name"])
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(staging, ignore_errors=True)


def check_replaceable(out: Path, inputs: dict[str, Any], replace: bool) -> tuple[set[str], list[str]]:
    """The shard names the previous manifest of `out` lists, which this run may replace (a dataset written from the
    same source, or any when `replace`), and the tar files no manifest lists. Another dataset, or loose tar files,
    are refused unless `replace`; even then loose files are not this run's to delete (only a new shard of the same
    name replaces one)."""
    try:
        old = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        old = None
    except (OSError, json.JSONDecodeError):
        old = {}
    names = {s["name"] for s in (old or {}).get("shards", []) if isinstance(s, dict) and "name" in s}
    loose = sorted(p.name for p in out.glob("*.tar") if p.name not in names)
    # the same source written again (other shard sizes, seed, ...) is the same dataset; another source is not
    same = old is not None and (old.get("inputs") or {}).get("source") == inputs["source"]
    if not replace and ((old is not None and not same) or loose):
        what = f"a dataset written from {old.get('inputs', {}).get('source', '?')}" if old else \
            f"{len(loose)} tar files no {MANIFEST} accounts for"
        raise DataError(f"{out}: holds {what}; pass --overwrite (replace=True) to replace it, or choose another "
                        "folder")
    return names, loose


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the main process, which stops them (one message instead of one per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops the writer like Ctrl-C (clean up, one line, exit 130) instead of killing it mid-file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


