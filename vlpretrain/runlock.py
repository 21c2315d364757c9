"""One run per folder: an operating-system lock (`flock`) on a file in the run folder, held by rank 0 from before
the run touches the folder until it ends. The OS releases it when the process exits or dies, so a crash never
leaves it behind on a local disk; the file records who holds it, so a refused run can name the holder.

A network file system may keep the lock of a machine that died until its server expires it; the refusal says how
to check and clear that. A file system without locks (Lustre mounted without `flock`) gets a warning, not a stop.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from vlpretrain.errors import ConfigError, RunFolderLocked

log = logging.getLogger("vlpretrain")

LOCK_NAME = ".vlpretrain.lock"

# Descriptors of the locks this process holds. A forked child (a DataLoader worker) shares the parent's open file
# and with it the flock, which would then outlive a killed parent until every child exits: children close them.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # closes the child's reference only; the parent's lock stays
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunLock:
    """A held run-folder lock; `release()` (or leaving a `with` block, or the process ending) lets it go."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.ftruncate(self._fd, 0)  # a later contender must never read a finished run's record as its holder
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_folder(out_dir: str | os.PathLike) -> RunLock:
    """Take the lock of run folder `out_dir` (which must exist) for this process, or raise RunFolderLocked in one
    line naming the run that holds it (host, pid, start time, command) and how to clear a stale one."""
    folder = Path(out_dir)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(f"train.output_dir {folder}: cannot open its lock file {path} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderLocked(_refusal(folder, path)) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise ConfigError(f"train.output_dir {folder}: cannot lock {path} ({e.strerror or e})") from None
        log.warning("train.output_dir %s: its file system does not support locks (%s): a second run started into "
                    "this folder will not be stopped", folder, e.strerror)
        return RunLock(path, None)
    holder = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "command": shlex.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    _HELD.add(fd)
    return RunLock(path, fd)


def _refusal(folder: Path, path: Path) -> str:
    holder = _read_holder(path)
    if holder is None:
        return (f"train.output_dir {folder}: another run holds its lock {path} (who is not recorded); wait for it "
                "to end, or choose another train.output_dir")
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    command = str(holder.get("command", ""))
    command = command if len(command) <= 120 else command[:117] + "..."
    msg = (f"train.output_dir {folder}: another run is using this folder (host {host}, pid {pid}, started "
           f"{holder.get('started', '?')}: {command}); wait for it to end, or choose another train.output_dir")
    if host != socket.gethostname():
        msg += (f"; if that job is gone (check on {host}: `ps -p {pid}`, or your scheduler's queue), a network file "
                f"system may keep its lock until the file server expires it: delete {path} and start again")
    elif _dead_here(holder):
        msg += (f"; pid {pid} is no longer running on this host, so the file system keeps its lock (a network file "
                f"system may until its server expires it): if no run uses the folder, delete {path} and start again")
    return msg


def _read_holder(path: Path) -> dict[str, Any] | None:
    # the holder writes its record right after taking the lock: a contender may read before that (nothing yet, or
    # the record of an earlier run that was killed), so look again for a moment before believing either
    holder = None
    for _ in range(20):
        try:
            holder = json.loads(path.read_text())
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict) and not _dead_here(holder):
            return holder
        time.sleep(0.05)
    return holder if isinstance(holder, dict) else None


def _dead_here(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
