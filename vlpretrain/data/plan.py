"""Which shards each rank and worker reads in an epoch, and how many batches each worker yields: pure functions.

Every rank and worker computes the same plan from (shard sample counts, seed, epoch, world size, workers, batch
size), so no process needs to talk to another, and a resumed run can compute exactly what the interrupted one had
already consumed.

Batch order. torch's DataLoader hands out work round-robin over its workers and yields results in that order,
skipping workers that have finished. So a rank's batch sequence is: one batch from each logical worker in turn,
workers that ran out dropping out of the cycle. `round_robin_take` counts how many batches of each worker lie in the
first n of that sequence; on resume the DataLoader's physical worker 0 plays the logical worker whose turn is next.

Epoch mode. Shards are shuffled with (seed, epoch), dealt to ranks (`order[rank::world]`), then to workers. A worker
yields only full batches of its own samples, so each rank has `sum_w floor(n_w / batch)` batches; every rank then
stops at the smallest such number over ranks, so that all ranks step together. The samples beyond it (at most a
partial batch per worker plus a rank's surplus) wait for the next epoch, where the shuffle deals shards differently.
When every worker's sample count is a multiple of the batch size and the ranks are balanced, each sample is seen
exactly once per epoch. Bad samples (found only when decoding) can leave a worker short of its planned batches; it
then fills them from a second pass over its own shards, so a few samples, as many as were bad, are seen twice
rather than letting one rank stop early and hang the others.

Resampled mode. An epoch is `train_num_samples // (world * batch)` batches per rank, spread over workers
round-robin; each worker draws shards with replacement from a stream seeded by (seed, epoch, rank, worker).
"""

from __future__ import annotations

import glob
import hashlib
import random
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

from vlpretrain import storage
from vlpretrain.errors import ConfigError, DataError


def seed_of(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (the same in every process and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _expand_entry(entry: str) -> list[str]:
    """Brace patterns and `::` lists (webdataset's), then shell globs (`*`, `?`, `[...]`) of local or object-storage
    paths, each glob sorted so that a run reads its shards in the same order on every machine and every run."""
    urls = []
    for url in expand_urls(entry):
        if url.startswith("pipe:") or not glob.has_magic(url):
            urls.append(url)
        elif not storage.is_remote(url):
            urls += sorted(glob.glob(storage.local_path(url)))
        else:  # object storage: one listing
            fs, path = storage.filesystem(url)
            scheme = url.split("://", 1)[0]
            urls += sorted(f"{scheme}://{p}" for p in fs.glob(path))
    return urls


def expand_shards(train: str | list[str]) -> list[list[str]]:
    """Shard urls per entry of `data.train` (brace patterns, `::`-separated lists and sorted globs expanded)."""
    entries = [train] if isinstance(train, str) else list(train)
    groups = [_expand_entry(e) for e in entries]
    for entry, urls in zip(entries, groups):
        if not urls:
            raise ConfigError(f"data.train: {entry!r} names no shard")
    return groups


def round_robin_take(caps: list[int], n: int) -> list[int]:
    """How many of the first `n` items of a round-robin over workers with `caps` items each come from each worker."""
    assert 0 <= n <= sum(caps)
    lo, hi = 0, max(caps, default=0)
    while lo < hi:  # the largest number of complete rounds t with sum(min(c, t)) <= n
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in caps) <= n:
            lo = mid
        else:
            hi = mid - 1
    take = [min(c, lo) for c in caps]
    rest = n - sum(take)
    for w, c in enumerate(caps):
        if rest and c > lo:
            take[w] += 1
            rest -= 1
    return take


@dataclass(frozen=True)
class WorkerPlan:
    """One logical worker's part of an epoch: its shards (epoch mode), batches to yield, batches to skip first."""

    shards: tuple[int, ...]
    batches: int
    skip_batches: int


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: batches in the whole epoch, per-worker plans, and the resume rotation of workers."""

    batches: int
    workers: tuple[WorkerPlan, ...]
    offset: int  # DataLoader worker i plays logical worker (i + offset) % workers

    def logical(self, physical: int) -> int:
        """The logical worker a DataLoader worker plays this epoch."""
        return (physical + self.offset) % len(self.workers)


def _next_worker(caps: list[int], done: int) -> int:
    """The logical worker whose batch comes right after the first `done` ones."""
    if done == 0:
        return 0
    before, after = round_robin_take(caps, done - 1), round_robin_take(caps, done)
    last = next(w for w in range(len(caps)) if after[w] != before[w])
    return (last + 1) % len(caps)


def _finish(caps: list[int], batches: int, start_batch: int, shards: list[tuple[int, ...]]) -> EpochPlan:
    start = min(max(start_batch, 0), batches)
    skip = round_robin_take(caps, start)
    workers = tuple(WorkerPlan(s, c, k) for s, c, k in zip(shards, caps, skip))
    return EpochPlan(batches, workers, _next_worker(caps, start))


def plan_epoch(counts: list[int], *, seed: int, epoch: int, rank: int, world_size: int, workers: int,
               batch_size: int, start_batch: int = 0) -> EpochPlan:
    """Exact-epoch plan (see the module docstring); DataError when shards or samples are too few."""
    n = len(counts)
    if n < world_size * workers:
        raise DataError(f"data.train: {n} shard(s) for {world_size} rank(s) x {workers} worker(s); epoch mode needs "
                        f"at least {world_size * workers} shards (write smaller shards with make-shards --shard-size, "
                        f"lower data.workers, or use data.mode: resampled)")
    order = list(range(n))
    random.Random(seed_of("shards", seed, epoch)).shuffle(order)
    per_rank = []
    for r in range(world_size):
        mine = order[r::world_size]
        shards = [tuple(mine[w::workers]) for w in range(workers)]
        per_rank.append((shards, [sum(counts[i] for i in s) // batch_size for s in shards]))
    batches = min(sum(full) for _, full in per_rank)
    if batches == 0:
        raise DataError(f"data.train: {sum(counts)} samples in {n} shards give some rank no full batch of "
                        f"{batch_size} in epoch {epoch} ({world_size} rank(s) x {workers} worker(s)); "
                        f"lower data.batch_size or data.workers")
    shards, full = per_rank[rank]
    return _finish(round_robin_take(full, batches), batches, start_batch, shards)


def plan_resampled(train_num_samples: int, *, world_size: int, workers: int, batch_size: int,
                   start_batch: int = 0) -> EpochPlan:
    """Resampled-mode plan: the epoch's batches spread round-robin over workers, which draw shards themselves."""
    batches = train_num_samples // (world_size * batch_size)
    if batches == 0:
        raise ConfigError(f"data.train_num_samples: {train_num_samples} is less than one batch of {batch_size} "
                          f"per rank on {world_size} rank(s)")
    caps = [batches // workers + (w < batches % workers) for w in range(workers)]
    return _finish(caps, batches, start_batch, [()] * workers)
