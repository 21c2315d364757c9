"""Stopping on SIGINT/SIGTERM: the first signal asks the work to stop at its next safe point, a later one exits now.

A preempted job gets a grace period between SIGTERM and SIGKILL, so a long step (an evaluation that runs for hours)
checks `should_stop` between its batches and raises `Interrupted`; its caller keeps what finished and says what was
left. The module uses the standard library only, so `zeroshot` can take a stop check without loading the trainer.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

StopCheck = Callable[[], bool]

# A repeat within this many seconds is the same request delivered twice: on Ctrl-C the terminal signals every
# process of a torchrun job and torchrun then forwards the signal to its workers.
REPEAT_AFTER_S = 1.0
EXIT_CODE = 130


class Interrupted(Exception):
    """Long work noticed a requested stop (`check_stop`) and ended early; what it finished is kept."""


def check_stop(should_stop: StopCheck | None) -> None:
    """Raise Interrupted when `should_stop` says so (never when it is None); called between batches."""
    if should_stop is not None and should_stop():
        raise Interrupted("stop requested")


class StopRequest:
    """Until `restore`, SIGINT and SIGTERM set `requested` for the work to honour at its next check; another signal,
    at least REPEAT_AFTER_S after the first, exits the process at once with status 130 (nothing more is written)."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    @property
    def requested(self) -> bool:
        return self.first_at is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        elif now - self.first_at >= REPEAT_AFTER_S:
            print(f"{signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(EXIT_CODE)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
