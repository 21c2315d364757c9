"""How many samples each shard holds, known from the files beside the shards wherever they say so, and by one
parallel header scan only where nothing does.

Sources, in this order, per shard folder: our `_manifest.json` (written by make-shards or index-shards; or an index
kept elsewhere and named by `data.index`), open_clip's `sizes.json` ({shard name: samples}) or `__len__` (one total
for the folder), img2dataset's `NNNNN_stats.json` beside each shard (`successes`), then a header scan. A count that
comes from a manifest, an index, sizes.json or stats is exact: a shard that ends early has every lost sample counted,
and one that ends cleanly with another count is an error naming both. `__len__` and `data.train_num_samples` give
only an even share per shard, good for planning epochs but not for counting losses.

Finding out costs one folder listing per folder (which also finds missing shards), a few small reads, and for
img2dataset's layout one small read per shard, done concurrently. The trainer counts once per run on rank 0,
shares the result with every rank and keeps it in the run folder (`ShardCounts.to_json`), so a resume reads it back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any, Literal

from vlpretrain import storage
from vlpretrain.data import tars
from vlpretrain.data.plan import expand_shards
from vlpretrain.errors import DataError
from vlpretrain.formats import INCOMPLETE, MANIFEST

log = logging.getLogger(__name__)

SIZES, TOTAL, STATS_SUFFIX = "sizes.json", "__len__", "_stats.json"
SHOW_MISSING = 5  # names quoted in a message about missing shards
READ_THREADS = 32  # concurrent small reads (stats sidecars: one per shard)
PARALLEL_SCAN_MIN = 16  # shards below which a scan runs in this process (a local one takes ~0.1 s per 1,000 samples)


@dataclass
class ShardCounts:
    """What a run knows of its shards before reading them.

    `urls` are the shards to read (those that exist), `samples` their counts for planning epochs, `exact` whether
    each count is known exactly (every lost sample can then be counted), `how` how many shards were counted each
    way, `missing` the shards named by data.train that do not exist (left out under data.missing_shards: skip).
    """

    urls: list[str]
    samples: list[int]
    exact: list[bool]
    how: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def expected(self) -> dict[str, int | None]:
        """Samples a complete read of each shard must yield; None where only an estimate is known."""
        return {u: (n if x else None) for u, n, x in zip(self.urls, self.samples, self.exact)}

    def describe(self) -> str:
        ways = ", ".join(f"{n:,} from {k}" for k, n in sorted(self.how.items(), key=lambda kv: -kv[1]))
        gone = f"; {len(self.missing):,} missing, left out" if self.missing else ""
        return f"{len(self.urls):,} shards, {sum(self.samples):,} samples ({ways}) in {self.seconds:.1f} s{gone}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ShardCounts:
        return cls(**values)


def read_manifest(url: str) -> dict[str, tuple[int, int]] | None:
    """{shard name: (samples, bytes)} of a manifest or index file, None if there is none; unreadable is an error."""
    raw = storage.read_bytes(url)
    return None if raw is None else _parse_manifest(url, raw)[1]


def _parse_manifest(url: str, raw: bytes) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """(the whole JSON, {shard name: (samples, bytes)}) of a manifest's bytes; unreadable is an error naming it."""
    try:
        values = json.loads(raw)
        return values, {s["name"]: (int(s["samples"]), int(s["bytes"])) for s in values["shards"]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{url}: unreadable shard manifest ({type(e).__name__}: {e}); restore it, or delete it and "
                        "run vlpretrain index-shards on the folder") from None


def _read_index(url: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """(shard folder, counts) of an index written with index-shards --out (a file, or a folder holding it)."""
    if not url.endswith(".json"):
        url = storage.join(url, MANIFEST)
    raw = storage.read_bytes(url)
    if raw is None:
        raise DataError(f"data.index: {url} does not exist")
    values, listed = _parse_manifest(url, raw)
    root = values.get("root")
    if not isinstance(root, str):
        raise DataError(f"data.index: {url} names no shard folder (\"root\"); write it with vlpretrain index-shards")
    return root.rstrip("/"), listed


def _json_counts(url: str, raw: bytes | None, what: str) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise DataError(f"{url}: unreadable {what} ({e})") from None


def _stats_successes(url: str, raw: bytes | None) -> int | None:
    values = _json_counts(url, raw, "img2dataset stats")
    if values is None:
        return None
    if not isinstance(values, dict) or not isinstance(values.get("successes"), int):
        raise DataError(f"{url}: img2dataset stats without an integer \"successes\"")
    return values["successes"]


def _stats_name(name: str) -> str:
    return name.split(".", 1)[0] + STATS_SUFFIX


def _read_many(urls: list[str]) -> list[bytes | None]:
    if len(urls) <= 1:
        return [storage.read_bytes(u) for u in urls]
    with ThreadPoolExecutor(min(READ_THREADS, len(urls))) as pool:
        return list(pool.map(storage.read_bytes, urls))


def scan_many(urls: list[str], workers: int) -> list[tuple[int, bool]]:
    """(samples, clean end) of each shard by a header scan, over `workers` processes when there are enough shards
    to repay starting them (each imports the package: seconds), else in this process."""
    if workers <= 1 or len(urls) < PARALLEL_SCAN_MIN:
        return [tars.scan(u) for u in urls]
    with ProcessPoolExecutor(min(workers, len(urls)), mp_context=get_context("spawn")) as pool:
        return list(pool.map(tars.scan, urls, chunksize=max(1, len(urls) // (workers * 8))))


def _folders(urls: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for u in urls:
        out.setdefault(storage.parent(u), []).append(u)
    return out


def count_shards(urls: list[str], *, need_counts: bool = True, num_samples: int | None = None,
                 missing: Literal["error", "skip"] = "error", index: list[str] | None = None,
                 scan_workers: int | None = None) -> ShardCounts:
    """Counts of `urls` (see the module docstring); shards that do not exist are an error naming how many and the
    first few, or with `missing="skip"` left out (listed in `ShardCounts.missing`).

    Without `need_counts` (resampled mode) only folder-level sidecars are read and nothing is scanned: what they
    say still lets lost samples be counted. With `num_samples` (data.train_num_samples), shards no sidecar counts
    share what the known ones leave of it instead of being scanned.
    """
    start = time.perf_counter()
    indexes = dict(_read_index(u) for u in index or [])
    samples: dict[str, int] = {}
    exact: dict[str, bool] = {}
    how: Counter[str] = Counter()
    absent: list[str] = []
    unknown: list[str] = []
    for folder, members in _folders(urls).items():
        listing = storage.list_sizes(folder)
        listable = bool(listing) or not (folder.startswith(("http://", "https://", "pipe:")))
        names = {u: storage.basename(u) for u in members}
        here = [u for u in members if not listable or names[u] in listing]
        absent += [u for u in members if listable and names[u] not in listing]
        if not here:
            continue
        manifest_url = storage.join(folder, MANIFEST)
        listed = indexes.get(folder.rstrip("/")) or read_manifest(manifest_url)
        source = "index" if folder.rstrip("/") in indexes else "manifest"
        if listed is None and not storage.is_remote(folder) and os.path.exists(storage.join(folder, INCOMPLETE)):
            raise DataError(f"{folder}: an interrupted make-shards left this folder without a manifest; "
                            "run make-shards again")
        if listed is not None:
            for u in here:
                known = listed.get(names[u])
                if known is None:
                    raise DataError(f"{u}: not listed in {manifest_url if source == 'manifest' else 'data.index'} "
                                    "(a shard of another make-shards run, or added after indexing?)")
                size = listing.get(names[u])
                if size is not None and size > known[1]:
                    raise DataError(f"{u}: {size} bytes, but {manifest_url} lists {known[1]} (changed since it "
                                    "was written; run vlpretrain index-shards again if it was meant to)")
                samples[u], exact[u] = known[0], True
                how[source] += 1
            continue
        sizes = _json_counts(storage.join(folder, SIZES), storage.read_bytes(storage.join(folder, SIZES))
                             if not listable or SIZES in listing else None, "sizes.json")
        if isinstance(sizes, dict):
            for u in here:
                n = sizes.get(names[u])
                if isinstance(n, int):
                    samples[u], exact[u] = n, True
                    how[SIZES] += 1
        rest = [u for u in here if u not in samples]
        if rest and need_counts:
            stats = [storage.join(folder, _stats_name(names[u])) for u in rest]
            wanted = [s for s in stats if not listable or storage.basename(s) in listing]
            got = dict(zip(wanted, _read_many(wanted)))
            for u, s in zip(rest, stats):
                n = _stats_successes(s, got.get(s))
                if n is not None:
                    samples[u], exact[u] = n, True
                    how["img2dataset stats"] += 1
        rest = [u for u in here if u not in samples]
        total = _json_counts(storage.join(folder, TOTAL), storage.read_bytes(storage.join(folder, TOTAL))
                             if rest and (not listable or TOTAL in listing) else None, "__len__")
        if rest and isinstance(total, int) and len(rest) == len(here):
            for i, u in enumerate(rest):  # the folder's total, spread evenly: right on average, not per shard
                samples[u], exact[u] = total // len(rest) + (i < total % len(rest)), False
                how[TOTAL] += 1
        unknown += [u for u in here if u not in samples]
    if absent:
        shown = ", ".join(absent[:SHOW_MISSING]) + (", ..." if len(absent) > SHOW_MISSING else "")
        if missing == "error":
            raise DataError(f"data.train: {len(absent):,} of {len(urls):,} shards do not exist ({shown}); set "
                            "data.missing_shards: skip to train on the others (img2dataset leaves gaps where a "
                            "whole shard failed)")
        log.warning("data.train: %d of %d shards do not exist and are left out (data.missing_shards: skip): %s",
                    len(absent), len(urls), shown)
    if unknown and need_counts:
        if num_samples is not None:
            left = max(num_samples - sum(samples.values()), len(unknown))
            for i, u in enumerate(unknown):
                samples[u], exact[u] = left // len(unknown) + (i < left % len(unknown)), False
            how["data.train_num_samples"] += len(unknown)
        else:
            workers = scan_workers or min(8, os.cpu_count() or 1)
            log.warning("counting the samples of %d shard(s) by scanning their headers (no sidecar says how many; "
                        "%d processes). Write an index once with `vlpretrain index-shards`, or set "
                        "data.train_num_samples, to skip this", len(unknown), workers)
            for u, (n, clean) in zip(unknown, scan_many(unknown, workers)):
                samples[u], exact[u] = n, clean  # a cut shard's count is what is left, not what was lost
            how["scan"] += len(unknown)
    gone = set(absent)
    present = [u for u in urls if u not in gone]
    for u in present:  # without need_counts, shards no sidecar counts stay unknown
        samples.setdefault(u, 0)
        exact.setdefault(u, False)
    return ShardCounts(present, [samples[u] for u in present], [exact[u] for u in present], dict(how), absent,
                       time.perf_counter() - start)


def shard_sample_counts(urls: list[str]) -> list[int]:
    """Samples per shard from the sidecars beside them, else a header scan (see `count_shards`)."""
    return count_shards(urls).samples


def shards_of(target: str) -> list[str]:
    """The shards a command names: a folder (its `*.tar` files, sorted), or patterns as data.train takes them."""
    local = not storage.is_remote(target)
    if (local and os.path.isdir(storage.local_path(target))) or (not local and not target.endswith(".tar")
                                                                   and "{" not in target and "*" not in target):
        names = sorted(n for n in storage.list_sizes(target) if n.endswith(".tar"))
        if not names:
            raise DataError(f"{target}: holds no .tar shards")
        return [storage.join(target, n) for n in names]
    return [u for group in expand_shards(target) for u in group]


def index_shards(target: str, *, workers: int = 1, out: str | None = None) -> tuple[str, ShardCounts]:
    """Scan the shards `target` names once, in parallel, and write what they hold as a manifest: beside them
    (`FOLDER/_manifest.json`), or with `out` into that folder instead (for shards in a read-only place; training
    then names it with data.index). Returns the manifest's url and the counts.

    With such a manifest, foreign shards are read as ours are: a shard it does not list is refused, and every
    sample a cut or a lost shard takes is counted. Shards found cut short are listed with what they still hold.
    """
    urls = shards_of(target)
    folders = _folders(urls)
    if len(folders) > 1:
        raise DataError(f"{target}: names shards in {len(folders)} folders; index one folder at a time")
    folder = next(iter(folders))
    dest = storage.join(out, MANIFEST) if out else storage.join(folder, MANIFEST)
    existing = storage.read_bytes(storage.join(folder, MANIFEST))
    if existing is not None and _json_counts(folder, existing, "manifest").get("kind") != "index":
        raise DataError(f"{folder}: already has make-shards' {MANIFEST}; its shards need no index")
    start = time.perf_counter()
    listing = storage.list_sizes(folder)
    missing = [u for u in urls if listing and storage.basename(u) not in listing]
    if missing:
        raise DataError(f"{target}: {len(missing)} shard(s) do not exist ({', '.join(missing[:SHOW_MISSING])})")
    scanned = scan_many(urls, workers)
    cut = [u for u, (_, clean) in zip(urls, scanned) if not clean]
    if cut:
        log.warning("%d shard(s) end without a tar end-of-archive block (cut short); indexed with the samples they "
                    "still hold: %s", len(cut), ", ".join(cut[:SHOW_MISSING]))
    manifest = {
        "kind": "index", "written_by": "vlpretrain index-shards", "root": folder,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "samples": sum(n for n, _ in scanned),
        "shards": [{"name": storage.basename(u), "samples": n, "bytes": listing.get(storage.basename(u), 0),
                    "complete": clean} for u, (n, clean) in zip(urls, scanned)],
    }
    try:
        if out and not storage.is_remote(out):
            os.makedirs(storage.local_path(out), exist_ok=True)
        storage.write_bytes(dest, (json.dumps(manifest, indent=1) + "\n").encode())
    except PermissionError:
        raise DataError(f"{dest}: cannot write here (read-only?); write the index elsewhere with --out DIR and "
                        "name it in data.index") from None
    counts = ShardCounts(urls, [n for n, _ in scanned], [True] * len(urls), {"scan": len(urls)}, [],
                         time.perf_counter() - start)
    return dest, counts
