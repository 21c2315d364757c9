"""Counts of good and skipped samples: collected in each loader worker, sent with every batch, summed per rank."""

from __future__ import annotations

from collections import Counter
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
