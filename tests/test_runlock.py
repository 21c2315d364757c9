"""The run folder's lock: one holder at a time, a refusal naming the holder and how to clear a stale lock, and
no forked child (a DataLoader worker) keeping it after its parent lets go."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys

import pytest

from vlpretrain.errors import RunFolderLocked
from vlpretrain.runlock import LOCK_NAME, lock_run_folder


def test_one_holder_at_a_time_and_the_refusal_names_it(tmp_path):
    lock = lock_run_folder(tmp_path)
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(RunFolderLocked) as e:
        lock_run_folder(tmp_path)  # another open file: refused even within one process
    msg = str(e.value)
    assert msg.startswith(f"train.output_dir {tmp_path}: another run is using this folder (host "
                          f"{socket.gethostname()}, pid {os.getpid()}, started {holder['started']}: ")
    assert "\n" not in msg and "delete" not in msg  # a live holder here: nothing to clear
    lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a finished run's record is never taken for a holder's
    with lock_run_folder(tmp_path):
        pass


def test_a_stale_lock_is_explained(tmp_path):
    """A lock held while its record names another machine, or a dead process here: what a network file system
    shows after a client died. The message says how to check and clear it."""
    lock = lock_run_folder(tmp_path)
    path = tmp_path / LOCK_NAME
    record = {"host": "gpu07", "pid": 4242, "started": "2026-12-01 10:00:00 UTC", "command": "vlpretrain train"}
    path.write_text(json.dumps(record))
    with pytest.raises(RunFolderLocked, match=r"\(host gpu07, pid 4242, started 2026-12-01 10:00:00 UTC: "
                       r"vlpretrain train\); .*check on gpu07: `ps -p 4242`.* delete " + str(path)):
        lock_run_folder(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    path.write_text(json.dumps({**record, "host": socket.gethostname(), "pid": dead}))
    with pytest.raises(RunFolderLocked, match=f"pid {dead} is no longer running on this host.* delete {path}"):
        lock_run_folder(tmp_path)
    lock.release()


def _live_on(ready, done) -> None:
    ready.set()  # the fork hooks have run by now
    done.wait(60)


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    lock = lock_run_folder(tmp_path)
    ctx = multiprocessing.get_context("fork")  # as DataLoader workers start on Linux
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_live_on, args=(ready, done))
    child.start()
    try:
        assert ready.wait(60)
        lock.release()  # the parent lets go (or dies) while its child lives on
        with lock_run_folder(tmp_path):
            pass
    finally:
        done.set()
        child.join()
