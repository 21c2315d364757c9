"""train.remote_dir: checkpoints mirrored in the background (files, then COMPLETE, then `latest`), pruned there too,
and taken back by `--resume latest` when the run folder has none; the S3 tests use a real S3 API (moto's server)."""

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from helpers import free_port, subprocess_env

from vlpretrain.config import load_config
from vlpretrain.engine import DistEnv
from vlpretrain.engine.remote import RemoteMirror, download_checkpoint, remote_latest
from vlpretrain.errors import CheckpointError, ConfigError
from vlpretrain.trainer import prepare_run_folder

HERE = Path(__file__).resolve().parent
FILES = ("mp_rank_00_model_states.pt", "zero/rank_0.pt", "model.safetensors", "client_state.json")


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint folder as save_checkpoint leaves it (files in a sub-folder too), COMPLETE written last."""
    path = root / f"step_{step:08d}"
    for name in FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(f"{name} at {step}".encode() * 100)
    (path / "COMPLETE").write_text(path.name + "\n")
    return path


class RecordingFS(LocalFileSystem):
    """A local folder behind an fsspec protocol of its own (`rec://`) that records every write in order and can
    hold a checkpoint's uploads until released, or fail them: what a slow or broken object store does."""

    protocol = "rec"
    writes: list[tuple[str, str]] = []  # (path, "put" | the bytes written by a small put)
    hold: dict[str, threading.Event] = {}  # step name -> released
    held = threading.Event()  # a held upload has started
    failing: set[str] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, auto_mkdir=True, **kwargs)  # an object store has no folders to make

    def put_file(self, lpath, rpath, **kwargs):
        for name, released in self.hold.items():
            if f"/{name}/" in rpath:
                self.held.set()
                released.wait()
        if any(f"/{name}/" in rpath for name in self.failing):
            raise OSError("the store refused the write")
        super().put_file(lpath, rpath, **kwargs)
        self.writes.append((self._strip_protocol(rpath), "put"))

    def pipe_file(self, path, value, **kwargs):
        super().pipe_file(path, value, **kwargs)
        self.writes.append((self._strip_protocol(path), value.decode().strip()))


fsspec.register_implementation("rec", RecordingFS, clobber=True)


def test_uploads_are_ordered_snapshotted_skip_to_newest_and_report_failures(tmp_path, caplog):
    """Each checkpoint's files reach the mirror before its COMPLETE, and COMPLETE before `latest` names it; a
    checkpoint pruned locally during its upload still arrives whole (the snapshot); a checkpoint queued behind a
    slow upload is replaced by a newer one; a failing upload is retried, then reported, and `latest` stays."""
    caplog.set_level(logging.INFO, logger="vlpretrain")
    root, remote = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    RecordingFS.writes.clear()
    RecordingFS.hold = {"step_00000001": threading.Event()}
    mirror = RemoteMirror(f"rec://{remote}", root, keep_last=2, attempts=2, retry_wait_s=0)
    mirror.submit(fake_checkpoint(root, 1))
    assert RecordingFS.held.wait(60)  # step 1's upload is under way, and held
    shutil.rmtree(root / "step_00000001")  # as local pruning would
    mirror.submit(fake_checkpoint(root, 2))
    mirror.submit(fake_checkpoint(root, 3))  # step 2 still queued: step 3 replaces it
    RecordingFS.hold["step_00000001"].set()
    assert mirror.finish() and mirror.missing is None
    assert "step_00000002 skipped, step_00000003 replaces it" in caplog.text

    writes = RecordingFS.writes
    latest_at = {value: i for i, (path, value) in enumerate(writes) if path.endswith("/latest")}
    assert list(latest_at) == ["step_00000001", "step_00000003"]  # step 2 never uploaded
    for name, at in latest_at.items():
        mine = [i for i, (path, _) in enumerate(writes) if f"/{name}/" in path]
        complete = [i for i in mine if writes[i][0].endswith("/COMPLETE")]
        assert len(mine) == len(FILES) + 1 and complete == [max(mine)] and max(mine) < at, name
        got = {p.relative_to(remote / "checkpoints" / name).as_posix()
               for p in (remote / "checkpoints" / name).rglob("*") if p.is_file()}
        assert got == {*FILES, "COMPLETE"}
    assert (remote / "checkpoints" / "step_00000001" / "zero" / "rank_0.pt").read_bytes() == b"zero/rank_0.pt at 1" * 100
    assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000003"]
    assert not list(root.glob(".upload-*"))  # snapshots removed after their upload
    report = mirror.report()
    assert report["remote/uploaded_step"] == 3 and report["remote/upload_s"] >= 0

    # a store that keeps refusing: retried, reported in one line, and the mirror's latest still names step 3
    RecordingFS.hold, RecordingFS.failing = {}, {"step_00000004"}
    mirror = RemoteMirror(f"rec://{remote}", root, keep_last=2, attempts=2, retry_wait_s=0)
    mirror.submit(fake_checkpoint(root, 4))
    assert not mirror.finish() and mirror.missing == "step_00000004"
    assert "the upload of step_00000004" in caplog.text and "failed 2 times" in caplog.text
    assert remote_latest(f"rec://{remote}") == "step_00000003"
    RecordingFS.failing = set()


def test_local_mirror_prunes_and_downloads_back(tmp_path):
    """A plain folder (a second disk) as the mirror: keep_last applies there; a download lands whole under the
    checkpoint's name; an incomplete remote checkpoint is refused."""
    root, remote = tmp_path / "run" / "checkpoints", str(tmp_path / "disk2" / "run")
    mirror = RemoteMirror(remote, root, keep_last=1)
    mirror.submit(fake_checkpoint(root, 1))
    mirror.submit(fake_checkpoint(root, 2))
    assert mirror.finish()
    assert sorted(os.listdir(f"{remote}/checkpoints")) == ["latest", "step_00000002"]
    assert remote_latest(remote) == "step_00000002"
    back = download_checkpoint(remote, "step_00000002", tmp_path / "other")
    assert back == tmp_path / "other" / "step_00000002"
    assert (back / "zero" / "rank_0.pt").read_bytes() == (root / "step_00000002" / "zero" / "rank_0.pt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["step_00000002"]  # no temporary left
    os.remove(f"{remote}/checkpoints/step_00000002/COMPLETE")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        download_checkpoint(remote, "step_00000002", tmp_path / "third")


def test_fresh_run_refuses_a_used_mirror_and_overwrite_clears_it(tmp_path):
    """A mirror belongs to one run, as a run folder does: a fresh run into one that holds checkpoints stops with one
    line; --overwrite clears it (and only it); --resume takes it as it is."""
    remote = str(tmp_path / "disk2")
    old = RemoteMirror(remote, tmp_path / "old" / "checkpoints", keep_last=2)
    old.submit(fake_checkpoint(tmp_path / "old" / "checkpoints", 1))
    assert old.finish()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"^train.remote_dir: .* holds checkpoints of an earlier run \(newest "
                                          r"step_00000001\); continue it with --resume latest"):
        prepare_run_folder(tmp_path / "new", None, False, env, remote)
    prepare_run_folder(tmp_path / "new", "latest", False, env, remote).release()  # each run holds the folder's lock
    assert remote_latest(remote) == "step_00000001"
    prepare_run_folder(tmp_path / "new", None, True, env, remote).release()
    assert os.listdir(remote) == []


def test_remote_dir_is_checked_when_the_config_loads(tmp_path):
    def load(value):
        return load_config(None, ["data.train=x", f"train.output_dir={tmp_path / 'run'}", f"train.remote_dir={value}"])

    assert load("s3://bucket/run").train.remote_dir == "s3://bucket/run"
    assert load(str(tmp_path / "disk2")).train.remote_dir == str(tmp_path / "disk2")
    for value, says in [("nosuch://b/run", "no storage backend for nosuch://"),
                        ("dropbox://b/run", "dropbox:// needs its fsspec backend"),
                        ("https://example.com/run", "cannot be written to"),
                        (str(tmp_path / "run" / "mirror"), "must lie outside train.output_dir")]:
        with pytest.raises(ConfigError, match="train.remote_dir: ") as e:
            load(value)
        assert says in str(e.value) and "\n" not in str(e.value)


# ---- end to end: the trainer against a real S3 API -------------------------------------------------------------


def environment():
    env = subprocess_env()
    return env  # built after the s3_server fixture: its AWS variables are in os.environ


def train(out, *args, check=True):
    r = subprocess.run([sys.executable, str(HERE / "train_synthetic.py"), str(out), *args], env=environment(),
                       capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(out):
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_s3_mirror_survives_losing_the_run_folder(tmp_path, s3_server):
    bucket = s3_server.bucket()
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint)

    def remote_files():
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def latest():
        return s3.get_object(Bucket=bucket, Key="run/checkpoints/latest")["Body"].read().decode().strip()

    # 4 of 6 steps (one job slot), so that the learning-rate schedule is the straight run's
    common = ["train.steps=6", "train.save_every=2", "train.keep_last=1", f"train.remote_dir=s3://{bucket}/run"]
    out = tmp_path / "run"
    r = train(out, *common, "train.stop_after=4", check=False)
    assert r.returncode == 130, r.stderr[-3000:]  # stopped with a checkpoint, as on SIGTERM
    step4 = sorted(p.relative_to(out / "checkpoints").as_posix()
                   for p in (out / "checkpoints" / "step_00000004").rglob("*") if p.is_file())
    assert remote_files() == sorted(["run/checkpoints/latest", *(f"run/checkpoints/{f}" for f in step4)])
    assert latest() == "step_00000004"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["remote/uploaded_step"] == 4 and rows[-1]["remote/upload_s"] > 0

    # a fresh run may not take over the mirror of another
    r = train(tmp_path / "other", *common, check=False)
    assert r.returncode == 2 and "train.remote_dir: " in r.stderr and "holds checkpoints of an earlier run" in r.stderr

    shutil.rmtree(out)  # the node's disk is gone: the mirror has it
    r = train(out, *common, "--resume", "latest")
    assert "downloading step_00000004" in r.stdout and "at step 4" in r.stdout
    train(tmp_path / "straight", "train.steps=6", "train.save_every=2")
    ref, got = losses(tmp_path / "straight"), losses(out)
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), step
    assert latest() == "step_00000006"
    assert {k.split("/")[2] for k in remote_files()} == {"latest", "step_00000006"}


def test_s3_upload_that_never_lands_fails_the_run_after_local_work(tmp_path, s3_server):
    """A mirror that refuses every upload: retried, warned, and the run exits 2 with one line, its local
    checkpoint and model written."""
    out = tmp_path / "run"
    r = train(out, "train.steps=1", "train.warmup_steps=0", "train.remote_dir=s3://no-such-bucket/run", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: train.remote_dir: step_00000001 never reached s3://no-such-bucket/run (see the "
                      f"warning above); it is complete in {out / 'checkpoints'}"]
    assert "the upload of step_00000001 to s3://no-such-bucket/run failed 3 times" in r.stderr
    assert (out / "checkpoints" / "step_00000001" / "COMPLETE").is_file() and (out / "model.safetensors").is_file()



def two_nodes(tmp_path, *args):
    """Two launchers of one process each, as on two machines, each with a run folder of its own (node-local
    disks): tmp_path/node0 and tmp_path/node1. Their return codes and outputs."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(HERE / "train_synthetic.py"), str(tmp_path / f"node{node}"), *args],
                              env=environment(), cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    return [p.returncode for p in procs], outputs


@pytest.mark.slow
def test_node_local_run_folders_resume_from_the_mirror(tmp_path):
    """Node-local run folders: under ZeRO-0 (rank 0 writes the whole checkpoint) the mirror holds it all, and a
    resume where neither node has it any more downloads it on both, continuing the uninterrupted run's losses;
    ZeRO-1 (every rank writes its part) is refused up front rather than mirrored incomplete."""
    common = ["train.steps=6", "train.save_every=2", "train.keep_last=1", f"train.remote_dir={tmp_path / 'mirror'}"]
    codes, outputs = two_nodes(tmp_path, *common, "train.zero_stage=1")
    assert codes[0] != 0 and "is not one folder shared by every rank" in outputs[0], outputs[0][-3000:]
    codes, outputs = two_nodes(tmp_path, *common, "train.stop_after=4")
    assert (tmp_path / "mirror" / "checkpoints" / "step_00000004" / "COMPLETE").is_file(), outputs[0][-3000:]
    shutil.rmtree(tmp_path / "node0")
    codes, outputs = two_nodes(tmp_path, *common, "--resume", "latest")
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert all("downloading step_00000004" in out for out in outputs)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        str(HERE / "train_synthetic.py"), str(tmp_path / "straight"), "train.steps=6"],
                       env=environment(), cwd=HERE.parent, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, got = losses(tmp_path / "straight"), losses(tmp_path / "node0")
    assert sorted(got) == [5, 6] and all(got[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7) for k in got)
    assert remote_latest(str(tmp_path / "mirror")) == "step_00000006"
