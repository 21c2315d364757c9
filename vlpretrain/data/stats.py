"""Counts of good and skipped samples (collected in each loader worker, sent with every batch, summed per rank), and
how varied the captions of each batch are (pure functions, and their running means for the metrics log)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlpretrain.errors import DataError

# Reasons a sample is skipped while loading (the writer's manifest uses the same words where they overlap).
REASONS = ("truncated tar", "unreadable shard", "missing image", "undecodable image", "missing caption",
           "empty caption")


class WorkerStats:
    """A worker's counts since its last batch; `take()` hands them over (with one example per new reason)."""

    def __init__(self, stall_limit: int = 1 << 62) -> None:
        self.good = 0
        self.total_good = 0
        self.since_good = 0  # raw samples read since the last good one: an all-bad stream must not spin forever
        self.stall_limit = stall_limit
        self.counting = True  # off during repeat passes: their bad samples were counted in the first pass
        self._skipped: Counter[tuple[str, str]] = Counter()
        self._skipped_totals: Counter[str] = Counter()
        self._examples: dict[str, str] = {}
        self._reported: set[str] = set()

    def ok(self) -> None:
        """One sample made it into a batch."""
        self.good += 1
        self.total_good += 1
        self.since_good = 0

    def read(self, shard: str) -> None:
        """One raw sample was read from `shard`; a DataError once too many came without a good one."""
        self.since_good += 1
        if self.since_good > self.stall_limit:
            raise DataError(f"{shard}: read {self.since_good} samples in a row without a usable one "
                            f"(skipped so far: {dict(self._skipped_totals)})")

    def skip(self, shard: str, reason: str, detail: str = "", n: int = 1) -> None:
        """`n` samples of `shard` were dropped for `reason`."""
        assert reason in REASONS, reason
        if not self.counting:
            return
        self._skipped[(shard, reason)] += n
        self._skipped_totals[reason] += n
        if reason not in self._reported and reason not in self._examples:
            self._examples[reason] = f"{shard}: {detail}" if detail else shard

    def take(self) -> dict[str, Any]:
        """The counts since the last call, as plain data (it crosses the worker -> main process queue)."""
        delta = {"good": self.good, "skipped": [(s, r, n) for (s, r), n in self._skipped.items()],
                 "examples": dict(self._examples)}
        self._reported |= set(self._examples)
        self.good = 0
        self._skipped.clear()
        self._examples.clear()
        return delta


@dataclass
class LoaderStats:
    """Samples delivered and skipped (by reason and by shard) since the loader was built, for one rank."""

    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    by_shard: dict[str, Counter] = field(default_factory=dict)

    def merge(self, delta: dict[str, Any]) -> list[tuple[str, str]]:
        """Add a worker's delta; returns (reason, example) for reasons seen here for the first time."""
        self.samples += delta["good"]
        new = [(r, ex) for r, ex in delta["examples"].items() if self.skipped[r] == 0]
        for shard, reason, n in delta["skipped"]:
            self.skipped[reason] += n
            self.by_shard.setdefault(shard, Counter())[reason] += n
        return new

    @property
    def bad(self) -> int:
        """Samples skipped, all reasons together."""
        return sum(self.skipped.values())

    def bad_fraction(self) -> float:
        """Skipped samples as a fraction of all samples met."""
        total = self.samples + self.bad
        return self.bad / total if total else 0.0

    def worst_shard(self) -> tuple[str, Counter] | None:
        """The shard with the most skipped samples, and its counts by reason."""
        if not self.by_shard:
            return None
        name = max(self.by_shard, key=lambda s: (sum(self.by_shard[s].values()), s))
        return name, self.by_shard[name]

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for metric logs: `samples`, `skipped`, and `skipped/<reason>`."""
        out: dict[str, Any] = {"samples": self.samples, "skipped": self.bad}
        out.update({f"skipped/{r}": n for r, n in sorted(self.skipped.items())})
        return out


# ---------------------------------------------------------------------------------------------------------------
# batch diversity: a batch drawn from sorted shards holds one class (or date, or source), and a contrastive loss over
# near-identical pairs cannot fall below ln(batch size); the captions in a batch show it without looking at images


def repeated_caption_fraction(captions: Sequence[Hashable]) -> float:
    """Fraction of a batch's samples whose caption occurs more than once in that batch."""
    if not captions:
        return 0.0
    counts = Counter(captions)
    return sum(n for n in counts.values() if n > 1) / len(captions)


def expected_distinct(reference: Sequence[Hashable], n: int) -> float:
    """Distinct captions expected among `n` drawn at random (with replacement) from the frequencies in `reference`."""
    if not reference:
        return 0.0
    total = len(reference)
    return sum(1.0 - (1.0 - c / total) ** n for c in Counter(reference).values())


def diversity_ratio(batches: Sequence[Sequence[Hashable]], reference: Sequence[Hashable]) -> float:
    """Mean distinct captions per batch over those a random batch of the same size from `reference` would hold.

    About 1 (or above) for well-mixed batches, whatever the data (unique captions or a few templates per class);
    far below 1 when each batch comes from one part of a sorted dataset.
    """
    sizes = [len(b) for b in batches if b]
    if not sizes or not reference:
        return 1.0
    observed = sum(len(set(b)) for b in batches if b) / len(sizes)
    expected = sum(expected_distinct(reference, n) for n in sizes) / len(sizes)
    return observed / expected if expected else 1.0


class CaptionDiversity:
    """Per-batch caption statistics of one rank: means over each log window, and the first batches kept for a check.

    Once `expected` (distinct captions a random batch of the data would hold) is known, windows also report
    `caption_diversity`: distinct captions per batch over `expected`, about 1 when batches are well mixed.
    """

    def __init__(self, check_batches: int):
        self.check_batches = check_batches
        self.first: list[list[Hashable]] = []  # the first `check_batches` batches' captions
        self.expected: float | None = None
        self._repeated, self._distinct, self._batches = 0.0, 0, 0

    def add(self, captions: Sequence[Hashable]) -> None:
        """Count one batch's captions (any hashable form of them: text or token rows)."""
        self._repeated += repeated_caption_fraction(captions)
        self._distinct += len(set(captions))
        self._batches += 1
        if len(self.first) < self.check_batches:
            self.first.append(list(captions))

    @property
    def ready(self) -> bool:
        """Whether the first `check_batches` batches have been seen."""
        return len(self.first) >= self.check_batches

    def take(self) -> dict[str, float]:
        """Means over the batches since the last call: `repeated_captions` (and `caption_diversity`); none: {}."""
        if not self._batches:
            return {}
        out = {"repeated_captions": self._repeated / self._batches}
        if self.expected:
            out["caption_diversity"] = self._distinct / self._batches / self.expected
        self._repeated, self._distinct, self._batches = 0.0, 0, 0
        return out
