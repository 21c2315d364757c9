"""A remote mirror of the run's checkpoints (`train.remote_dir`, open_clip's `--remote-sync`): rank 0 uploads each
complete checkpoint in a background thread to `<remote_dir>/checkpoints/step_XXXXXXXX/`, its `COMPLETE` marker
after every other file and the remote `latest` after that, so the remote `latest` always names a complete
checkpoint. `--resume latest` downloads it when the run folder has none.

Training waits only for a snapshot (hard links of the checkpoint's files into a staging folder), so local pruning
never pulls files from under an upload. When checkpoints come faster than uploads, the newest waits and an older
one still waiting is skipped: a mirror is for recovery, and the newest checkpoint is the one to recover from.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import torch

from vlpretrain import storage
from vlpretrain.engine.checkpoint import checkpoint_root, latest_checkpoint
from vlpretrain.engine.dist import DistEnv
from vlpretrain.errors import CheckpointError

log = logging.getLogger("vlpretrain")

STAGING = ".upload-"  # staging folders in the local checkpoints folder, one per snapshot waiting or uploading
DOWNLOAD = ".download-"


def remote_root(remote_dir: str) -> str:
    """Where the mirror keeps checkpoints: `<remote_dir>/checkpoints`, as a run folder does."""
    return storage.join(remote_dir.rstrip("/"), "checkpoints")


def _step(name: str) -> int:
    return int(name.removeprefix("step_"))


def remote_checkpoints(remote_dir: str) -> list[str]:
    """Names of the checkpoint folders in the mirror (complete or not), oldest first."""
    names = [n for n in storage.list_folders(remote_root(remote_dir)) if n.startswith("step_")]
    return sorted(names, key=_step)


def remote_latest(remote_dir: str) -> str | None:
    """The checkpoint the mirror's `latest` names, or None when it has none."""
    data = storage.read_bytes(storage.join(remote_root(remote_dir), "latest"))
    return data.decode().strip() if data else None


def snapshot(ckpt: Path, staging: Path) -> None:
    """The checkpoint's files as hard links in `staging` (copies where the file system refuses links): its
    contents stay readable for the upload whatever happens to `ckpt` afterwards."""
    shutil.rmtree(staging, ignore_errors=True)
    for folder, _, files in os.walk(ckpt):
        dest = staging / Path(folder).relative_to(ckpt)
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(folder) / f, dest / f)
            except OSError:
                shutil.copy2(Path(folder) / f, dest / f)


def upload_checkpoint(staged: Path, remote_dir: str, name: str) -> None:
    """Every file of a staged checkpoint into the mirror, `COMPLETE` last, then the mirror's `latest`."""
    target = storage.join(remote_root(remote_dir), name)
    files = [p for p in sorted(staged.rglob("*")) if p.is_file()]
    for path in sorted(files, key=lambda p: p.name == "COMPLETE"):  # stable: COMPLETE after the others
        storage.put_file(path, storage.join(target, path.relative_to(staged).as_posix()))
    storage.write_bytes(storage.join(remote_root(remote_dir), "latest"), f"{name}\n".encode())


def prune_remote(remote_dir: str, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` checkpoints in the mirror (`current`, just named by `latest`, among them);
    older folders beyond those, complete or left half-uploaded, are removed. Newer ones are never touched."""
    older = [n for n in remote_checkpoints(remote_dir) if _step(n) < _step(current)]
    complete = [n for n in older if storage.read_bytes(storage.join(remote_root(remote_dir), f"{n}/COMPLETE"))]
    kept = set(complete[len(complete) - (keep_last - 1):]) if keep_last > 1 else set()
    for name in older:
        if name not in kept:
            storage.remove_tree(storage.join(remote_root(remote_dir), name))


class RemoteMirror:
    """Rank 0's uploader: `submit` snapshots a checkpoint and returns; one background thread uploads (retrying a
    failed upload `attempts` times), then prunes the mirror. `finish` waits for the last upload."""

    def __init__(self, remote_dir: str, local_root: Path, keep_last: int, attempts: int = 3,
                 retry_wait_s: float = 2.0):
        self.remote_dir, self.local_root, self.keep_last = remote_dir, Path(local_root), keep_last
        self.attempts, self.retry_wait_s = attempts, retry_wait_s
        self._cond = threading.Condition()
        self._pending: tuple[str, Path] | None = None  # waiting for the thread
        self._running: str | None = None
        self._last_submitted: str | None = None
        self._uploaded: str | None = None
        self._report: dict[str, float] = {}
        self._closed = False
        for old in self.local_root.glob(f"{STAGING}*"):  # a crashed run's snapshots
            shutil.rmtree(old, ignore_errors=True)
        self._thread = threading.Thread(target=self._work, name="remote-mirror", daemon=True)
        self._thread.start()

    def submit(self, ckpt: Path) -> None:
        """Snapshot a complete checkpoint for upload; training waits for the snapshot only."""
        t0 = time.perf_counter()
        staging = self.local_root / f"{STAGING}{ckpt.name}"
        try:
            snapshot(ckpt, staging)
        except OSError as e:  # a full disk where links fail and copies need room: training goes on without it
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("remote: %s not uploaded: staging it failed (%s)", ckpt.name, describe_error(e))
            with self._cond:
                self._last_submitted = ckpt.name
            return
        with self._cond:
            if self._pending is not None:  # the previous upload is slow: the newest checkpoint goes next
                log.warning("remote: %s skipped, %s replaces it in the queue (the upload of %s is still running)",
                            self._pending[0], ckpt.name, self._running)
                shutil.rmtree(self._pending[1], ignore_errors=True)
            self._pending = (ckpt.name, staging)
            self._last_submitted = ckpt.name
            self._report["remote/snapshot_s"] = time.perf_counter() - t0
            self._cond.notify_all()

    def report(self) -> dict[str, float]:
        """Metrics since the last call: the newest uploaded step and its upload time, the snapshot's wait."""
        with self._cond:
            out, self._report = self._report, {}
        return out

    def finish(self) -> bool:
        """Wait for the queued and running uploads, saying so; whether the newest submitted checkpoint reached
        the mirror."""
        with self._cond:
            busy = self._pending or self._running
            if busy:
                name = self._pending[0] if self._pending else self._running
                print(f"waiting for the upload of {name} to {self.remote_dir} (Ctrl-C twice leaves it; the "
                      "remote `latest` still names a complete checkpoint)", flush=True)
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if busy and self.missing is None:
            print(f"{self._uploaded} is in {self.remote_dir}", flush=True)
        return self.missing is None

    @property
    def missing(self) -> str | None:
        """The newest submitted checkpoint when it did not reach the mirror."""
        return None if self._uploaded == self._last_submitted else self._last_submitted

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                (name, staging), self._pending = self._pending, None
                self._running = name
            self._upload(name, staging)
            with self._cond:
                self._running = None

    def _upload(self, name: str, staging: Path) -> None:
        t0 = time.perf_counter()
        error = None
        for attempt in range(1, self.attempts + 1):
            try:
                upload_checkpoint(staging, self.remote_dir, name)
                error = None
                break
            except Exception as e:  # any backend's error: network, credentials, a full disk
                error = e
                if attempt < self.attempts:
                    time.sleep(self.retry_wait_s * attempt)
        shutil.rmtree(staging, ignore_errors=True)
        if error is not None:
            log.warning("remote: the upload of %s to %s failed %d times (%s); the mirror's latest stays at %s",
                        name, self.remote_dir, self.attempts, describe_error(error), self._uploaded or "none")
            return
        seconds = time.perf_counter() - t0
        try:
            prune_remote(self.remote_dir, self.keep_last, name)
        except Exception as e:  # the checkpoint is safe; old ones linger until the next prune
            log.warning("remote: pruning %s failed (%s: %s)", self.remote_dir, type(e).__name__, e)
        with self._cond:
            self._uploaded = name
            self._report.update({"remote/uploaded_step": _step(name), "remote/upload_s": seconds})
        log.info("remote: uploaded %s to %s in %.1f s", name, self.remote_dir, seconds)


def run_folder_shared(out_dir: Path, env: DistEnv) -> bool:
    """Whether every rank sees the same run folder (a shared file system) rather than a disk of its own node: rank
    0 leaves a token there that every rank looks for. Collective."""
    if env.world_size == 1:
        return True
    token = env.share(uuid.uuid4().hex if env.is_main else None)
    probe = Path(out_dir) / f".shared-{token}"
    if env.is_main:
        probe.write_text("")
    torch.distributed.barrier()
    seen = probe.is_file()
    torch.distributed.barrier()
    if env.is_main:
        probe.unlink()
    return not env.any(not seen)[0]


def download_checkpoint(remote_dir: str, name: str, local_root: Path) -> Path:
    """A complete mirror checkpoint into `local_root/name`: downloaded under a temporary name, then renamed, so a
    crash never leaves a half checkpoint under a checkpoint's name."""
    source = storage.join(remote_root(remote_dir), name)
    files = storage.list_tree(source)
    if "COMPLETE" not in files:
        raise CheckpointError(f"{source}: not a complete checkpoint (no COMPLETE marker)")
    local_root.mkdir(parents=True, exist_ok=True)
    for old in local_root.glob(f"{DOWNLOAD}*"):  # an interrupted download's (one process per folder at a time)
        shutil.rmtree(old, ignore_errors=True)
    tmp = local_root / f"{DOWNLOAD}{name}-{os.getpid()}"
    for rel in files:
        storage.get_file(storage.join(source, rel), tmp / rel)
    final = local_root / name
    try:
        os.rename(tmp, final)
    except OSError:  # another process on this file system renamed its copy first
        if not (final / "COMPLETE").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resume_point(out_dir: Path, remote_dir: str | None, env: DistEnv) -> Path | None:
    """The checkpoint `--resume latest` continues from, present on every node: rank 0 picks the run folder's
    `latest`, else the mirror's; rank 0 downloads it when missing, then the first process of every other node
    whose run folder (node-local) still lacks it. Collective."""
    root = checkpoint_root(out_dir)
    name, failed = None, ""
    if env.is_main:
        try:
            local = latest_checkpoint(out_dir)
            name = local.name if local else (remote_latest(remote_dir) if remote_dir else None)
        except Exception as e:  # a broken local `latest`, an unreachable mirror: every rank raises it below
            failed = _one_line(e)
    name, failed = env.share([name, failed])  # every rank: rank 0's choice (JSON over the host group, no pickle)
    if failed:
        raise CheckpointError(failed)
    if name is None:
        return None
    # rank 0 first: on a shared file system the other nodes then find its copy and download nothing
    for turn in (True, False):
        if env.is_main == turn and env.local_rank == 0 and not (root / name / "COMPLETE").is_file():
            try:
                if remote_dir is None:
                    raise CheckpointError(f"{root / name}: missing on this node and no train.remote_dir to fetch it")
                print(f"downloading {name} from {remote_dir}", flush=True)
                download_checkpoint(remote_dir, name, root)
                storage.write_bytes(str(root / "latest"), f"{name}\n".encode())
            except Exception as e:
                failed = _one_line(e)
        if env.world_size > 1:
            torch.distributed.barrier()
        if env.any(bool(failed))[0]:
            raise CheckpointError(failed or f"{name}: another node could not fetch it from {remote_dir}")
    return root / name


def describe_error(e: Exception) -> str:
    """An exception in one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _one_line(e: Exception) -> str:
    return str(e) if isinstance(e, CheckpointError) else f"train.remote_dir: {describe_error(e)}"
