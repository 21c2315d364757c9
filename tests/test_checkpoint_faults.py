"""Checkpoints under faults (issue 23): a step saved again after resuming from an earlier checkpoint, a disk that
fills up during a save, and a resume at another world size. Runs go through tests/train_synthetic.py in
subprocesses, one or two processes, as a user would start them."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, losses, run
from safetensors.torch import load_file

from vlpretrain.config import load_config
from vlpretrain.errors import CheckpointError, ConfigError
from vlpretrain.resume import adapt_to_world_size, map_data_position


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


class LatestWatcher(threading.Thread):
    """Reads `checkpoints/latest` over and over while a run writes checkpoints, and records every instant it named
    an incomplete folder (counted only if `latest` still names it after the look)."""

    NEEDED = ("COMPLETE", "client_state.json", "model.safetensors", "mp_rank_00_model_states.pt")

    def __init__(self, root: Path):
        super().__init__(daemon=True)
        self.root, self.stop, self.reads, self.seen, self.broken = root, threading.Event(), 0, set(), []

    def run(self) -> None:
        pointer = self.root / "latest"
        while not self.stop.is_set():
            name = pointer.read_text().strip()
            whole = all((self.root / name / f).is_file() for f in self.NEEDED)
            if not whole and pointer.read_text().strip() == name:
                self.broken.append(name)
            self.seen.add(name)
            self.reads += 1
            time.sleep(0.001)  # leaves the cores to the run; an unsafe window lasts longer than this


def test_saving_a_step_again_keeps_latest_complete_at_every_instant(tmp_path):
    """Resumed from step 2 of a run whose latest is step 6, the run reaches step 6 again: the new step 6 takes a
    fresh name, `latest` moves to it, and only then does the old one go. Pruning, resume and export follow."""
    out, common = tmp_path / "run", ["train.steps=6", "train.warmup_steps=2"]
    run(out, *common, "train.save_every=2", "train.keep_last=10")
    first = losses(out)
    ckpts = out / "checkpoints"
    for i in range(5000):  # makes removing the old step 6 take a while, as on a slow file system
        (ckpts / "step_00000006" / f"extra-{i}").write_bytes(b"x")
    watcher = LatestWatcher(ckpts)
    watcher.start()
    try:
        run(out, *common, "train.save_every=0", "train.keep_last=2",
            extra=["--resume", str(ckpts / "step_00000002")])
    finally:
        watcher.stop.set()
        watcher.join()
    assert watcher.broken == [], f"latest named an incomplete folder {len(watcher.broken)} times"
    assert watcher.seen == {"step_00000006", "step_00000006-1"} and watcher.reads > 1000
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006-1"]  # keep_last 2
    assert (ckpts / "latest").read_text().strip() == "step_00000006-1"
    again = losses(out)
    assert all(again[s] == pytest.approx(first[s], rel=1e-6) for s in range(3, 7))  # resumed exactly
    target = tmp_path / "exported.safetensors"
    r = subprocess.run([sys.executable, "-m", "vlpretrain.cli", "export", str(out), str(target)], env=ENV,
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mine, theirs = load_file(str(target)), load_file(str(ckpts / "step_00000006-1" / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.slow
def test_disk_full_during_a_save_stops_every_rank_in_one_line(tmp_path, tmpfs):
    """Two processes under ZeRO-2 (each writes its own optimizer shard) on a checkpoints folder with room for one
    checkpoint (~150 MB): the second save fails, both ranks stop with the same line naming the folder and the free
    space, the temporary folder is gone and `latest` still names step 1; with space freed, `--resume latest`
    finishes the run."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    grow = tmpfs(ckpts, "230m")
    common = ["train.steps=3", "train.save_every=1", "train.keep_last=1", "train.zero_stage=2"]
    r = run(out, *common, nproc=2, check=False)
    lines = error_lines(r)
    assert r.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], r.stderr[-3000:]
    assert f'File "{REPO / "vlpretrain"}' not in r.stderr, r.stderr[-3000:]  # no traceback of ours (torchrun's own)
    msg = lines[0]
    assert msg.startswith(f"error: {ckpts / '.tmp-step_00000002'}: could not write this checkpoint: ")
    assert " MiB free on its file system, a checkpoint takes about " in msg
    assert "; removed it and stopped; checkpoints/latest still names step_00000001;" in msg
    assert msg.endswith("free some space, then continue with --resume latest")
    assert not list(ckpts.glob(".tmp-*")) and sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001"]
    assert (ckpts / "latest").read_text().strip() == "step_00000001"
    assert (ckpts / "step_00000001" / "COMPLETE").is_file()
    assert sorted(losses(out)) == [1, 2]
    grow("600m")
    r = run(out, *common, nproc=2, extra=["--resume", "latest"])
    assert "resumed from" in r.stdout and "at step 1" in r.stdout
    assert sorted(losses(out)) == [1, 2, 3]
    assert json.loads((out / "summary_rank0.json").read_text())["steps"] == 3
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000003"]


@pytest.mark.slow
def test_resume_at_another_world_size(tmp_path):
    """A checkpoint resumed by another number of processes keeps the global batch (train.grad_accum adjusted) and
    the data position (exact here: --global-order deals one batch sequence to any world size), and its losses
    match the uninterrupted run: ZeRO-0 from 2 processes to 1 (state replicated, loaded as it is), ZeRO-2 from 1 to
    2 (through DeepSpeed's universal checkpoint). ZeRO-3 is refused in one line naming both world sizes."""
    def moved(straight: Path, nproc: int, *overrides: str) -> tuple[dict, str]:
        out = tmp_path / f"{straight.name}-moved"
        r = run(out, "train.steps=6", *overrides, nproc=nproc,
                extra=["--global-order", "--resume", str(straight / "checkpoints" / "step_00000003")])
        assert json.loads((out / "summary_rank0.json").read_text())["samples"] == 48  # 6 steps x 8
        client = json.loads((out / "checkpoints" / "step_00000006" / "client_state.json").read_text())
        assert client["world_size"] == nproc and client["config"]["train"]["grad_accum"] == 2 // nproc
        assert not list((out / "checkpoints").glob("*universal*"))  # the conversion is removed once loaded
        return losses(out), r.stdout

    z0 = tmp_path / "z0"
    run(z0, "train.steps=6", "train.save_every=3", "train.keep_last=2", nproc=2, extra=["--global-order"])
    z2 = tmp_path / "z2"
    run(z2, "train.steps=6", "train.save_every=3", "train.keep_last=2", "train.zero_stage=2", "train.grad_accum=2",
        extra=["--global-order"])
    for straight, nproc, overrides, note in [
            (z0, 1, [], "world size 2 -> 1: train.grad_accum 1 -> 2 keeps the global batch of 8; "
                        "data position in epoch 0: 24 samples of the epoch consumed -> batch 6 per process (exact)"),
            (z2, 2, ["train.zero_stage=2", "train.grad_accum=2"],
             "world size 1 -> 2: train.grad_accum 2 -> 1 keeps the global batch of 8 (ZeRO-2 state loaded through "
             "DeepSpeed's universal checkpoint); data position in epoch 0: 24 samples of the epoch consumed -> "
             "batch 3 per process (exact)")]:
        got, stdout = moved(straight, nproc, *overrides)
        assert note in stdout, stdout[-2000:]
        ref = losses(straight)
        assert sorted(got) == [4, 5, 6]
        for step in (4, 5, 6):  # fp32: the same samples and state, summed in another order
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (straight.name, step)

    z3 = tmp_path / "z3"
    run(z3, "train.steps=2", "train.zero_stage=3", "train.grad_accum=2")
    r = run(z3, "train.steps=3", "train.zero_stage=3", "train.grad_accum=2", nproc=2, extra=["--resume", "latest"],
            check=False)
    assert r.returncode != 0 and f'File "{REPO / "vlpretrain"}' not in r.stderr, r.stderr[-3000:]
    lines = error_lines(r)
    assert len(lines) == 2 and lines[0] == lines[1], r.stderr[-3000:]  # every rank stops with the same line
    assert "step_00000002: saved by 1 process(es), resumed with 2; ZeRO-3 state is split by process" in lines[0]
    assert "resume with 1 process(es)" in lines[0] and "--set model.pretrained=" in lines[0]


def test_world_size_rules():
    """The global batch kept by a whole grad_accum or refused; the data position mapped by samples consumed."""
    cfg = load_config(None, ["data.train=x", "data.batch_size=4"])
    client = {"world_size": 4, "config": {"data": {"batch_size": 4}, "train": {"grad_accum": 1}}}
    new, old, note, universal = adapt_to_world_size(client, cfg, 2, Path("ckpt"))
    assert (new.train.grad_accum, old, universal) == (2, 4, False)
    assert note == "world size 4 -> 2: train.grad_accum 1 -> 2 keeps the global batch of 16"
    assert adapt_to_world_size(client, cfg, 4, Path("ckpt")).note is None
    with pytest.raises(ConfigError, match="global batch of 16 .* divides 4"):
        adapt_to_world_size(client, cfg, 3, Path("ckpt"))
    with pytest.raises(ConfigError, match="train.grad_accum: 3 would change the global batch"):
        adapt_to_world_size(client, load_config(None, ["data.train=x", "data.batch_size=4", "train.grad_accum=3"]),
                            2, Path("ckpt"))
    with pytest.raises(CheckpointError, match="saved by 4 process.* ZeRO-1 bf16 state is split"):
        adapt_to_world_size(client, load_config(None, ["data.train=x", "data.batch_size=4",
                                                       "train.precision=bf16"]), 2, Path("ckpt"))  # runs ZeRO-1
    assert adapt_to_world_size(client, load_config(None, ["data.train=x", "data.batch_size=4",
                                                          "train.zero_stage=1"]), 2, Path("ckpt")).universal
    # older checkpoints: the world size from samples per step
    legacy = {"train_state": {"step": 3, "samples": 48}, "config": client["config"]}
    assert adapt_to_world_size(legacy, cfg, 2, Path("ckpt")).saved_world == 4
    assert map_data_position(3, 2, 1, 4) == (6, "24 samples of the epoch consumed -> batch 6 per process (exact)")
    assert map_data_position(3, 1, 2, 4) == (1, "12 samples of the epoch consumed -> batch 1 per process "
                                                "(4 sample(s) of it read again)")
