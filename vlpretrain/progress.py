"""Progress for every long step: a tqdm bar on a terminal, one plain summary line in a log file.

A bar redrawn in a log file leaves hundreds of carriage-return fragments; a job log needs one line saying what
was done and how long it took. Both packages use `progress` so every long step reports the same way.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class LineProgress:
    """tqdm's small interface (update, set_postfix, close, context manager) printing one line when closed."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._start, self._postfix, self._closed = time.perf_counter(), "", False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        seconds = time.perf_counter() - self._start
        rate = f", {self.n / seconds:.1f} {self.unit}/s" if seconds > 0 and self.n else ""
        extra = f", {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {self.n} {self.unit} in {seconds:.1f} s{rate}{extra}", file=sys.stderr, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Off:
    """No progress at all."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Off:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A bar on a terminal, one summary line otherwise, nothing when not `enabled`."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    return LineProgress(total, desc, unit)
